"""A startup kit's configuration file (``client.toml`` / ``server.toml``): its schema, writing
and reading. ``provision.py`` writes kits, ``runner.py`` runs them; both go through ``Kit`` so
the file format is defined once. No torch here: reading a kit must stay cheap.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from fededge.config import ConfigError, FederationConfig, Sha256
from fededge.errors import FedEdgeError
from fededge.schema import STRICT, Identifier, NonNegative, Port, SchemaError, Text, parse

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

from fededge.wire.topics import AGENT_ROLE, DEPLOY_ROLE, LOCK_ROLE, SERVER_ID

CLIENT_FILE, SERVER_FILE = "client.toml", "server.toml"
PASSWORD_FILE, CA_FILE, CERT_FILE, KEY_FILE = "password", "ca.crt", "client.crt", "client.key"
DEPLOY_CERT_FILE, DEPLOY_KEY_FILE = "deploy.crt", "deploy.key"  # server kit: signs bundles
SERVER_ROLES = (DEPLOY_ROLE, LOCK_ROLE)  # `fededge deploy`; the probe of the one-server lock
DEVICE_ROLES = (AGENT_ROLE,)             # the edge agent
DATASET_FILE = "dataset.npz"   # a federation's .npz dataset, when it is not a built-in one
ZOO_FILE = "zoo.py"            # the federation's user zoo file, when it has one
MANIFEST_FILE = "manifest.json"
STATE_DIR = "state"            # runtime output (checkpoints) below a kit; not part of the kit
# A device kit's role: a training client (which may also run the edge agent beside it), or an
# agent-only device that trains nothing and runs the model of a training device (``model_from``).
CLIENT_ROLE = "client"
ROLES = (CLIENT_ROLE, AGENT_ROLE)


def party_roles(party: str) -> tuple[str, ...]:
    """The second MQTT users of a party (``topics.role_user``): each runs beside the party's
    own process and so needs its own user, and with it its own certificate."""
    return SERVER_ROLES if party == SERVER_ID else DEVICE_ROLES


def login_files(role: str | None = None) -> tuple[str, str]:
    """The certificate and key of a kit's MQTT login: ``client.crt`` for the party itself,
    ``client-<role>.crt`` for its ``role`` user. The broker takes a certificate's CN as the user
    name, so each user has its own."""
    if role is None:
        return CERT_FILE, KEY_FILE
    return f"client-{role}.crt", f"client-{role}.key"


class KitError(FedEdgeError, ValueError):
    """A kit that cannot be used; the message names the file and what to do."""


@pydantic_dataclass(frozen=True, config=STRICT)
class BrokerAccess:
    """How one party reaches the broker: address, user name and its credential files."""

    host: Text
    port: Port
    username: Identifier


@pydantic_dataclass(frozen=True, config=STRICT)
class DatasetRef:
    """Enough to re-derive the federation's split locally, deterministically: its proxy set
    (checked against ``proxy_sha256``), test set and, for demo devices, private shards."""

    source: Text           # built-in dataset name, or a file name inside the kit
    partition: Identifier
    alpha: Annotated[float, Field(gt=0.0)]
    seed: NonNegative
    shards: Annotated[int, Field(ge=1, le=1_000_000)]  # demo shards of the private part
    proxy_sha256: Sha256


@pydantic_dataclass(frozen=True, config=STRICT)
class MeasuredStudent:
    """What provisioning measured of one student of the kit's zoo file (``learn.models.trace``,
    per sample), so parties without torch (a fedmd server) know its size and cost."""

    params: Annotated[int, Field(ge=1)]
    flops: NonNegative
    activation_floats: NonNegative


@pydantic_dataclass(frozen=True, config=STRICT)
class _KitFile:
    """The schema of ``client.toml`` / ``server.toml``; its tables are records of their own
    (``[broker]``, ``[dataset]``, and ``[config]``, the federation's settings)."""

    federation: Identifier
    device: Identifier
    broker: dict[str, Any]
    dataset: dict[str, Any]
    config: dict[str, Any]
    profile: Annotated[str, Field(max_length=64)] = ""
    student: Annotated[str, Field(max_length=64)] = ""
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    shard: NonNegative | None = None
    data: Text | None = None
    devices: Annotated[tuple[Identifier, ...], Field(strict=False)] = ()
    role: Literal["client", "agent"] = "client"
    model_from: Identifier | None = None
    agents: dict[Identifier, Identifier] = field(default_factory=dict)
    zoo: Literal["zoo.py"] | None = None
    zoo_students: dict[Identifier, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Kit:
    """One party's kit. ``device`` is the server's id for the server kit."""

    directory: Path
    federation: str
    device: str
    broker: BrokerAccess
    dataset: DatasetRef
    config: dict[str, Any]       # FederationConfig fields, run_id excepted
    profile: str = ""
    student: str = ""
    seed: int = 0                # student initialisation seed
    shard: int | None = None     # demo shard of the split, when the device brings no data
    data: str | None = None      # path of the device's private .npz, on the device
    devices: tuple[str, ...] = ()  # server kit: the devices that train (the server waits for)
    role: str = CLIENT_ROLE      # device kit; kits written before roles existed train
    model_from: str | None = None  # agent-only device: the training device whose model it runs
    agents: dict[str, str] = field(default_factory=dict)  # server kit: agent-only → model_from
    zoo: str | None = None       # ZOO_FILE when the federation has students of its own
    zoo_students: dict[str, MeasuredStudent] = field(default_factory=dict)  # measured, by name

    @property
    def is_server(self) -> bool:
        return self.device == SERVER_ID

    @property
    def trains(self) -> bool:
        """A device kit that takes part in training (``fededge client``)."""
        return not self.is_server and self.role == CLIENT_ROLE

    def bundle_source(self, device: str) -> str:
        """Server kit: whose exported model ``device`` receives (its own, or its model_from)."""
        return self.agents.get(device, device)

    @property
    def file(self) -> Path:
        return self.directory / (SERVER_FILE if self.is_server else CLIENT_FILE)

    def path(self, name: str) -> Path:
        return self.directory / name

    def password(self) -> str:
        try:
            return self.path(PASSWORD_FILE).read_text().strip()
        except OSError as exc:
            raise KitError(f"{self.path(PASSWORD_FILE)}: cannot read the broker password "
                           f"({exc.strerror}); re-provision the kit") from None

    def dataset_source(self) -> str:
        """A built-in dataset name, or the shipped file's path."""
        shipped = self.path(self.dataset.source)
        return str(shipped) if self.dataset.source == DATASET_FILE else self.dataset.source

    def to_toml(self, header: str) -> str:
        """The kit file's text; ``header`` becomes its leading comment."""
        top: dict[str, Any] = {"federation": self.federation, "device": self.device}
        if self.is_server:
            top["devices"] = list(self.devices)
        else:
            top.update(role=self.role, profile=self.profile, student=self.student)
            top.update({"seed": self.seed} if self.trains else {})
            optional = {"shard": self.shard, "data": self.data, "model_from": self.model_from}
            top.update({key: value for key, value in optional.items() if value is not None})
        if self.zoo is not None:
            top["zoo"] = self.zoo
        tables = {"broker": vars(self.broker), "dataset": vars(self.dataset),
                  "config": self.config}
        if self.agents:
            tables["agents"] = self.agents
        if self.zoo_students:
            tables["zoo_students"] = {name: vars(m) for name, m in self.zoo_students.items()}
        return _dump_toml(header, top, tables)


def load_kit(directory: str | Path) -> Kit:
    """Read a server or device kit directory."""
    directory = Path(directory)
    files = [directory / name for name in (SERVER_FILE, CLIENT_FILE)
             if (directory / name).is_file()]
    if not files:
        raise KitError(f"{directory}: not a fededge kit (no {CLIENT_FILE} or {SERVER_FILE}); "
                       "pass a directory written by `fededge provision`")
    path = files[0]
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise KitError(f"{path}: unreadable ({exc}); re-provision the kit") from None
    try:
        parsed = parse(_KitFile, raw)
        tables = {name: parse(kind, getattr(parsed, name)) for name, kind in
                  (("broker", BrokerAccess), ("dataset", DatasetRef))}
        students = {name: parse(MeasuredStudent, figures)
                    for name, figures in parsed.zoo_students.items()}
        FederationConfig.from_dict(parsed.config)
    except (SchemaError, ConfigError) as exc:
        raise KitError(f"{path}: {exc}; re-provision the kit") from None
    kit = Kit(directory=directory, **{**{f.name: getattr(parsed, f.name)
                                         for f in dataclasses.fields(_KitFile)}, **tables,
                                      "zoo_students": students})
    if (path.name == SERVER_FILE) != kit.is_server:
        raise KitError(f"{path}: device {kit.device!r} does not belong in {path.name}")
    return kit


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                          ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):
        return json.dumps(value)   # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")


def _dump_toml(header: str, top: dict[str, Any], tables: dict[str, dict[str, Any]]) -> str:
    """Flat TOML (scalars, lists, one level of tables): all a kit needs, no writer dependency."""
    out = [f"# {line}".rstrip() for line in header.splitlines()]
    out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in top.items()]
    for name, table in tables.items():
        out += ["", f"[{name}]",
                *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())]
    return "\n".join(out) + "\n"


def _toml_key(key: str) -> str:
    """A bare key when TOML allows one; device ids (keys of ``[agents]``) may hold dots."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
