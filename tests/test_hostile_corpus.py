"""The hostile-input corpus of issue 17: bad .npz files, --set values, federation files, paths
and MQTT payloads. Every case must end in one line ``error: ...`` naming the bad input, a
non-zero status, no traceback, and nothing left behind that blocks the next good run (each
category ends with a good run in the same place). CLI cases run in-process (typer's
CliRunner), so the corpus costs seconds. ``CORPUS`` counts the cases per category."""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from pathlib import Path

import killers
import numpy as np
import pytest
from kit_helpers import EXAMPLE
from typer.testing import CliRunner

from fededge.cli.app import app
from fededge.config import FederationConfig
from fededge.federation.server import FederationServer
from fededge.federation.store import Store
from fededge.federation.strategies.fedmd import FedMDServer
from fededge.transport.memory import MemoryHub
from fededge.wire import envelope as proto

CORPUS: Counter[str] = Counter()
runner = CliRunner()


def rejected(args: list[str], *named: str) -> str:
    """Run the command; assert the one-line, named, traceback-free refusal."""
    result = runner.invoke(app, args)
    out = result.output.strip()
    assert result.exit_code not in (0, None), f"silent acceptance of {args}: {out[-500:]}"
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"traceback for {args}: {result.exception!r}"
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and out.endswith(errors[0]), \
        f"{args}: {out[-800:]}"  # at most a progress line before it
    for name in named:
        assert name in out, f"{args}: the error does not name {name!r}: {out}"
    return out


# ----------------------------------------------------------------------------- .npz files

def _npy(array=None, *, shape=None, descr="<f4", extra: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    if array is not None:
        np.save(buffer, array, allow_pickle=True)
        return buffer.getvalue() + extra
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + extra


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


RNG = np.random.default_rng(0)
X_OK, Y_OK = RNG.random((60, 1, 8, 8)).astype(np.float32), np.arange(60) % 3
NPZ_CASES: dict[str, object] = {
    "not-a-zip": b"hello, not a zip",
    "empty-file": b"",
    "truncated-zip": "truncated",
    "text-members": {"X.npy": b"hello", "y.npy": b"world"},
    "huge-shape": {"X.npy": _npy(shape=(10**7, 3, 800, 800)), "y.npy": _npy(np.arange(4))},
    "shape-larger-than-data": {"X.npy": _npy(shape=(60, 1, 8, 8), extra=b"\0" * 100),
                               "y.npy": _npy(Y_OK)},
    "shape-smaller-than-data": {"X.npy": _npy(shape=(1, 1, 8, 8), extra=b"\0" * 10_000),
                                "y.npy": _npy(Y_OK)},
    "negative-looking-shape": {"X.npy": _npy(shape=(2**62, 2**62)), "y.npy": _npy(Y_OK)},
    "object-X": {"X.npy": _npy(np.array([{"a": 1}] * 60, dtype=object)), "y.npy": _npy(Y_OK)},
    "object-y": {"X.npy": _npy(X_OK), "y.npy": _npy(np.array(list(Y_OK), dtype=object))},
    "missing-X": {"y.npy": _npy(Y_OK)},
    "missing-y": {"X.npy": _npy(X_OK)},
    "no-members": {},
    "bad-npy-version": {"X.npy": b"\x93NUMPY\x09\x00" + b"\0" * 100, "y.npy": _npy(Y_OK)},
    "bad-header-literal": {"X.npy": b"\x93NUMPY\x01\x00\x10\x00{'a': __import__}\n",
                           "y.npy": _npy(Y_OK)},
}
for name, X, y in [
    ("sequence-too-short", X_OK[:, 0, :, :4], Y_OK), ("X-1d", X_OK.reshape(-1)[:60], Y_OK),
    ("X-5d", X_OK[:, None], Y_OK), ("X-empty", X_OK[:0], Y_OK[:0]),
    ("X-strings", np.array([["a"]] * 60), Y_OK), ("X-complex", X_OK.astype(np.complex64), Y_OK),
    ("X-nan", np.where(X_OK > 0.99, np.nan, X_OK), Y_OK),
    ("X-inf", np.where(X_OK > 0.99, np.inf, X_OK), Y_OK),
    ("X-overflow", X_OK.astype(np.float64) * 1e300, Y_OK),
    ("image-4x4", RNG.random((60, 1, 4, 4)), Y_OK), ("image-7x8", RNG.random((60, 1, 7, 8)), Y_OK),
    ("image-1x1", RNG.random((60, 3, 1, 1)), Y_OK), ("zero-channels", RNG.random((60, 0, 8, 8)),
                                                     Y_OK),
    ("zero-features", RNG.random((60, 0)), Y_OK),
    ("y-2d", X_OK, np.stack([Y_OK, Y_OK], 1)), ("y-short", X_OK, Y_OK[:59]),
    ("y-fractional", X_OK, Y_OK + 0.5), ("y-nan", X_OK, np.where(Y_OK == 1, np.nan, Y_OK)),
    ("y-negative", X_OK, Y_OK - 1), ("y-one-based", X_OK, Y_OK + 1),
    ("y-gap", X_OK, Y_OK * 2), ("y-single-class", X_OK, np.zeros(60, int)),
    ("y-strings", X_OK, np.array(["a", "b", "c"] * 20)),
    ("y-complex", X_OK, Y_OK.astype(np.complex64)),
    ("y-huge", X_OK, np.where(Y_OK == 2, 2**62, Y_OK)),
]:
    NPZ_CASES[name] = {"X.npy": _npy(X), "y.npy": _npy(y)}
for name, public in [("public-other-shape", RNG.random((30, 1, 9, 9))),
                     ("public-nan", np.full((30, 1, 8, 8), np.nan)),
                     ("public-3d", RNG.random((30, 8, 8))), ("public-empty", X_OK[:0])]:
    NPZ_CASES[name] = {"X.npy": _npy(X_OK), "y.npy": _npy(Y_OK), "X_public.npy": _npy(public)}
for name, names in [("names-wrong-count", np.array(["a", "b"])),
                    ("names-numbers", np.arange(3)), ("names-2d", np.array([["a", "b", "c"]]))]:
    NPZ_CASES[name] = {"X.npy": _npy(X_OK), "y.npy": _npy(Y_OK), "class_names.npy": _npy(names)}


@pytest.mark.parametrize("name", sorted(NPZ_CASES))
def test_npz(tmp_path, name):
    case = NPZ_CASES[name]
    path = tmp_path / f"{name}.npz"
    if isinstance(case, bytes):
        path.write_bytes(case)
    elif case == "truncated":
        np.savez(path, X=X_OK, y=Y_OK)
        path.write_bytes(path.read_bytes()[:400])
    else:
        _zip(path, case)
    rejected(["devices", "--data", str(path)], str(path))
    CORPUS["npz"] += 1


def test_npz_good_run_after_the_bad_ones(tmp_path):
    path = tmp_path / "good.npz"
    np.savez(path, X=X_OK, y=Y_OK)
    assert runner.invoke(app, ["devices", "--data", str(path)]).exit_code == 0


# ----------------------------------------------------------------------------- --set values

INT_BAD = ["abc", "", "2.5", "true", "1e3", "Infinity", "NaN", "-1", "[1]", '{"a": 1}',
           "18446744073709551616", "10**9"]
FLOAT_BAD = ["abc", "", "true", "Infinity", "-Infinity", "NaN", "1e309", "[1.0]", "-1",
             "1e30"]
SET_CASES = (
    [f"rounds={v}" for v in INT_BAD + ["0", "100001"]]
    + [f"batch_size={v}" for v in INT_BAD + ["0", "big"]]
    + [f"warmup_epochs={v}" for v in INT_BAD]
    + [f"max_attempts={v}" for v in INT_BAD + ["0"]]
    + [f"seed={v}" for v in INT_BAD + ["4294967296"]]
    + [f"lr={v}" for v in FLOAT_BAD + ["0", "1e-400", "2"]]
    + [f"deadline_s={v}" for v in FLOAT_BAD + ["0", "1e9"]]
    + [f"era_temperature={v}" for v in FLOAT_BAD + ["1e-30", "0"]]
    + [f"temperature={v}" for v in FLOAT_BAD + ["0", "1e-300"]]
    + [f"quorum={v}" for v in FLOAT_BAD + ["0", "1.5"]]
    + [f"resend_s={v}" for v in ["1e-300", "0.01", "-1", "Infinity", "abc"]]
    + [f"share_class_counts={v}" for v in ["1", "0", "yes", "", "null", "[true]"]]
    + [f"logit_codec={v}" for v in ["zip", "", "1", "FLOAT16"]]
    + [f"student={v}" for v in ["a/b", "a b", "#", "+", "x" * 65, ".hidden", "1"]]
    + [f"{k}=1" for k in ("num_classes", "input_shape", "federation", "run_id", "proxy_size",
                          "proxy_sha256", "colour", "")]
    + ["input_shape=[3,32,32]", "num_classes=3", "federation=a/b", "federation=x%0a",
       "rounds", "=5", "lr", "ldp_delta=1", "ldp_delta=0", "ldp_clip=0", "kd_alpha=2"]
)


@pytest.mark.parametrize("item", SET_CASES)
def test_set(tmp_path, item):
    out = tmp_path / "run"
    rejected(["simulate", "--clients", "2", "--rounds", "1", "--no-baselines", "--out",
              str(out), "--set", item], "--set")
    assert not out.exists(), "a refused --set left a run directory behind"
    CORPUS["--set"] += 1


# ----------------------------------------------------------------------------- federation files

FED_EDITS = [
    ("[training]", "[training]\ndeadline_s = inf"), ("[training]", "[training]\ndeadline_s = nan"),
    ("[training]", "[training]\nresend_s = 1e-300"), ("[training]", "[training]\nrounds = 2.5"),
    ("[training]", "[training]\nrounds = \"5\""), ("[training]", "[training]\nrounds = true"),
    ("[training]", "[training]\nlr = 1e30"), ("[training]", "[training]\nlr = -1.0"),
    ("[training]", "[training]\nnum_classes = 3"), ("[training]", "[training]\ninput_shape = [3, 32, 32]"),
    ("[training]", "[training]\nrun_id = \"x\""), ("[training]", "[training]\ncolour = \"red\""),
    ("[training]", "[training]\nera_temperature = 1e-30"),
    ("[training]", "[training]\nbatch_size = 9223372036854775807"),
    ("[training]", "[training]\nstrategy = \"a/b\""), ("[training]", "[training]\nstudent = \"x\\n\""),
    ("[training]", "[training]\nlogit_codec = \"zip\""), ("[training]", "[training]\nquorum = 0"),
    ('id = "jetson-lab"', 'id = "manifest.json"'), ('id = "jetson-lab"', 'id = "a1\\n"'),
    ('id = "jetson-lab"', 'id = "ca"'), ('id = "jetson-lab"', 'id = "server"'),
    ('id = "jetson-lab"', 'id = "BROKER"'), ('id = "jetson-lab"', 'id = ""'),
    ('id = "jetson-lab"', 'id = "a/b"'), ('id = "jetson-lab"', 'id = "+"'),
    ('id = "jetson-lab"', 'id = ".x"'), ('id = "jetson-lab"', 'id = 5'),
    ('id = "jetson-lab"', 'id = "' + "x" * 65 + '"'), ('id = "jetson-lab"', 'id = "a b"'),
    ('id = "jetson-lab"', 'id = "pi5-kitchen"'),
    ('bind = "127.0.0.1"', 'bind = "127.0.0.1\\nlistener 1884"'),
    ('bind = "127.0.0.1"', 'bind = "0.0.0.0 1884"'), ('bind = "127.0.0.1"', 'bind = 5'),
    ("tls_port = 8883", "tls_port = 70000"), ("tls_port = 8883", "tls_port = 0"),
    ("tls_port = 8883", "tls_port = \"8883\""), ("tls_port = 8883", "tls_port = 8883.0"),
    ("tls_port = 8883", "tls_port = 8883\nplain_port = 8883"),
    ("tls_port = 8883", "tls_port = 8883\nplain_port = -1"),
    ("tls_port = 8883", "tls_port = 8883\nalt_names = [\"a\\nb\"]"),
    ("tls_port = 8883", "tls_port = 8883\nalt_names = \"a\""),
    ('# user = "mosquitto"', 'user = "root\\nallow_anonymous true"'),
    ('# user = "mosquitto"', 'user = "ro ot"'),
    ('profile = "x86-gateway"', 'profile = "pi-9"'), ('profile = "x86-gateway"', 'profile = 5'),
    ('profile = "x86-gateway"', 'profile = "x\\u0007"'),
    ('profile = "pi-5-8gb"', 'proifle = "pi-5-8gb"'),
    ('role = "agent"', 'role = "server"'), ('model_from = "pi5-kitchen"', 'model_from = "nobody"'),
    ('model_from = "pi5-kitchen"', 'model_from = "zero-kiosk"'),
    ('name = "demo"', 'name = "a/b"'), ('name = "demo"', 'name = "demo\\n"'),
    ('name = "demo"', 'name = ""'), ('name = "demo"', 'name = 7'),
    ('name = "demo"', 'name = "demo"\nextra = 1'),
    ("[dataset]", "[dataset]\nalpha = 0"), ("[dataset]", "[dataset]\nalpha = inf"),
    ("[dataset]", "[dataset]\nseed = -1"), ("[dataset]", "[dataset]\nseed = 1.5"),
    ("[dataset]", "[dataset]\npartition = \"random\""),
    ("[dataset]", "[dataset]\nextra = 1"),
]
FED_FILES = {
    "binary": b"\x00\xff\xfe" * 50, "empty": b"", "not-toml": b"this is = = not toml",
    "latin-1": "name = \"d\xe9mo\"".encode("latin-1"), "only-federation": b"[federation]\nname = \"x\"\n",
    "devices-not-a-list": EXAMPLE.read_bytes().split(b"[[devices]]")[0] + b"devices = 5\n",
}


def _provision_refused(tmp_path: Path, path: Path, *named: str) -> None:
    out = tmp_path / "kits"
    rejected(["provision", str(path), "--out", str(out)], str(path), *named)
    assert not out.exists(), "a refused provision left kits behind"


@pytest.mark.parametrize("old, new", FED_EDITS)
def test_federation_file_edit(tmp_path, old, new):
    text = EXAMPLE.read_text()
    assert old in text, old
    path = tmp_path / "federation.toml"
    path.write_text(text.replace(old, new))
    _provision_refused(tmp_path, path)
    CORPUS["federation file"] += 1


@pytest.mark.parametrize("name", sorted(FED_FILES))
def test_federation_file_whole(tmp_path, name):
    path = tmp_path / f"{name}.toml"
    path.write_bytes(FED_FILES[name])
    _provision_refused(tmp_path, path)
    CORPUS["federation file"] += 1


def test_federation_file_good_run_after_refusals(tmp_path):
    path = tmp_path / "federation.toml"
    path.write_text(EXAMPLE.read_text().replace('id = "jetson-lab"', 'id = "manifest.json"'))
    rejected(["provision", str(path), "--out", str(tmp_path / "kits")])
    result = runner.invoke(app, ["provision", str(EXAMPLE), "--out", str(tmp_path / "kits")])
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------- paths

def _paths(tmp: Path) -> list[tuple[list[str], str]]:
    afile, adir, binary = tmp / "a-file", tmp / "a-dir", tmp / "binary.toml"
    afile.write_text("x")
    adir.mkdir(exist_ok=True)
    binary.write_bytes(b"\x00\x01\x02\xff")
    missing = str(tmp / "missing")
    return [
        (["simulate", "--out", str(afile), "--clients", "2", "--rounds", "1"], str(afile)),
        (["simulate", "--data", str(adir), "--out", str(tmp / "r")], str(adir)),
        (["simulate", "--data", missing + ".npz", "--out", str(tmp / "r")], missing),
        (["simulate", "--data", "mnist", "--out", str(tmp / "r")], "mnist"),
        (["devices", "--data", str(afile)], str(afile)),
        (["devices", "--data", str(adir) + ".npz"], str(adir)),
        (["provision", str(binary), "--out", str(tmp / "k")], str(binary)),
        (["provision", str(adir), "--out", str(tmp / "k")], str(adir)),
        (["provision", missing, "--out", str(tmp / "k")], missing),
        (["provision", str(EXAMPLE), "--out", str(afile)], str(afile)),
        (["verify-kit", missing], missing), (["verify-kit", str(afile)], str(afile)),
        (["server", "--kit", str(adir)], str(adir)), (["server", "--kit", missing], missing),
        (["client", "--kit", str(adir)], str(adir)), (["client", "--kit", str(afile)], str(afile)),
        (["agent", "--kit", str(adir)], str(adir)), (["agent", "--kit", missing], missing),
        (["export", str(adir)], str(adir)), (["export", missing], missing),
        (["infer", str(adir), str(afile)], str(adir)),
    ]


def test_paths(tmp_path):
    cases = _paths(tmp_path)
    for args, named in cases:
        rejected(args, named)
        CORPUS["paths"] += 1
    assert (tmp_path / "a-file").read_text() == "x", "a refused command wrote over a file"


# ----------------------------------------------------------------------------- MQTT payloads

def test_mqtt_payloads():
    """Every payload the server is handed is recorded with a one-line reason; the server goes
    on and still accepts a good upload afterwards."""
    import test_fuzz  # the 29 rule-breaking variants of the live fuzz test

    config = FederationConfig(rounds=2, proxy_size=16, proxy_sha256="0" * 64,
                              logit_codec="float16")  # the corpus uploads are float16
    topics = proto.Topics(config.federation)
    server = FederationServer(MemoryHub().connect("server"), config, FedMDServer(config),
                              expected_clients=2, store=Store())
    server._open = server._prepare(1)
    hostile = test_fuzz.HostilePayloads(topics, 16, 10, config.run_id)
    cases = [pair for i in range(3) for pair in hostile._variants(i)]
    cases += [(topics.presence("dev0"), killers.deep_nesting()),
              (topics.up("dev0"), killers.deep_nesting()),
              (topics.up("dev0"), killers.huge_round("dev0", config.run_id, 16, 10)),
              (topics.up("dev0"), killers.wrapping_counts("dev0", 1, config.run_id, 16, 10)),
              (topics.up("dev0"), killers.lying_metrics("dev0", 1, config.run_id))]
    for topic, payload in cases:
        before = server.store.count("rejected")
        server._handle(topic, payload)
        assert server.store.count("rejected") == before + 1, f"silent acceptance on {topic}"
        CORPUS["mqtt payloads"] += 1
    reasons = [r for _, _, status, r in server.store.submissions() if status == "rejected"]
    assert all(r and "\n" not in r for r in reasons)
    good = killers._upload("dev1", 1, {"samples": 10, "run_id": config.run_id, "attempt": 1},
                           {"logits": np.zeros((16, 10), np.float16),
                            "class_counts": np.full(10, 1, np.int64)})
    server._handle(topics.up("dev1"), good)
    assert "dev1" in server._open.replies


def test_corpus_size():
    """Runs last in this module: at least 300 cases, counted by category."""
    expected = {"npz": len(NPZ_CASES), "--set": len(SET_CASES),
                "federation file": len(FED_EDITS) + len(FED_FILES)}
    total = sum(expected.values()) + 21 + 92
    print(f"hostile-input corpus: {dict(expected)}, paths 21, mqtt payloads 92; total {total}")
    assert total >= 300
