"""A simulated federation's recipe: from the options to the split, the devices (profile,
student) and the federation config. Every process of a simulated federation derives the same
from the same options: ``fededge simulate`` in one process, and the multi-process fleet
(``sim.fleet``), whose client processes each rebuild their own device deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fededge.config import FederationConfig
from fededge.errors import FedEdgeError
from fededge.federation import wiring
from fededge.federation.client import DeviceIdentity, FederationClient, LocalData
from fededge.federation.strategies import strategy_pair
from fededge.learn.data import Dataset, FederatedSplit, load_dataset, split_federated
from fededge.learn.picking import pick_student
from fededge.learn.userzoo import load_user_zoo
from fededge.learn.zoo import estimate_cost, zoo_for
from fededge.profiles import DeviceProfile, get_profile, load_catalog
from fededge.transport.base import Transport

BROKERS = ("embedded", "mosquitto")


class SimulationError(FedEdgeError, ValueError):
    """A simulation option that cannot work; the message names the option and the fix."""


@dataclass
class SimulationOptions:
    data: str | None = None
    clients: int = 10
    rounds: int = 20
    partition: str = "dirichlet"
    alpha: float = 0.5
    seed: int = 0
    aggregator: str = "era"
    strategy: str = "fedmd"
    profiles: list[str] | None = None
    out: Path = Path("runs/latest")
    broker: str = "embedded"
    baselines: bool = True
    torch_threads: int = 1
    overrides: dict[str, Any] = field(default_factory=dict)
    # > 0 makes slower profiles real stragglers: each client sleeps straggle × (fastest
    # profile's compute / its own − 1) times the duration of each of its compute steps.
    straggle: float = 0.0
    # Every device trains this student (a homogeneous federation); strategies that average
    # weights default to the largest student every device's profile can train.
    student: str | None = None
    # > 0: payloads above this many bytes travel in chunks (chunking.py), for brokers that
    # cap the message size.
    max_message: int = 0
    # A user zoo file (learn.userzoo): its students compete with the built-in ones; the run
    # keeps a copy as OUT/zoo.py for export.
    zoo: Path | None = None


@dataclass
class Participant:
    device_id: str
    profile: DeviceProfile
    student: str
    params: int


def _default_profiles() -> list[DeviceProfile]:
    """Every catalog profile that can train, slowest first, so N clients spread over them."""
    usable = [p for p in load_catalog().values() if p.can_train]
    return sorted(usable, key=lambda p: p.peak_gflops)


def _device_profiles(opts: SimulationOptions) -> list[DeviceProfile]:
    """One profile per device, assigned round-robin."""
    profiles = ([get_profile(name.strip()) for name in opts.profiles] if opts.profiles
                else _default_profiles())
    return [profiles[i % len(profiles)] for i in range(opts.clients)]


def homogeneous_student(opts: SimulationOptions, split: FederatedSplit) -> str:
    """The student every device trains: ``--student``, or for a strategy that averages
    weights the largest student every device can train; '' when each device picks its own."""
    if opts.student or not strategy_pair(opts.strategy)[0].homogeneous:
        return opts.student or ""
    picks = [pick_student(p, split.input_shape, split.num_classes, _batch_size(opts)).student
             for p in _device_profiles(opts)]
    return min(picks, key=zoo_for(split.input_shape).index)


def plan_participants(opts: SimulationOptions, split: FederatedSplit) -> list[Participant]:
    """Assign profiles round-robin and pick each device's student from its profile."""
    forced = homogeneous_student(opts, split)
    people = []
    for i, profile in enumerate(_device_profiles(opts)):
        choice = pick_student(profile, split.input_shape, split.num_classes, _batch_size(opts))
        if choice.inference_only:
            raise SimulationError(
                f"profile {profile.name!r} cannot train (can_train = false); it can only run "
                "exported students. Leave it out of --profiles")
        student = forced or choice.student
        people.append(Participant(f"dev{i:03d}-{profile.name}", profile, student,
                                  estimate_cost(student, split.input_shape,
                                                split.num_classes).params))
    return people


def _batch_size(opts: SimulationOptions) -> int:
    """The batch size the devices train with: training memory is budgeted at it."""
    return int(opts.overrides.get("batch_size", FederationConfig().batch_size))


def split_for(opts: SimulationOptions) -> tuple[Dataset, FederatedSplit]:
    """The dataset and its seeded federated split."""
    dataset = load_dataset(opts.data)
    split = split_federated(dataset, opts.clients, partition=opts.partition, alpha=opts.alpha,
                            seed=opts.seed)
    if opts.zoo is not None:
        load_user_zoo(opts.zoo, tuple(split.input_shape), split.num_classes)
    return dataset, split


def federation_config(opts: SimulationOptions, split: FederatedSplit) -> FederationConfig:
    """The federation settings the options and the split imply."""
    return FederationConfig(
        strategy=opts.strategy, aggregator=opts.aggregator, rounds=opts.rounds, seed=opts.seed,
        num_classes=split.num_classes, input_shape=tuple(split.input_shape),
        proxy_sha256=split.proxy_sha256, proxy_size=len(split.public_X),
        student=homogeneous_student(opts, split)).replace(**opts.overrides)


def resume_context(opts: SimulationOptions) -> dict[str, Any]:
    """Options outside the config that decide the split and the devices: a resumed run must
    agree on them."""
    context = {"data": opts.data, "clients": opts.clients, "partition": opts.partition,
               "alpha": opts.alpha, "profiles": opts.profiles}
    return context | ({"zoo": str(opts.zoo)} if opts.zoo is not None else {})


def slowdown(people: list[Participant], index: int, straggle: float) -> float:
    """How many times its own compute time client ``index`` sleeps to play its profile."""
    fastest = max(p.profile.relative_compute for p in people)
    return straggle * (fastest / people[index].profile.relative_compute - 1)


def device_client(people: list[Participant], index: int, split: FederatedSplit, dataset: str,
                  config: FederationConfig, transport: Transport, checkpoint_dir: Path,
                  straggle: float = 0.0) -> FederationClient:
    """Device ``index`` of a simulated federation, exactly as a real device would run."""
    p, data = people[index], split.clients[index]
    local = LocalData(data.X, data.y, split.public_X, split.proxy_sha256, split.test_X,
                      split.test_y)
    return wiring.build_client(
        transport, config, DeviceIdentity(p.device_id, p.profile.name, p.student, p.params),
        local, seed=config.seed + index, checkpoint_dir=checkpoint_dir,
        checkpoint_meta=wiring.checkpoint_meta(split, dataset),
        slowdown=slowdown(people, index, straggle))
