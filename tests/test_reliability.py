"""Persistence, resume, re-sends, quorum retries and stragglers, driven in-process (MemoryHub)
except the `fededge simulate` kill -9 test, which runs the real command twice."""

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import make_client, message_is, small_config, small_split

from fededge.federation.checkpoints import load_trainer_state, save_trainer_state
from fededge.federation.client import FederationClient
from fededge.federation.server import FederationError, FederationServer, ServerEvents
from fededge.federation.store import Store, StoreError
from fededge.federation.strategies.fedmd import FedMDServer
from fededge.learn.models import build_student
from fededge.learn.trainer import Trainer
from fededge.sim.recipe import SimulationOptions, plan_participants, slowdown
from fededge.transport import faults
from fededge.transport.memory import MemoryHub
from fededge.wire import envelope as proto

N = 3


@pytest.fixture(scope="module")
def split():
    return small_split(N)


class Crash(BaseException):
    """Stands in for kill -9: escapes every handler and leaves the store as it was."""


def _will(config, device):
    return FederationClient.last_will(config.federation, device)


def _clients(hub, split, config, tmp_path, wrap=lambda i, t: t):
    return [make_client(wrap(i, hub.connect(f"dev{i}", will=_will(config, f"dev{i}"))), split, i,
                        checkpoint_dir=tmp_path / f"dev{i}").start() for i in range(N)]


def _server(hub, config, store=None, **kw):
    return FederationServer(hub.connect("server"), config, FedMDServer(config),
                            expected_clients=N, store=store, **kw)


def _finish(clients):
    for c in clients:
        assert c.wait(30), f"{c.identity.device_id} did not finish"
        assert c.error is None, c.error


def _consensus_logits(store, rounds):
    return [proto.decode(store.consensus(r)).tensors["logits"].tobytes() for r in rounds]


def test_trainer_state_round_trips_through_safetensors(split, tmp_path):
    data = split.clients[0]
    a = make_client(MemoryHub().connect("x"), split, 0).trainer
    a.fit(data.X, data.y, epochs=2)
    save_trainer_state(a, tmp_path / "state.safetensors", {"round": 4})
    state, meta = load_trainer_state(tmp_path / "state.safetensors")
    torch.manual_seed(99)  # another initialisation and shuffling seed, overwritten by the state
    b = Trainer(build_student("cnn-xs", split.input_shape, split.num_classes), seed=99)
    b.load_state_dict(state)
    assert meta == {"round": 4}
    a.fit(data.X, data.y, epochs=1)   # continuing both must give identical weights: same
    b.fit(data.X, data.y, epochs=1)   # Adam moments, same shuffling RNG
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(wa, wb), name


def test_store_adopts_its_run_and_refuses_other_settings(split, tmp_path):
    config = small_config(split)
    store = Store(tmp_path)
    assert store.begin(config, {"clients": 3}) == (config, False)
    store.close()
    again = Store(tmp_path)
    adopted, resumed = again.begin(config.replace(run_id="another"), {"clients": 3})
    assert resumed and adopted.run_id == config.run_id, "a restart must keep the run id"
    # Before any round completed, other settings start afresh (nothing to resume)...
    fresh = config.replace(rounds=5, run_id="fresh")
    assert again.begin(fresh, {"clients": 3}) == (fresh, False)
    # ...once one did, they are refused: the completed rounds would be lost.
    again.begin(config, {"clients": 3})
    again.open_attempt(1, 1, ["dev0"])
    again.save_round(1, 1, ["dev0"], b"consensus")
    with pytest.raises(StoreError, match="other settings.*rounds 3 ≠ 5"):
        again.begin(config.replace(rounds=5), {"clients": 3})
    with pytest.raises(StoreError, match="clients 3 ≠ 4"):
        again.begin(config, {"clients": 4})


def test_a_tampered_consensus_file_is_refused(split, tmp_path):
    store = Store(tmp_path)
    store.begin(small_config(split), {})
    store.open_attempt(1, 1, ["dev0"])
    store.save_round(1, 1, ["dev0"], b"consensus bytes")
    assert store.consensus(1) == b"consensus bytes"
    (tmp_path / "consensus" / "round-0001.safetensors").write_bytes(b"consensus byteZ")
    with pytest.raises(StoreError, match="missing or altered"):
        store.consensus(1)


def test_server_killed_mid_round_resumes_it_and_matches_an_uninterrupted_run(split, tmp_path):
    reference_store = Store(tmp_path / "reference")
    hub = MemoryHub()
    clients = _clients(hub, split, small_config(split), tmp_path / "ref-clients")
    _server(hub, small_config(split), reference_store).run()
    _finish(clients)

    config = small_config(split)
    hub = MemoryHub()
    first = Store(tmp_path / "state")
    record = first.record

    def crash_after_first_round2_upload(topic, payload, status, **kw):
        record(topic, payload, status, **kw)
        if status == "accepted" and kw.get("kind") == "upload" and kw.get("rnd") == 2:
            raise Crash
    first.record = crash_after_first_round2_upload
    clients = _clients(hub, split, config, tmp_path / "clients")
    server = _server(hub, config, first)
    with pytest.raises(Crash):
        server.run()
    server.transport.close()
    first.close()

    store = Store(tmp_path / "state")   # a new process would open it afresh
    resumed = _server(hub, config.replace(run_id="fresh-id"), store)
    assert resumed.config.run_id == config.run_id and resumed.resumed_from_round == 2
    history = resumed.run()
    _finish(clients)
    assert [r.round for r in history] == [1, 2, 3]
    assert all(r.accepted == ["dev0", "dev1", "dev2"] for r in history)
    assert store.attempts() == [(1, 1, "closed"), (2, 1, "closed"), (3, 1, "closed")]
    assert store.count("accepted", "upload") == 9, "an upload was accepted twice or lost"
    assert _consensus_logits(store, [1, 2, 3]) == _consensus_logits(reference_store, [1, 2, 3])


def test_a_server_stopped_before_the_final_reports_gets_them_when_everything_restarts(
        split, tmp_path):
    """Stopped after the last consensus but before any final report reached its store, then
    resumed with devices restarted from checkpoints that already absorbed that consensus: the
    devices report again and the final round is not left without metrics."""
    config = small_config(split, rounds=2)
    hub = MemoryHub()
    first = Store(tmp_path / "state")

    def crash_on_final_reports(rnd, device, info):
        if rnd == config.rounds:
            raise Crash
        return Store.add_metrics(first, rnd, device, info)
    first.add_metrics = crash_on_final_reports
    clients = _clients(hub, split, config, tmp_path / "clients")
    server = _server(hub, config, first)
    with pytest.raises(Crash):
        server.run()
    _finish(clients)  # every device absorbed the final consensus and checkpointed it
    for c in clients:
        c.stop()
    server.transport.close()
    first.close()

    store = Store(tmp_path / "state")
    assert len(store.closed_rounds()) == config.rounds and config.rounds not in store.metrics()
    hub = MemoryHub()  # a new broker: nothing retained from before
    restarted = _clients(hub, split, config, tmp_path / "clients")
    _server(hub, config, store).run()
    _finish(restarted)
    assert sorted(store.metrics()[config.rounds]) == ["dev0", "dev1", "dev2"]


def test_lost_duplicate_and_late_uploads(split, tmp_path):
    """dev1's first upload is lost on the way: the server names it in `waiting_for` and dev1
    re-sends; dev2 sends everything twice; dev0's round-1 upload comes again after round 1
    closed. Nothing is counted twice, nothing waits for the deadline."""
    config = small_config(split, rounds=2, deadline_s=60, resend_s=0.5)
    hub = MemoryHub()
    topics = proto.Topics(config.federation)
    upload = message_is(proto.KIND_UPLOAD)
    rules = {1: [faults.Drop(topics.up("dev1"), when=upload, count=1)],
             2: [faults.Duplicate(topics.up("dev2"), when=upload)]}
    clients = _clients(hub, split, config, tmp_path,
                       lambda i, t: faults.FaultyTransport(t, *rules.get(i, [])))
    wire, sent_by_dev0 = hub.connect("replayer"), []  # a broker re-delivering dev0's upload

    def keep(topic, payload):
        if upload(topic, payload):
            sent_by_dev0.append(payload)
    wire.subscribe(topics.up("dev0"), keep)

    def replay_late(record):
        if record.round == 1:
            wire.publish(topics.up("dev0"), sent_by_dev0[0])
    server = _server(hub, config, events=ServerEvents(on_round_closed=replay_late))
    history = server.run()
    _finish(clients)
    assert all(r.accepted == ["dev0", "dev1", "dev2"] and r.attempts == 1 for r in history)
    assert history[0].seconds < config.deadline_s, "the round waited for its deadline"
    assert server.accepted_uploads == 6
    # dev2's second copies arrive while the round is open (duplicate) or just after it closed
    # (late); dev0's replay is late. Either way they are recorded, not used, not rejected.
    ignored = server.store.count("duplicate", "upload") + server.store.count("late", "upload")
    assert ignored >= 3 and server.store.count("late", "upload") >= 1
    assert not server.rejections


def _faulty(i, transport):
    """``_clients(wrap=...)``: every device on a FaultyTransport, without faults yet."""
    return faults.FaultyTransport(transport)


def _dies_after_round_1(client, then=lambda: None):
    """Make ``client`` (on a FaultyTransport) crash right after reporting round 1: the hub
    publishes its Last Will, nothing it sends or would receive passes any more."""
    def died():
        client.finished.set()  # its worker stops too, as the killed process's would
        then()
    client.transport.on_crash = died
    client.transport.add(faults.Crash(client.topics.up(client.identity.device_id),
                                      when=message_is(proto.KIND_METRICS, 1)))


def test_a_round_without_quorum_is_retried_never_faked(split, tmp_path):
    """quorum 1.0: dev2 dies after round 1, so round 2's first attempt fails at its deadline;
    dev2 restarts from its checkpoint and round 2 closes in the second attempt with all three."""
    config = small_config(split, rounds=2, quorum=1.0, deadline_s=5.0, resend_s=0.5,
                          warmup_epochs=3)
    hub = MemoryHub()
    clients = _clients(hub, split, config, tmp_path, _faulty)
    store = Store(tmp_path / "state")
    revived = []

    def restart_when_attempt_2_opens():
        watcher = Store(tmp_path / "state", readonly=True)
        while watcher.last_attempt(2) != (2, "open"):
            time.sleep(0.05)
        watcher.close()
        transport = hub.connect("dev2", will=_will(config, "dev2"))
        revived.append(make_client(transport, split, 2, checkpoint_dir=tmp_path / "dev2").start())
    _dies_after_round_1(clients[2], threading.Thread(target=restart_when_attempt_2_opens,
                                                     daemon=True).start)
    server = _server(hub, config, store)
    history = server.run()
    _finish(clients[:2] + revived)
    assert revived[0].resumed_from == 1, "the restarted client did not resume its checkpoint"
    assert [(r.round, r.attempts, r.accepted) for r in history] == [
        (1, 1, ["dev0", "dev1", "dev2"]), (2, 2, ["dev0", "dev1", "dev2"])]
    assert store.attempts() == [(1, 1, "closed"), (2, 1, "failed"), (2, 2, "closed")]


def test_no_quorum_in_any_attempt_stops_the_federation(split, tmp_path):
    config = small_config(split, rounds=2, quorum=0.6, deadline_s=1.5, max_attempts=2,
                          warmup_epochs=3)
    hub = MemoryHub()
    clients = _clients(hub, split, config, tmp_path, _faulty)
    for victim in clients[1:]:
        _dies_after_round_1(victim)
    server = _server(hub, config)
    with pytest.raises(FederationError, match=r"round 2 reached no quorum in 2 attempts \(1 of 2"):
        server.run()
    assert [r.round for r in server.history] == [1]
    assert server.store.last_attempt(2) == (2, "failed")
    clients[0].stop()


def test_stragglers_sleep_by_their_relative_compute(split):
    opts = SimulationOptions(clients=3, profiles=["pi-zero-2w", "pi-5-8gb", "x86-gateway"])
    people = plan_participants(opts, split)
    factors = [slowdown(people, i, 0.5) for i in range(3)]
    ratio = people[2].profile.relative_compute / people[0].profile.relative_compute
    assert factors[2] == 0 and factors[0] == pytest.approx(0.5 * (ratio - 1))
    # A device whose evaluation takes 0.05 s, slowed down 2x: it sleeps 0.1 s more after each
    # evaluation, and what it reports as compute (history and metrics) includes that sleep.
    hub = MemoryHub()
    config = small_config(split, rounds=1, warmup_epochs=1, distill_epochs=1, revisit_epochs=1)
    client = make_client(hub.connect("dev0"), split, 0)
    client.slowdown = 2.0
    accuracy = client.trainer.accuracy

    def evaluation_of_known_length(X, y):
        time.sleep(0.05)
        return accuracy(X, y)
    client.trainer.accuracy = evaluation_of_known_length
    client.start()
    server = FederationServer(hub.connect("server"), config, FedMDServer(config),
                              expected_clients=1)
    server.run()
    _finish([client])
    assert [entry["round"] for entry in client.history] == [0, 1]
    for entry in client.history:
        *_, (lo, hi) = entry["compute_intervals"]   # the evaluation is the last compute step
        assert hi - lo >= 0.15, "the simulated slow compute must count as compute"
        assert server.metrics[entry["round"]]["dev0"]["compute_intervals"][-1] == [lo, hi]


def _simulate(out, *extra, baselines: bool = False):
    return subprocess.Popen(
        [sys.executable, "-m", "fededge.cli", "simulate", "--clients", "3", "--rounds", "3",
         "--profiles", "pi-zero-2w,pi-4-4gb,pi-5-8gb", "--seed", "1",
         "--baselines" if baselines else "--no-baselines",
         "--out", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _completed_rounds(out) -> set[int]:
    """Rounds whose every accepted device reported its metrics, per the server's store (round
    0, the warm-up, with round 1)."""
    store = Store(out, readonly=True)
    try:
        metrics = store.metrics()
        done = {c.round for c in store.closed_rounds() if set(c.accepted) <= set(
            metrics.get(c.round, {}))}
    except Exception:  # schema being created
        done = set()
    finally:
        store.close()
    return done | ({0} if 1 in done else set())


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_simulate_stopped_mid_run_resumes_in_the_same_out_dir(tmp_path, stop):
    """SIGKILL leaves what was committed; Ctrl-C (SIGINT) and SIGTERM stop the run cleanly
    (baselines thread, clients, broker), say how to resume and exit 130. Rerunning the same
    command resumes in every case."""
    out = tmp_path / "run"
    proc = _simulate(out, baselines=stop != signal.SIGKILL)
    deadline = time.monotonic() + 240
    completed: set[int] = set()
    while time.monotonic() < deadline and proc.poll() is None:
        if Store.exists(out):
            completed = _completed_rounds(out)
            if 1 in completed:
                break
        time.sleep(0.1)
    time.sleep(0.5)  # a round the store shows complete has had its line appended by now
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    proc.send_signal(stop)
    stopped_output = proc.communicate(timeout=60)[0].decode()
    if stop != signal.SIGKILL:
        assert proc.returncode == 130, stopped_output[-2000:]
        assert "interrupted:" in stopped_output and "to resume" in stopped_output
        assert "Traceback" not in stopped_output and "terminate called" not in stopped_output
    killed_after = len(Store(out, readonly=True).closed_rounds())
    # The stopped run left every round it completed in metrics.jsonl, one valid line each.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(len(rows)))
    assert completed <= {r["round"] for r in rows}, (completed, rows)
    assert not (out / "summary.json").exists()

    again = _simulate(out)
    output = again.communicate(timeout=240)[0].decode()
    assert again.returncode == 0, output[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_round"] == killed_after + 1 >= 2
    store = Store(out, readonly=True)
    assert store.attempts() == [(r, 1, "closed") for r in range(1, 4)], \
        "a completed round was redone or lost"
    assert summary["uploads_accepted"] == 9 and summary["rejected"] == {}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for c in summary["clients"]:
        meta = json.loads((out / "clients" / c["id"] / "student.json").read_text())
        assert meta["round"] == 3 and c["accuracy"] > 0.5
