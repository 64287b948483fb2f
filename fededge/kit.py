"""A startup kit's configuration file (``client.toml`` / ``server.toml``): its schema, writing
and reading. ``provision.py`` writes kits, ``runner.py`` runs them; both go through ``Kit`` so
the file format is defined once. No torch here: reading a kit must stay cheap.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

from .topics import SERVER_ID

CLIENT_FILE, SERVER_FILE = "client.toml", "server.toml"
PASSWORD_FILE, CA_FILE, CERT_FILE, KEY_FILE = "password", "ca.crt", "client.crt", "client.key"
DEPLOY_CERT_FILE, DEPLOY_KEY_FILE = "deploy.crt", "deploy.key"  # server kit: signs bundles
DATASET_FILE = "dataset.npz"   # a federation's .npz dataset, when it is not a built-in one
MANIFEST_FILE = "manifest.json"
STATE_DIR = "state"            # runtime output (checkpoints) below a kit; not part of the kit


class KitError(ValueError):
    """A kit that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class BrokerAccess:
    """How one party reaches the broker: address, user name and its credential files."""

    host: str
    port: int
    username: str


@dataclass(frozen=True)
class DatasetRef:
    """Enough to re-derive the federation's split locally, deterministically: its proxy set
    (checked against ``proxy_sha256``), test set and, for demo devices, private shards."""

    source: str            # built-in dataset name, or a file name inside the kit
    partition: str
    alpha: float
    seed: int
    shards: int            # number of demo shards the private part is split into
    proxy_sha256: str


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
    devices: tuple[str, ...] = ()  # server kit: the federation's devices

    @property
    def is_server(self) -> bool:
        return self.device == SERVER_ID

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
            top.update(profile=self.profile, student=self.student, seed=self.seed)
            top.update({"shard": self.shard} if self.shard is not None else {})
            top.update({"data": self.data} if self.data is not None else {})
        tables = {"broker": vars(self.broker), "dataset": vars(self.dataset),
                  "config": self.config}
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
        kit = Kit(directory=directory, federation=raw["federation"], device=raw["device"],
                  broker=BrokerAccess(**raw["broker"]), dataset=DatasetRef(**raw["dataset"]),
                  config=raw["config"], profile=raw.get("profile", ""),
                  student=raw.get("student", ""), seed=raw.get("seed", 0),
                  shard=raw.get("shard"), data=raw.get("data"),
                  devices=tuple(raw.get("devices", ())))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KitError(f"{path}: unreadable ({exc})") from None
    except (KeyError, TypeError) as exc:
        raise KitError(f"{path}: missing or unexpected setting {exc}; re-provision the kit") \
            from None
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
    raise TypeError(f"cannot write {value!r} to TOML")


def _dump_toml(header: str, top: dict[str, Any], tables: dict[str, dict[str, Any]]) -> str:
    """Flat TOML (scalars, lists, one level of tables): all a kit needs, no writer dependency."""
    out = [f"# {line}".rstrip() for line in header.splitlines()]
    out += [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, table in tables.items():
        out += ["", f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    return "\n".join(out) + "\n"
