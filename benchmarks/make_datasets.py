"""Write the hard synthetic data sets of ``fededge.learn.synthetic`` as ``.npz`` files (keys X,
y), with a contact sheet of the first 64 images of each, for the benchmarks and for a look.

    .venv/bin/python benchmarks/make_datasets.py --all --outdir benchmarks/data
    .venv/bin/python benchmarks/make_datasets.py --preset hard32 --out hard32.npz --png sheet.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fededge.learn.synthetic import PRESETS, make_hard


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="hard32", choices=sorted(PRESETS))
    ap.add_argument("--all", action="store_true", help="write every preset to --outdir")
    ap.add_argument("--outdir", default=".")
    ap.add_argument("--out", help="output .npz (default: <outdir>/<preset>.npz)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--renders", type=int, default=None)
    ap.add_argument("--png", help="also write a contact sheet of the first 64 images here")
    args = ap.parse_args(argv)
    names = sorted(PRESETS) if args.all else [args.preset]
    for name in names:
        extra = {} if args.renders is None else {"renders": args.renders}
        X, y = make_hard(name, seed=args.seed, **extra)
        out = Path(args.out) if (args.out and not args.all) else Path(args.outdir) / f"{name}.npz"
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, X=X, y=y)
        print(f"{out}: X {X.shape} {X.dtype}, y {y.shape}, classes {np.bincount(y).tolist()}")
        if args.png:
            _contact_sheet(X[:64], y[:64], Path(args.png).with_name(f"{name}_{Path(args.png).name}"))


def _contact_sheet(X: np.ndarray, y: np.ndarray, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(8, 8, figsize=(8, 8.6))
    for ax, img, label in zip(axes.ravel(), X, y):
        ax.imshow(img.transpose(1, 2, 0).squeeze(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(str(label), fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
