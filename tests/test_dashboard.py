"""The dashboard as a user meets it: `fededge simulate --dashboard` in a real headless Chromium
while the federation runs, `/api/state`, the finished run's page, and the token on any address
but loopback. One small simulation is shared by the tests of this module."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fededge.dashboard.server import DashboardServer, is_loopback, required_token
from fededge.dashboard.state import Source, snapshot
from fededge.transport.brokers import free_port, wait_for_port

ROUNDS, CLIENTS = 8, 3
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is missing: `make test` installs it as root; "
                             "otherwise run: sudo apt-get install -y chromium")


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _state(url: str) -> dict:
    status, body = _get(url + "api/state")
    assert status == 200, body
    return json.loads(body)


def render(url: str, tmp: Path) -> str:
    """The page's DOM after its scripts ran, as headless Chromium rendered it."""
    profile = tmp / f"chromium-{time.monotonic_ns()}"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=4000",
         "--dump-dom", url], capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def shown_round(dom: str) -> int:
    match = re.search(r'id="round-label">round (\d+) of (\d+)<', dom)
    assert match, "no round progress in the rendered page:\n" + dom[:3000]
    assert int(match.group(2)) == ROUNDS
    return int(match.group(1))


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """`fededge simulate --dashboard PORT` in a subprocess; yields (process, url, run dir)."""
    out = tmp_path_factory.mktemp("dashboard") / "run"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fededge.cli", "simulate", "--clients", str(CLIENTS),
         "--rounds", str(ROUNDS), "--profiles", "pi-zero-2w,pi-4-4gb,pi-5-8gb",
         "--no-baselines", "--dashboard", str(port), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        assert wait_for_port("127.0.0.1", port, 120), proc.communicate(timeout=60)
        yield proc, url, out
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)


@needs_chromium
def test_the_page_shows_every_device_and_the_rounds_advancing(live_run, tmp_path):
    proc, url, out = live_run
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        state = _state(url)
        if state["progress"] and state["progress"]["completed"] >= 1 and len(state["devices"]) \
                == CLIENTS:
            dom = render(url, tmp_path)
            for device in state["devices"]:
                assert f"<td>{device['id']}</td>" in dom, device["id"]
            seen.append(shown_round(dom))
            if len(seen) >= 2 and seen[-1] > seen[0]:
                # While it runs, metrics.jsonl already holds the rounds it completed.
                lines = (out / "metrics.jsonl").read_text().splitlines()
                assert [json.loads(line)["round"] for line in lines] == list(range(len(lines)))
                assert len(lines) >= 2, lines
                break
        time.sleep(0.3)
    assert len(seen) >= 2 and seen[-1] > seen[0], \
        f"the rendered round did not advance during the run: {seen}"
    ids = {d["id"] for d in state["devices"]}
    assert ids == {f"dev00{i}-{p}" for i, p in enumerate(("pi-zero-2w", "pi-4-4gb",
                                                          "pi-5-8gb"))}


def test_api_state_has_the_documented_fields(live_run):
    proc, url, out = live_run
    state = _state(url)
    assert {"devices", "rounds", "progress", "rejections", "references"} <= set(state)
    for device in state["devices"]:
        assert {"id", "profile", "student", "params", "status", "last_seen", "accuracy",
                "bytes_up", "bytes_down", "rejected"} <= set(device)
    for row in state["rounds"]:
        assert {"round", "mean_accuracy", "min_accuracy", "max_accuracy", "bytes_up",
                "bytes_down"} <= set(row)
    assert state["rounds"] and state["source"] == {"kind": "run", "path": str(out),
                                                   "federation": None}


def test_the_finished_run_is_whole_on_disk_and_on_its_dashboard(live_run, tmp_path):
    proc, url, out = live_run
    proc.wait(timeout=300)
    assert proc.returncode == 0, proc.stderr.read()[-3000:] if proc.stderr else ""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "rounds.png").stat().st_size > 10_000
    with DashboardServer(Source.of(out)) as server:
        state = _state(server.url)
        assert state["status"] == "finished" and state["progress"]["completed"] == ROUNDS
        assert [r["round"] for r in state["rounds"]] == list(range(ROUNDS + 1))
        assert {d["id"] for d in state["devices"]} == {c["id"] for c in summary["clients"]}
        assert all(d["params"] == c["params"] for d, c in zip(
            sorted(state["devices"], key=lambda d: d["id"]),
            sorted(summary["clients"], key=lambda c: c["id"])))
        if CHROMIUM:
            assert shown_round(render(server.url, tmp_path)) == ROUNDS


def test_a_token_guards_any_address_but_loopback(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.7")
    assert required_token("127.0.0.1", None) is None
    assert len(required_token("0.0.0.0", None)) >= 16
    assert required_token("0.0.0.0", "mine") == "mine"
    (tmp_path / "run").mkdir()
    with DashboardServer(Source.of(tmp_path / "run"), token="s3cret") as server:
        base = f"http://127.0.0.1:{server.address.port}/"
        assert server.url == base + "?token=s3cret"
        assert _get(base + "api/state")[0] == 401
        assert _get(base)[0] == 401
        assert _get(base + "api/state", {"Authorization": "Bearer wrong"})[0] == 401
        assert _get(base + "api/state", {"Authorization": "Bearer s3cret"})[0] == 200
        assert _get(base + "api/state?token=s3cret")[0] == 200
        assert _get(base + "static/uPlot.iife.min.js")[0] == 200  # vendored, public code


def test_loopback_answers_only_its_own_host_name(tmp_path):
    (tmp_path / "run").mkdir()
    with DashboardServer(Source.of(tmp_path / "run")) as server:
        state = _state(server.url)
        assert state["status"] == "preparing" and state["devices"] == []
        status, _ = _get(server.url + "api/state", {"Host": "attacker.example"})
        assert status == 400  # DNS rebinding: a page of another site cannot read it


def test_the_state_of_a_store_as_a_server_writes_it(tmp_path):
    """Presence kept through a Last Will, a rejected upload with its reason, the open round,
    an ETA from the closed ones: what the page shows of a kit's server between rounds."""
    from fededge.config import FederationConfig
    from fededge.federation.store import Store

    store = Store(tmp_path)
    config, _ = store.begin(FederationConfig(rounds=4), {})
    store.set_presence("pi-a", "online", {"status": "online", "profile": "pi-5-8gb",
                                          "student": "cnn-l", "params": 89930})
    store.set_presence("pi-b", "online", {"status": "online", "profile": "pi-zero-2w",
                                          "student": "cnn-xs", "params": 3706})
    store.set_presence("pi-b", "offline", {"status": "offline"})  # its Last Will
    store.add_metrics(0, "pi-a", {"accuracy": 0.5, "bytes": {"sent_bytes": 10,
                                                             "received_bytes": 20}})
    store.open_attempt(1, 1, ["pi-a", "pi-b"])
    store.save_round(1, 1, ["pi-a", "pi-b"], b"consensus")
    store.add_metrics(1, "pi-a", {"accuracy": 0.75, "bytes": {"sent_bytes": 110,
                                                              "received_bytes": 220}})
    store.open_attempt(2, 1, ["pi-a"])
    store.record("fededge/demo/up/pi-a", b"x", "accepted", sender="pi-a", kind="upload", rnd=2,
                 attempt=1)
    store.record("fededge/demo/up/pi-b", b"junk", "rejected", reason="not a safetensors "
                 "envelope: header too short")
    store.close()

    state = snapshot(
        Source("kit", tmp_path, tmp_path, expected=("pi-a", "pi-b", "pi-c")))
    devices = {d["id"]: d for d in state["devices"]}
    assert list(devices) == ["pi-a", "pi-b", "pi-c"]
    assert devices["pi-b"]["status"] == "offline" and devices["pi-b"]["params"] == 3706
    assert devices["pi-b"]["rejected"] == 1 and devices["pi-a"]["rejected"] == 0
    assert devices["pi-a"]["accuracy"] == 0.75 and devices["pi-a"]["bytes_up"] == 110
    assert devices["pi-c"]["status"] == "not seen"
    assert state["rejections"][0]["device"] == "pi-b" and state["rejected_total"] == 1
    assert "header too short" in state["rejections"][0]["reason"]
    progress = state["progress"]
    assert progress["phase"] == "rounds" and progress["round"] == 2
    assert (progress["uploads"], progress["expected"], progress["completed"]) == (1, 1, 1)
    assert progress["eta_s"] is not None and state["status"] == "running"
    assert [r["round"] for r in state["rounds"]] == [0, 1]
    assert state["rounds"][1]["mean_accuracy"] == 0.75 and state["rounds"][1]["bytes_up"] == 100
