"""A federation's own students (``[federation] zoo``): measured at provisioning, picked with the
built-in ones, copied into every kit under its signed manifest, built by the devices from the
kit's copy; and the federation file's batch size in the training-memory budget."""

from __future__ import annotations

import json
import shutil

import pytest
from kit_helpers import AGENT, DEVICES, REPO, federation_file
from typer.testing import CliRunner

from fededge.cli.app import app
from fededge.config import FederationConfig
from fededge.kits.device import _local_data, load_kit_zoo
from fededge.kits.fedfile import FederationFileError
from fededge.kits.kit import KitError, load_kit
from fededge.kits.manifest import verify_manifest
from fededge.kits.provision import provision
from fededge.learn import zoo
from fededge.learn.picking import pick_student
from fededge.learn.userzoo import load_user_zoo
from fededge.profiles import get_profile

EXTRA = "pi4-garage"  # kit_helpers' extra device, a pi-4-4gb: my_zoo's my-mlp fits it best


@pytest.fixture(autouse=True)
def _forget_user_students():
    yield
    zoo.forget_registered()


def _measure(path, input_shape, num_classes):
    return {s.name: s.figures for s in load_user_zoo(path, input_shape, num_classes)}


def _zoo_federation(tmp_path, zoo_line='zoo = "my_zoo.py"'):
    shutil.copy(REPO / "examples" / "my_zoo.py", tmp_path / "my_zoo.py")
    path = federation_file(tmp_path, extra_device=True, settings="rounds = 1")
    path.write_text(path.read_text().replace('name = "demo"', f'name = "demo"\n{zoo_line}', 1))
    return path


def test_a_zoo_file_is_picked_from_shipped_in_every_kit_and_signed(tmp_path):
    kits = tmp_path / "kits"
    result = provision(_zoo_federation(tmp_path), kits, measure_zoo=_measure)
    students = {d.id: d.student for d in result.devices}
    assert students[EXTRA] == "my-mlp", students
    assert students[DEVICES[0]] == "cnn-l"  # built-ins still compete
    source = (tmp_path / "my_zoo.py").read_bytes()
    for party in ("server", *DEVICES, EXTRA, AGENT):
        assert (kits / party / "zoo.py").read_bytes() == source
        assert "zoo.py" in json.loads((kits / party / "manifest.json").read_text())["files"]
        assert verify_manifest(kits / party).problems == []
    kit = load_kit(kits / EXTRA)
    assert kit.zoo == "zoo.py" and set(kit.zoo_students) == {"my-mlp", "my-sepconv"}
    assert kit.zoo_students["my-mlp"].params == zoo.estimate_cost(
        "my-mlp", (1, 8, 8), 10).params

    # A fresh device process knows nothing of my-mlp until it loads the kit's copy.
    zoo.forget_registered()
    _, split, _ = _local_data(kit, None)
    load_kit_zoo(kit, split)
    from fededge.federation.wiring import student_trainer
    trainer = student_trainer(kit.student, split.input_shape, split.num_classes,
                              FederationConfig(federation="demo", num_classes=10,
                                               input_shape=(1, 8, 8)), kit.seed)
    assert sum(p.numel() for p in trainer.model.parameters()) == \
        kit.zoo_students["my-mlp"].params

    # An edited zoo.py is refused by verify-kit like any kit file, and by the device.
    edited = kits / EXTRA / "zoo.py"
    edited.write_text(edited.read_text().replace("256", "300"))  # a wider my-mlp
    out = CliRunner().invoke(app, ["verify-kit", str(kits / EXTRA)])
    assert out.exit_code == 1 and "zoo.py: changed" in out.output, out.output
    zoo.forget_registered()
    with pytest.raises(KitError, match="'my-mlp' has .* provisioning measured 50,826"):
        load_kit_zoo(kit, split)


def test_provisioning_with_a_zoo_without_torch_or_file_says_what_to_do(tmp_path):
    path = _zoo_federation(tmp_path)
    with pytest.raises(FederationFileError, match=r"line \d+: zoo: .*needs torch.*fededge\[train\]"):
        provision(path, tmp_path / "kits")
    missing = _zoo_federation(tmp_path, 'zoo = "nowhere.py"')
    with pytest.raises(FederationFileError, match=r"line \d+: zoo '.*nowhere.py': cannot read"):
        provision(missing, tmp_path / "kits")
    assert not (tmp_path / "kits").exists()


def test_provisioning_budgets_training_memory_at_the_files_batch_size(tmp_path):
    path = federation_file(tmp_path, extra_device=True, settings="batch_size = 8192")
    result = provision(path, tmp_path / "kits")
    picked = {d.id: d.student for d in result.devices}
    at_default = pick_student(get_profile("pi-4-4gb"), (1, 8, 8), 10).student
    at_8192 = pick_student(get_profile("pi-4-4gb"), (1, 8, 8), 10, 8192)
    assert picked[EXTRA] == at_8192.student != at_default
    assert at_8192.binding == "train_memory"
