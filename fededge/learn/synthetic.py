"""Hard, deterministic image sets built from sklearn's bundled digits (no downloads).

Each 8x8 digit is upsampled to the target size, put through a random affine jitter (rotation,
anisotropic scale, shear, shift), thickened or thinned, painted in a random foreground colour
over a random textured background (smooth noise, stripes, blotches/patches, or a mix), overlaid
with random distractor strokes (some in the digit's own colour), blurred a little and noised.
Labels are kept. Everything is seeded numpy/scipy, so the same arguments always give the same
bytes.

    from fededge.learn.synthetic import make_hard
    X, y = make_hard("hard32", seed=0)          # float32 (N, 3, 32, 32) in [0, 1], int64 (N,)

    python benchmarks/make_datasets.py --all --outdir benchmarks/data   # every preset as .npz

Digits is an easy data set: a method that shines there can collapse on real photos. These sets
are what the benchmarks (and the regression tests of the collapse) use instead, always through
the ordinary ``.npz`` path a user's own data takes.

Presets (``PRESETS``): ``hard32`` (RGB 32x32; the background colour is class-correlated in half
the images, as colour statistics are in real photos), ``hard28`` (grayscale 1x28x28, the same
scenes converted to luminance), ``weak32`` (RGB 32x32, colour independent of the class, stronger
jitter: warm-up students at chance), ``distract32`` (weak32 plus distractor strokes).
``renders`` > 1 renders every source digit several times (more samples); keep 1 when the data
goes through fededge's random split, or renders of one source digit land in both the test and
the training side (a leak that makes the set look easier than it is).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class HardParams:
    size: int = 32
    channels: int = 3               # 3: RGB; 1: luminance of the RGB scene
    renders: int = 1                # renders per source digit
    rotation_deg: float = 15.0      # uniform in ±rotation_deg
    scale: tuple[float, float] = (0.8, 1.1)
    aspect: float = 0.25            # x/y scale ratio jitter, ±
    shear: float = 0.3              # ±
    shift_px: float = 2.0           # ±, in output pixels
    stroke: tuple[float, float] = (-0.15, 0.25)   # threshold shift: <0 thicker, >0 thinner
    min_contrast: float = 0.5       # min |fg - bg| RGB distance (0..~1.7)
    max_contrast: float = 1.2
    min_luma_contrast: float = 0.0  # min |luma(fg) - luma(bg)| (needed for the grayscale set)
    texture_amp: tuple[float, float] = (0.1, 0.3)   # background texture amplitude
    distractors: tuple[int, int] = (0, 0)          # random strokes per image
    distractor_fg_share: float = 0.0               # share of strokes painted in the digit colour
    occlusion: float = 0.0          # probability of one random opaque patch over the image
    blur: tuple[float, float] = (0.3, 0.6)
    noise: tuple[float, float] = (0.02, 0.05)      # pixel noise std
    # probability that the background colour is drawn near a fixed per-class palette colour
    # (like real photos, where colour statistics correlate weakly with the class)
    class_colour_bias: float = 0.0
    class_colour_jitter: float = 0.15


_HARD = dict(rotation_deg=10.0, scale=(0.85, 1.05), shear=0.15, aspect=0.15, shift_px=1.5,
             class_colour_bias=0.5)
PRESETS: dict[str, HardParams] = {
    # like a small real-photo set: centralized cnn-l ~77%, warm-up students ~20-25%
    "hard32": HardParams(**_HARD),
    "hard28": HardParams(size=28, channels=1, min_luma_contrast=0.2, **_HARD),
    # colour independent of the class and a stronger jitter: centralized ~62-72%, but a student
    # trained on ~90 private images learns nothing (warm-up and local-only at chance, ~11%)
    "weak32": HardParams(),
    # weak32 plus a distractor stroke in half the images: centralized ~55%
    "distract32": HardParams(distractors=(0, 1)),
}


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float64), d.target.astype(np.int64)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma, mode="wrap")
    f -= f.min()
    return f / max(f.max(), 1e-9)


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    theta = rng.uniform(0, np.pi)
    freq = rng.uniform(0.15, 0.6)
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
    if rng.random() < 0.5:  # square stripes
        wave = np.sign(wave)
    return 0.5 + 0.5 * wave


def _patches(rng: np.random.Generator, size: int) -> np.ndarray:
    f = np.zeros((size, size))
    for _ in range(rng.integers(3, 9)):
        h, w = rng.integers(3, size // 2, size=2)
        r, c = rng.integers(0, size - 2, size=2)
        f[r:r + h, c:c + w] = rng.random()
    return ndimage.gaussian_filter(f, rng.uniform(0.3, 1.5))


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(0, 4)
    if kind == 0:
        return _smooth_noise(rng, size, rng.uniform(1.0, 4.0))
    if kind == 1:
        return _stripes(rng, size)
    if kind == 2:
        return _patches(rng, size)
    return 0.5 * _smooth_noise(rng, size, rng.uniform(1.0, 3.0)) + 0.5 * _stripes(rng, size)


def _stroke_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random curved stroke (quadratic Bezier), anti-aliased, of digit-like width."""
    pts = rng.uniform(-0.1 * size, 1.1 * size, size=(3, 2))
    t = np.linspace(0, 1, 4 * size)[:, None]
    curve = (1 - t) ** 2 * pts[0] + 2 * (1 - t) * t * pts[1] + t ** 2 * pts[2]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    d2 = ((yy[..., None] - curve[:, 0]) ** 2 + (xx[..., None] - curve[:, 1]) ** 2).min(-1)
    width = rng.uniform(0.8, 2.0) * size / 32
    return np.clip(1.5 - np.sqrt(d2) / width, 0, 1)


def _digit_mask(img8: np.ndarray, rng: np.random.Generator, p: HardParams) -> np.ndarray:
    size = p.size
    big = ndimage.zoom(img8, size / 8 * 0.75, order=3)  # the digit fills ~3/4 of the frame
    canvas = np.zeros((size, size))
    o = (size - big.shape[0]) // 2
    canvas[o:o + big.shape[0], o:o + big.shape[1]] = big
    ang = np.deg2rad(rng.uniform(-p.rotation_deg, p.rotation_deg))
    s = rng.uniform(*p.scale)
    a = 1 + rng.uniform(-p.aspect, p.aspect)
    sh = rng.uniform(-p.shear, p.shear)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    forward = rot @ np.array([[1, sh], [0, 1]]) @ np.diag([s, s * a])
    inverse = np.linalg.inv(forward)
    center = np.array([size / 2 - 0.5] * 2)
    shift = rng.uniform(-p.shift_px, p.shift_px, size=2) * size / 32
    offset = center - inverse @ (center + shift)
    m = ndimage.affine_transform(canvas, inverse, offset=offset, order=1, mode="constant")
    thr = 0.35 + rng.uniform(*p.stroke)
    return np.clip((m - thr) / 0.2 + 0.5, 0, 1)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 1, size=3)


_PALETTE = np.random.default_rng(0xC0105).uniform(0.1, 0.9, size=(10, 3))


def _render(img8: np.ndarray, rng: np.random.Generator, p: HardParams,
            label: int = 0) -> np.ndarray:
    size = p.size
    mask = _digit_mask(img8, rng, p)
    bg = _colour(rng)
    if p.class_colour_bias > 0 and rng.random() < p.class_colour_bias:
        bg = np.clip(_PALETTE[label % 10] + rng.normal(scale=p.class_colour_jitter, size=3), 0, 1)
    # a foreground colour whose distance from the background lies in [min, max] contrast
    for _ in range(100):
        fg = _colour(rng)
        dist = np.linalg.norm(fg - bg)
        luma = abs(float(np.dot(fg - bg, [0.299, 0.587, 0.114])))
        if p.min_contrast <= dist <= p.max_contrast and luma >= p.min_luma_contrast:
            break
    bg2 = _colour(rng)
    tex = _texture(rng, size) * rng.uniform(*p.texture_amp)
    img = bg[:, None, None] * (1 - tex) + bg2[:, None, None] * tex
    # the digit itself carries a little texture too, so colour alone never separates it
    fg_tex = _smooth_noise(rng, size, 2.0)[None] * 0.15
    fg_img = np.clip(fg[:, None, None] + fg_tex - 0.075, 0, 1)
    img = img * (1 - mask) + fg_img * mask
    for _ in range(rng.integers(p.distractors[0], p.distractors[1] + 1)):
        sm = _stroke_mask(rng, size)
        colour = fg if rng.random() < p.distractor_fg_share else _colour(rng)
        img = img * (1 - sm) + colour[:, None, None] * sm
    if rng.random() < p.occlusion:
        h, w = rng.integers(size // 6, size // 3 + 1, size=2)
        r, c = rng.integers(0, size - h), rng.integers(0, size - w)
        img[:, r:r + h, c:c + w] = _colour(rng)[:, None, None]
    sigma = rng.uniform(*p.blur)
    img = np.stack([ndimage.gaussian_filter(ch, sigma) for ch in img])
    img = img + rng.normal(scale=rng.uniform(*p.noise), size=img.shape)
    img = np.clip(img, 0, 1)
    if p.channels == 1:
        img = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
    return img


def make_hard(preset: str | HardParams = "hard32", seed: int = 0, *, count: int | None = None,
              **overrides) -> tuple[np.ndarray, np.ndarray]:
    """(X float32 (N, C, S, S) in [0, 1], y int64 (N,)) for a preset name or ``HardParams``;
    keyword overrides replace preset fields (e.g. ``renders=2``). ``count`` renders only the
    first ``count`` source digits (small sets for tests)."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    p = replace(p, **overrides) if overrides else p
    images, labels = _digits()
    images, labels = images[:count], labels[:count]
    rng = np.random.default_rng([seed, 0x4A7D])
    X = np.empty((len(images) * p.renders, p.channels, p.size, p.size), np.float32)
    y = np.empty(len(images) * p.renders, np.int64)
    k = 0
    for r in range(p.renders):
        for img8, label in zip(images, labels):
            X[k] = _render(img8, rng, p, int(label))
            y[k] = label
            k += 1
    return X, y
