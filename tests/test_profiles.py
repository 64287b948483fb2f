"""Device profiles: the shipped catalog, validation messages, and student selection."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from fededge import profiles
from fededge.learn import picking, zoo

DIGITS = ((1, 8, 8), 10)
SHIPPED = {
    "pi-zero-2w",
    "pi-3bplus",
    "pi-4-4gb",
    "pi-5-8gb",
    "jetson-nano-4gb",
    "jetson-orin-nano-8gb",
    "jetson-agx-orin-64gb",
    "x86-gateway",
}
REPO_DEVICES = Path(__file__).resolve().parent.parent / "devices"
PI4_TEXT = (REPO_DEVICES / "pi-4-4gb.toml").read_text()


@pytest.fixture
def catalog(monkeypatch: pytest.MonkeyPatch) -> dict[str, profiles.DeviceProfile]:
    monkeypatch.delenv("FEDEDGE_DEVICES", raising=False)
    return profiles.load_catalog()


def write_profile(directory: Path, text: str, name: str = "pi-4-4gb") -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def edited(old: str, new: str) -> str:
    """The Pi 4 profile with one line replaced (the old line must exist)."""
    assert re.search(old, PI4_TEXT, flags=re.M), old
    return re.sub(old, new, PI4_TEXT, count=1, flags=re.M)


def with_budgets(profile: profiles.DeviceProfile, **changes: float) -> profiles.DeviceProfile:
    return dataclasses.replace(profile, budgets=dataclasses.replace(profile.budgets, **changes))


# --------------------------------------------------------------------------- the catalog


def test_catalog_loads_every_shipped_profile(catalog: dict[str, profiles.DeviceProfile]) -> None:
    assert set(catalog) == SHIPPED
    assert list(catalog) == sorted(catalog)
    for name, profile in catalog.items():
        assert profile.name == name
        assert profile.ort_providers[-1] == "CPUExecutionProvider"
        assert profile.budgets.max_train_memory_mb <= profile.ram_mb
    assert catalog["jetson-nano-4gb"].compute_unit == "gpu"
    assert catalog["pi-5-8gb"].arch == "aarch64"
    assert catalog["x86-gateway"].arch == "x86_64"


def test_reference_profile_has_relative_compute_one(
    catalog: dict[str, profiles.DeviceProfile],
) -> None:
    gateway = catalog["x86-gateway"]
    assert gateway.peak_gflops == profiles.REFERENCE_GFLOPS
    assert gateway.relative_compute == 1.0
    assert catalog["pi-zero-2w"].relative_compute < 0.1 < 10 < catalog["jetson-agx-orin-64gb"].relative_compute


def test_catalog_dir_honours_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDEDGE_DEVICES", raising=False)
    assert profiles.catalog_dir().resolve() == REPO_DEVICES
    write_profile(tmp_path, PI4_TEXT, name="my-board")
    monkeypatch.setenv("FEDEDGE_DEVICES", str(tmp_path))
    assert profiles.catalog_dir() == tmp_path
    assert list(profiles.load_catalog()) == ["my-board"]


def test_empty_or_missing_catalog_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(profiles.ProfileError, match="no device profiles"):
        profiles.load_catalog(tmp_path)
    with pytest.raises(profiles.ProfileError, match="does not exist"):
        profiles.load_catalog(tmp_path / "nowhere")


def test_get_profile_suggests_the_closest_name(catalog: dict[str, profiles.DeviceProfile]) -> None:
    assert profiles.get_profile("pi-5-8gb", catalog) is catalog["pi-5-8gb"]
    with pytest.raises(profiles.ProfileError) as info:
        profiles.get_profile("pi-4", catalog)
    message = str(info.value)
    assert message.startswith("unknown device profile 'pi-4' (did you mean 'pi-4-4gb'?); known")
    assert all(name in message for name in SHIPPED)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            r"^max_params = .*$",
            'max_params = "abc"',
            "field 'budgets.max_params' must be a positive integer, got 'abc'",
        ),
        (r"^max_params = .*$", "max_params = 0", "field 'budgets.max_params' must be a positive integer, got 0"),
        (r"^cores = .*$", "cores = true", "field 'cores' must be a positive integer, got True"),
        (r"^cores = .*$", "cores = 4.0", "field 'cores' must be a positive integer, got 4.0"),
        (r"^clock_ghz = .*$", 'clock_ghz = "1.8"', "field 'clock_ghz' must be a positive number, got '1.8'"),
        (r"^peak_gflops = .*$", "peak_gflops = inf", "field 'peak_gflops' must be a positive number, got inf"),
        (r"^can_train = .*$", 'can_train = "yes"', "field 'can_train' must be a boolean"),
        (r"^arch = .*$", 'arch = "arm64"', "field 'arch' must be one of aarch64, armv7l, x86_64, got 'arm64'"),
        (r"^compute_unit = .*$", 'compute_unit = "npu"', "field 'compute_unit' must be one of cpu, gpu"),
        (r"^ort_providers = .*$", "ort_providers = []", "field 'ort_providers' must be a non-empty list"),
        (r"^ort_providers = .*$", 'ort_providers = ["CPU"]', "ending in 'ExecutionProvider', got ['CPU']"),
        (r"^threads = .*$", "threads = 9", "field 'threads' must be at most 2 × cores = 8, got 9"),
        (r"^ram_mb = .*$", "ram_mb = 256", "'budgets.max_train_memory_mb' must not exceed ram_mb = 256"),
        (r"^cores = .*$", "", "missing required field 'cores'"),
        (r"^max_latency_ms = .*$", "", "missing required field 'budgets.max_latency_ms'"),
        (r"^cpu = ", 'colour = "red"\ncpu = ', "unknown field 'colour'"),
        (r"^max_params = ", "max_flops = 1\nmax_params = ", "unknown field 'budgets.max_flops'"),
        (r"^\[budgets\]$", "", "unknown field 'max_params' (it belongs under [budgets])"),
    ],
)
def test_invalid_profiles_name_the_file_and_the_field(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    path = write_profile(tmp_path, edited(old, new))
    with pytest.raises(profiles.ProfileError) as info:
        profiles.load_profile(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_missing_budgets_table_is_named(tmp_path: Path) -> None:
    path = write_profile(tmp_path, PI4_TEXT.split("[budgets]")[0])
    with pytest.raises(profiles.ProfileError, match=re.escape(f"{path}: missing required table [budgets]")):
        profiles.load_profile(path)


def test_toml_syntax_errors_name_the_file_and_the_line(tmp_path: Path) -> None:
    path = write_profile(tmp_path, edited(r"^cores = .*$", "cores = = 4"))
    line = 1 + PI4_TEXT.splitlines().index(next(l for l in PI4_TEXT.splitlines() if l.startswith("cores")))
    with pytest.raises(profiles.ProfileError) as info:
        profiles.load_profile(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML")
    assert f"line {line}" in message


def test_non_utf8_files_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('description = "Gerät"\n'.encode("latin-1"))
    with pytest.raises(profiles.ProfileError, match=re.escape(f"{path}: invalid TOML")):
        profiles.load_profile(path)


def test_paths_below_the_working_directory_are_shown_relative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "devices").mkdir()
    write_profile(tmp_path / "devices", edited(r"^max_params = .*$", 'max_params = "abc"'))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(profiles.ProfileError) as info:
        profiles.load_catalog(tmp_path / "devices")
    assert str(info.value) == (
        "devices/pi-4-4gb.toml: field 'budgets.max_params' must be a positive integer, got 'abc'"
    )


# --------------------------------------------------------------------------- choosing students


def test_digits_catalog_uses_at_least_three_students(
    catalog: dict[str, profiles.DeviceProfile],
) -> None:
    picked = {c.profile.name: c.student for c in picking.describe_catalog(*DIGITS, catalog)}
    assert picked["pi-zero-2w"] == "cnn-xs"
    assert picked["pi-3bplus"] == "cnn-s"
    assert picked["pi-4-4gb"] == "cnn-m"
    for name in ("pi-5-8gb", "jetson-nano-4gb", "jetson-orin-nano-8gb", "jetson-agx-orin-64gb", "x86-gateway"):
        assert picked[name] == "cnn-l"
    assert len(set(picked.values())) >= 3


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (13,)])
def test_pick_is_the_largest_member_within_every_budget(
    catalog: dict[str, profiles.DeviceProfile], shape: tuple[int, ...]
) -> None:
    ladder = zoo.zoo_for(shape)
    for profile in catalog.values():
        choice = picking.pick_student(profile, shape, 10)
        assert choice.profile is profile and not choice.inference_only
        budgets = profile.budgets
        assert choice.cost.params <= budgets.max_params
        assert choice.cost.train_memory_bytes <= budgets.max_train_memory_mb * 2**20
        assert choice.latency_ms <= budgets.max_latency_ms
        for bigger in ladder[ladder.index(choice.student) + 1 :]:
            cost = zoo.estimate_cost(bigger, shape, 10)
            assert (
                cost.params > budgets.max_params
                or cost.train_memory_bytes > budgets.max_train_memory_mb * 2**20
                or picking.estimate_latency_ms(cost, profile) > budgets.max_latency_ms
            )


def test_latency_budget_binds_for_larger_inputs(catalog: dict[str, profiles.DeviceProfile]) -> None:
    nano = catalog["jetson-nano-4gb"]
    big = zoo.estimate_cost("cnn-l", (3, 48, 48), 10)
    assert big.params <= nano.budgets.max_params
    assert picking.estimate_latency_ms(big, nano) > nano.budgets.max_latency_ms
    choice = picking.pick_student(nano, (3, 48, 48), 10)
    assert choice.student == "cnn-m" and choice.binding == "latency"


def test_latency_estimate_follows_the_documented_formula(
    catalog: dict[str, profiles.DeviceProfile],
) -> None:
    cost = zoo.estimate_cost("cnn-m", *DIGITS)
    pi4, nano = catalog["pi-4-4gb"], catalog["jetson-nano-4gb"]
    assert picking.estimate_latency_ms(cost, pi4) == pytest.approx(
        cost.flops / (37.4e9 * picking.EFFICIENCY["cpu"]) * 1e3 + picking.CALL_OVERHEAD_MS["cpu"]
    )
    assert picking.estimate_latency_ms(cost, nano) == pytest.approx(
        cost.flops / (165e9 * picking.EFFICIENCY["gpu"]) * 1e3 + picking.CALL_OVERHEAD_MS["gpu"]
    )
    # a profile without sustained_gflops is derated by the documented default
    assert dataclasses.replace(pi4, sustained_gflops=None).sustained == pytest.approx(
        57.6 * profiles.DEFAULT_SUSTAINED_FRACTION)


def test_tiny_budget_raises_a_helpful_error(catalog: dict[str, profiles.DeviceProfile]) -> None:
    tiny = with_budgets(catalog["pi-zero-2w"], max_params=500)
    with pytest.raises(picking.NoStudentFitsError) as info:
        picking.pick_student(tiny, *DIGITS)
    message = str(info.value)
    assert "'pi-zero-2w'" in message
    assert "the smallest, cnn-xs, exceeds budgets.max_params (needs 3,706, budget 500)" in message
    assert re.search(r"Raise budgets\.max_params in \S*pi-zero-2w\.toml", message)
    assert "max_latency_ms" not in message  # only the budgets actually exceeded
    assert isinstance(info.value, profiles.ProfileError)


def test_describe_catalog_marks_profiles_without_a_fit(
    catalog: dict[str, profiles.DeviceProfile],
) -> None:
    squeezed = dict(catalog, **{"pi-zero-2w": with_budgets(catalog["pi-zero-2w"], max_latency_ms=0.01)})
    choices = {c.profile.name: c for c in picking.describe_catalog(*DIGITS, squeezed)}
    zero = choices["pi-zero-2w"]
    assert zero.student is None and zero.cost is None and zero.latency_ms is None
    assert "budgets.max_latency_ms" in zero.reason
    assert choices["pi-5-8gb"].student == "cnn-l" and choices["pi-5-8gb"].reason is None


def test_inference_only_profiles_ignore_the_training_memory_budget(tmp_path: Path) -> None:
    text = edited(r"^can_train = .*$", "can_train = false")
    text = re.sub(r"^max_train_memory_mb = .*$", "max_train_memory_mb = 0.25", text, flags=re.M)
    viewer = profiles.load_profile(write_profile(tmp_path, text, name="kiosk"))
    assert viewer.can_train is False
    choice = picking.pick_student(viewer, *DIGITS)
    assert choice.inference_only is True
    assert choice.student == "cnn-m"  # limited by max_params only
    assert choice.cost.train_memory_bytes > 0.25 * 2**20

    trainer = dataclasses.replace(viewer, can_train=True)
    with pytest.raises(picking.NoStudentFitsError, match="budgets.max_train_memory_mb"):
        picking.pick_student(trainer, *DIGITS)


def test_tabular_inputs_use_the_mlp_zoo(catalog: dict[str, profiles.DeviceProfile]) -> None:
    choice = picking.pick_student(catalog["pi-zero-2w"], (13,), 3)
    assert choice.student == "mlp-s"
    assert picking.pick_student(catalog["x86-gateway"], (13,), 3).student == "mlp-xl"


# --------------------------------------------------------------------------- binding budgets


def test_the_parameter_budget_binds(catalog: dict[str, profiles.DeviceProfile]) -> None:
    choice = picking.pick_student(catalog["pi-5-8gb"], (3, 32, 32), 10)
    assert (choice.student, choice.binding) == ("res-m", "params")
    bigger = zoo.estimate_cost("res-l", (3, 32, 32), 10)
    assert bigger.params > catalog["pi-5-8gb"].budgets.max_params


def test_the_training_memory_budget_binds_and_follows_the_batch_size(
    catalog: dict[str, profiles.DeviceProfile],
) -> None:
    roomy = with_budgets(catalog["jetson-agx-orin-64gb"], max_train_memory_mb=100.0)
    choice = picking.pick_student(roomy, (3, 32, 32), 10)
    assert (choice.student, choice.binding) == ("res-m", "train_memory")
    assert choice.cost.train_memory_bytes <= 100 * 2**20
    # smaller batches keep fewer activations: the same budget then fits a larger student
    small_batches = picking.pick_student(roomy, (3, 32, 32), 10, batch_size=8)
    assert small_batches.student == "res-xl" and small_batches.cost.batch_size == 8
    cost = small_batches.cost
    assert cost.train_memory_bytes == 4 * cost.weight_bytes + 8 * cost.activation_bytes * 2


def test_the_latency_budget_binds(catalog: dict[str, profiles.DeviceProfile]) -> None:
    hurried = with_budgets(catalog["jetson-agx-orin-64gb"], max_latency_ms=1.0)
    choice = picking.pick_student(hurried, (3, 32, 32), 10)
    assert choice.binding == "latency" and choice.latency_ms <= 1.0
    ladder = zoo.zoo_for((3, 32, 32))
    larger = zoo.estimate_cost(ladder[ladder.index(choice.student) + 1], (3, 32, 32), 10)
    assert picking.estimate_latency_ms(larger, hurried) > 1.0


def test_the_largest_student_is_bound_by_no_budget(
    catalog: dict[str, profiles.DeviceProfile],
) -> None:
    choice = picking.pick_student(catalog["jetson-agx-orin-64gb"], (3, 32, 32), 10)
    assert (choice.student, choice.binding) == ("res-xl", picking.LARGEST)
    assert choice.cost.params >= 1_000_000
