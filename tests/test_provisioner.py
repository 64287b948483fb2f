"""Provisioning as an ordered list of builders over a staging copy of OUT (kits/provisioner.py):
the phase order, and that OUT changes only when every builder succeeded."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from kit_helpers import federation_file

from fededge.kits.fedfile import load_federation_file
from fededge.kits.kit import load_kit
from fededge.kits.manifest import verify_manifest
from fededge.kits.provision import ProvisionContext, ProvisionError, builders, provision
from fededge.kits.provisioner import Builder, Context, Provisioner


def _tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path below ``root`` with its mode and, for files, its bytes."""
    return {str(p.relative_to(root)): (stat.S_IMODE(p.lstat().st_mode),
                                       p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if ".provision-" in p.name]


class Recorder(Builder):
    def __init__(self, name: str, log: list[str], fail: str | None = None) -> None:
        self.name, self.log, self.fail = name, log, fail

    def _step(self, phase: str, ctx: Context) -> None:
        self.log.append(f"{phase} {self.name}")
        (ctx.root / f"{phase}-{self.name}").write_text("x")
        if phase == self.fail:
            raise ProvisionError(f"{self.name} fails in {phase}")

    def initialize(self, ctx: Context) -> None:
        self._step("initialize", ctx)

    def build(self, ctx: Context) -> None:
        self._step("build", ctx)

    def finalize(self, ctx: Context) -> None:
        self._step("finalize", ctx)


def test_builders_initialize_and_build_in_order_and_finalize_in_reverse(tmp_path):
    log: list[str] = []
    out = tmp_path / "out"
    ctx = Provisioner([Recorder("a", log), Recorder("b", log)]).provision(Context(out=out))
    assert log == ["initialize a", "initialize b", "build a", "build b",
                   "finalize b", "finalize a"]
    assert ctx.root.parent.parent == tmp_path and ctx.root.name == "out"  # staged beside OUT
    assert sorted(p.name for p in out.iterdir()) == sorted(e.replace(" ", "-") for e in log)
    assert _leftovers(out) == []


@pytest.mark.parametrize("phase", ["initialize", "build", "finalize"])
def test_a_failing_builder_leaves_out_as_it_was(tmp_path, phase):
    kits, federation = tmp_path / "kits", federation_file(tmp_path)
    provision(federation, kits)
    (kits / "pi5-kitchen" / "state").mkdir()
    (kits / "pi5-kitchen" / "state" / "student.json").write_text("{}")
    before = _tree(kits)
    log: list[str] = []
    ctx = ProvisionContext(out=kits, spec=load_federation_file(federation), revoke=["jetson-lab"])
    with pytest.raises(ProvisionError, match=f"fails in {phase}"):
        Provisioner([*builders(), Recorder("last", log, fail=phase)]).provision(ctx)
    assert _tree(kits) == before and _leftovers(kits) == []
    assert not ctx.root.exists()


def test_interrupted_provisioning_leaves_out_as_it_was(tmp_path):
    kits, federation = tmp_path / "kits", federation_file(tmp_path)
    provision(federation, kits)
    before = _tree(kits)

    class CtrlC(Builder):
        def build(self, ctx: Context) -> None:
            raise KeyboardInterrupt
    more = federation_file(tmp_path, extra_device=True)
    ctx = ProvisionContext(out=kits, spec=load_federation_file(more), revoke=["gateway-1"])
    with pytest.raises(KeyboardInterrupt):
        Provisioner([*builders()[:-1], CtrlC(), builders()[-1]]).provision(ctx)
    assert _tree(kits) == before and _leftovers(kits) == []


def test_bad_input_on_a_second_run_changes_nothing_and_errors_name_out(tmp_path):
    kits = tmp_path / "kits"
    provision(federation_file(tmp_path, extra_device=True), kits)
    before = _tree(kits)
    with pytest.raises(ProvisionError) as err:  # pi4-garage left the file without --revoke
        provision(federation_file(tmp_path), kits)
    assert str(err.value).startswith(f"{kits / 'pi4-garage'}: device 'pi4-garage' has a kit")
    (kits / "ca" / "ca.key").rename(tmp_path / "ca.key")
    before = _tree(kits)
    with pytest.raises(ProvisionError, match=f"^{kits / 'ca'}: holds only one of ca.crt"):
        provision(federation_file(tmp_path, extra_device=True), kits)
    assert _tree(kits) == before and _leftovers(kits) == []


def test_runtime_state_is_moved_not_copied_and_goes_with_a_revoked_kit(tmp_path):
    kits, federation = tmp_path / "kits", federation_file(tmp_path)
    provision(federation, kits)
    for device in ("pi5-kitchen", "jetson-lab"):
        (kits / device / "state").mkdir()
        (kits / device / "state" / "student.json").write_text(device)
    kept = (kits / "pi5-kitchen" / "state" / "student.json").stat().st_ino
    with open(kits / "pi5-kitchen" / "state" / "student.json", "a") as open_file:
        provision(federation, kits, revoke=["jetson-lab"])
        open_file.write(" still open")  # a running client's file stays the file in OUT
    state = kits / "pi5-kitchen" / "state" / "student.json"
    assert state.stat().st_ino == kept and state.read_text() == "pi5-kitchen still open"
    assert not (kits / "jetson-lab").exists()
    assert verify_manifest(kits).problems == [] and _leftovers(kits) == []


def test_new_out_below_missing_directories_and_through_a_symlink(tmp_path):
    nested = tmp_path / "a" / "b" / "kits"
    path = tmp_path / "federation.toml"
    path.write_text(federation_file(tmp_path).read_text().replace('profile = "pi-5-8gb"',
                                                                  'profile = "pi-9"'))
    with pytest.raises(ValueError, match="unknown device profile 'pi-9'"):
        provision(path, nested)
    assert sorted(tmp_path.iterdir()) == [path]  # no directory made, no staging left
    provision(federation_file(tmp_path), nested)
    assert load_kit(nested / "server").devices

    real, link = tmp_path / "real-kits", tmp_path / "kits"
    provision(federation_file(tmp_path), real)
    link.symlink_to(real)
    result = provision(federation_file(tmp_path, extra_device=True), link)
    assert result.out == link and link.is_symlink() and os.readlink(link) == str(real)
    assert load_kit(real / "pi4-garage").device == "pi4-garage"
    assert _leftovers(real) == []
