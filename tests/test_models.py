"""The student zoo: shapes, parameter/FLOP accounting, ONNX export, error messages."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fededge.learn import arch, models, zoo

IMAGE_SHAPES = [(1, 8, 8), (3, 32, 32), (1, 28, 28), (3, 96, 96)]
SEQUENCE_SHAPES = [(6, 128), (2, 40)]
TABULAR_SHAPES = [(13,), (64,)]
CASES = [(shape, name) for shape in IMAGE_SHAPES + SEQUENCE_SHAPES for name in zoo.zoo_for(shape)]
CASES += [(shape, name) for shape in TABULAR_SHAPES for name in zoo.tabular_zoo()]


def test_zoo_names_and_order() -> None:
    plain = ["cnn-xs", "cnn-s", "cnn-m", "cnn-l"]
    assert zoo.conv_zoo() == plain + ["res-s", "res-m", "res-l", "res-xl"]
    assert zoo.tabular_zoo() == ["mlp-s", "mlp-m", "mlp-l", "mlp-xl"]
    assert zoo.zoo_for((3, 32, 32)) == zoo.conv_zoo() == zoo.zoo_for((6, 128))
    # residual stages need a map of 16 per side: digits keep the plain ladder
    assert zoo.zoo_for((1, 8, 8)) == plain == zoo.zoo_for((3, 15, 40))
    assert zoo.zoo_for((13,)) == zoo.tabular_zoo()


def test_the_stem_strides_large_inputs_down_to_about_32() -> None:
    assert [zoo.stem_stride(s) for s in [(8, 8), (32, 32), (63, 63), (64, 64), (96, 96),
                                         (96, 200), (128,), (1000,)]] == [1, 1, 1, 2, 3, 3, 1, 7]
    # a 96x96 frame costs what a 32x32 one does: the smallest student fits a Pi Zero 2 W
    assert (zoo.estimate_cost("cnn-xs", (3, 96, 96), 10).flops
            == zoo.estimate_cost("cnn-xs", (3, 32, 32), 10).flops)
    layers = zoo.architecture("cnn-xs", (3, 128, 128), 10)
    assert layers[0] == arch.Conv(3, 12, kernel=4, stride=4, padding=1)


@pytest.mark.parametrize(("shape", "name"), CASES)
def test_student_builds_and_costs_match(shape: tuple[int, ...], name: str) -> None:
    model = models.build_student(name, shape, 7)
    logits = model(torch.randn(5, *shape))
    assert logits.shape == (5, 7)
    assert logits.dtype == torch.float32
    cost = zoo.estimate_cost(name, shape, 7)
    assert cost.name == name
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.weight_bytes == 4 * cost.params
    assert cost.train_memory_bytes == 4 * cost.weight_bytes + 32 * cost.activation_bytes * 2
    # The torch-free figures are the built module's, traced: they cannot drift apart.
    traced = models.trace(model, shape)
    analytic = arch.measure(zoo.architecture(name, shape, 7), shape)
    assert traced == analytic



@pytest.mark.parametrize("shape", IMAGE_SHAPES + SEQUENCE_SHAPES + TABULAR_SHAPES)
def test_params_strictly_increase_along_the_zoo(shape: tuple[int, ...]) -> None:
    params = [zoo.estimate_cost(name, shape, 10).params for name in zoo.zoo_for(shape)]
    assert params == sorted(set(params)), params


def test_the_conv_ladder_spans_the_catalog_at_32x32() -> None:
    params = [zoo.estimate_cost(name, (3, 32, 32), 10).params for name in zoo.conv_zoo()]
    assert params[0] <= 4_000 and params[-1] >= 1_000_000 and params[-1] >= 100 * params[0]


def test_digits_sizes_are_in_the_intended_ranges() -> None:
    params = {name: zoo.estimate_cost(name, (1, 8, 8), 10).params for name in zoo.zoo_for((1, 8, 8))}
    assert 2_000 <= params["cnn-xs"] <= 4_000
    assert 5_000 <= params["cnn-s"] <= 10_000
    assert 30_000 <= params["cnn-m"] <= 45_000
    assert 60_000 <= params["cnn-l"] <= 120_000


def test_cnn_xs_costs_by_hand() -> None:
    # 1x8x8 -> conv 1->12 (8x8) -> maxpool (4x4) -> conv 12->24 (4x4) -> avgpool (2x2) -> 96 -> 10
    cost = zoo.estimate_cost("cnn-xs", (1, 8, 8), 10, batch_size=16)
    assert cost.params == (12 * 1 * 9 + 12) + (24 * 12 * 9 + 24) + (96 * 10 + 10)
    macs = 8 * 8 * 12 * (1 * 9) + 4 * 4 * 24 * (12 * 9) + 96 * 10
    assert cost.flops == 2 * macs
    # input + conv/relu (8x8x12 each) + maxpool + conv/relu (4x4x24 each) + avgpool + logits
    floats = 64 + 2 * 768 + 192 + 2 * 384 + 96 + 10
    assert cost.activation_bytes == 4 * floats
    assert cost.train_memory_bytes == 4 * 4 * cost.params + 16 * 4 * floats * 2
    assert cost.batch_size == 16


def test_mlp_s_costs_by_hand() -> None:
    cost = zoo.estimate_cost("mlp-s", (13,), 3)
    assert cost.params == 13 * 32 + 32 + 32 * 3 + 3
    assert cost.flops == 2 * (13 * 32 + 32 * 3)


def test_build_is_deterministic_given_the_seed() -> None:
    torch.manual_seed(123)
    first = models.build_student("cnn-m", (1, 8, 8), 10)
    torch.manual_seed(123)
    second = models.build_student("cnn-m", (1, 8, 8), 10)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_estimate_cost_is_cached_and_leaves_the_rng_alone() -> None:
    state = torch.get_rng_state()
    first = zoo.estimate_cost("cnn-l", (2, 12, 12), 4)
    assert torch.equal(state, torch.get_rng_state())
    assert zoo.estimate_cost("cnn-l", [2, 12, 12], 4) is first


def test_numpy_integers_are_accepted() -> None:
    shape = tuple(np.array([1, 8, 8]))
    cost = zoo.estimate_cost("cnn-xs", shape, np.int64(10))
    assert cost == zoo.estimate_cost("cnn-xs", (1, 8, 8), 10)
    assert models.build_student("cnn-xs", shape, np.int64(10))(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def _onnx_session(model: torch.nn.Module, shape: tuple[int, ...]) -> ort.InferenceSession:
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.zeros(1, *shape),),
        buffer,
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )
    return ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])


# The legacy exporter is the contract (export.py uses it); silence its deprecation notice.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    ("name", "shape"),
    [(name, (1, 8, 8)) for name in zoo.zoo_for((1, 8, 8))]
    + [("cnn-xs", (1, 28, 28)), ("cnn-s", (3, 9, 13))],  # odd maps: overlapping avg-pool windows
)
def test_image_students_export_to_onnx_with_a_dynamic_batch(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = models.build_student(name, shape, 10).eval()
    session = _onnx_session(model, shape)
    for batch in (1, 7):
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(None, {"x": x.numpy()})
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() < 1e-4


def test_unknown_student_names_the_valid_ones_for_the_input_kind() -> None:
    with pytest.raises(zoo.UnknownStudentError) as info:
        models.build_student("mlp-s", (1, 8, 8), 10)
    message = str(info.value)
    assert "'mlp-s'" in message and "image" in message
    assert "cnn-xs, cnn-s, cnn-m, cnn-l" in message and "res-s" not in message  # 8x8: no res
    with pytest.raises(zoo.UnknownStudentError, match="mlp-s, mlp-m, mlp-l, mlp-xl"):
        zoo.estimate_cost("resnet18", (13,), 3)
    assert issubclass(zoo.UnknownStudentError, ValueError)


@pytest.mark.parametrize(
    ("shape", "classes", "match"),
    [
        ((1, 1, 8, 8, 2), 10, r"neither an image"),
        ((2, 7), 10, "sequence input .* L must be at least 8"),
        ((1, 1, 8, 8), 10, "neither an image"),
        ((1, 7, 8), 10, "at least 8"),
        ((1, 8, 8), 1, "num_classes must be an integer ≥ 2, got 1"),
        ((1, 8, 8), 2.5, "num_classes"),
        ((0,), 3, "positive dimensions"),
        ((1.5,), 3, "sequence of integers"),
    ],
)
def test_bad_shapes_and_class_counts_are_rejected(
    shape: tuple[float, ...], classes: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        models.build_student("cnn-xs" if len(shape) == 3 else "mlp-s", shape, classes)


def test_a_residual_student_on_too_small_a_map_says_what_it_needs() -> None:
    with pytest.raises(zoo.UnknownStudentError, match=r"'res-s' needs inputs of at least 16"):
        zoo.estimate_cost("res-s", (1, 8, 8), 10)


def test_bad_batch_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        zoo.estimate_cost("cnn-xs", (1, 8, 8), 10, batch_size=0)
