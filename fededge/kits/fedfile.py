"""The federation file (``federation.toml``): what ``fededge provision`` turns into kits.

Parsing and structural checks only (types, ranges, unknown keys, duplicate ids); the checks that
need the dataset or the profile catalog run in ``provision.py`` and use ``FederationSpec.where``
so every error still names the file and line. ``tomllib`` reports syntax errors with a line but
keeps no positions for values, hence the small line index built from the raw text.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fededge.errors import FedEdgeError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

from fededge.config import FederationConfig
from fededge.kits import mosquitto as mq
from fededge.kits.kit import ROLES
from fededge.learn.data import PARTITIONERS
from fededge.wire.envelope import SERVER_ID, ProtocolError, validate_id

# Settings provision derives (from the dataset, the federation name or each run), so a
# federation file may not set them in [training].
DERIVED_SETTINGS = ("federation", "num_classes", "input_shape", "proxy_sha256", "proxy_size",
                    "run_id")
# Ids a device cannot take: the server's MQTT user, and the provision output's other kits.
RESERVED_IDS = (SERVER_ID, "ca", "broker")
PRIVACY_KEYS = {"noise_multiplier": "ldp_noise_multiplier", "clip": "ldp_clip",
                "delta": "ldp_delta"}


class FederationFileError(FedEdgeError, ValueError):
    """A federation file that cannot be provisioned; the message names file, line and fix."""


class _LineIndex:
    """Line numbers of table headers and ``key = value`` lines, keyed by (table, index, key);
    ``index`` counts ``[[array]]`` tables. Values spanning lines are not indexed (not needed)."""

    _HEADER = re.compile(r"^\s*\[(\[)?\s*([A-Za-z0-9_.-]+)\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines: dict[tuple[str, int | None, str | None], int] = {}
        table, index, counts = "", None, {}
        for number, line in enumerate(text.splitlines(), start=1):
            header = self._HEADER.match(line)
            if header:
                table = header.group(2)
                index = counts[table] = counts.get(table, -1) + 1 if header.group(1) else None
                self.lines.setdefault((table, index, None), number)
                continue
            key = self._KEY.match(line)
            if key:
                self.lines.setdefault((table, index, key.group(1)), number)

    def find(self, table: str, key: str | None = None, index: int | None = None) -> int | None:
        return self.lines.get((table, index, key)) or self.lines.get((table, index, None))

    def error(self, table: str, key: str | None, message: str,
              index: int | None = None) -> FederationFileError:
        """An error prefixed with ``<file> line N`` (or the table when the line is unknown)."""
        line = self.find(table, key, index)
        where = f"{self.path} line {line}" if line else f"{self.path} [{table}]"
        return FederationFileError(f"{where}: {message}")


@dataclass(frozen=True)
class BrokerSpec:
    host: str                   # what devices dial; the broker certificate is valid for it
    tls_port: int = 8883
    plain_port: int = 0         # 0: no plain listener; otherwise a loopback-only one
    bind: str = "0.0.0.0"       # address the TLS listener binds
    user: str = "mosquitto"     # the user Mosquitto runs as when started as root
    alt_names: tuple[str, ...] = ()  # more names the broker certificate is valid for


@dataclass(frozen=True)
class DatasetSpec:
    source: str                 # a built-in dataset name or the path of a .npz shipped in kits
    partition: str = "dirichlet"
    alpha: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class DeviceSpec:
    id: str
    profile: str
    student: str | None = None  # override of the student picked from the profile
    data: str | None = None     # path of the device's private .npz, on the device
    role: str | None = None     # "client" (trains) or "agent" (only receives models); None:
                                # by the profile's can_train (resolved in provision)
    model_from: str | None = None  # an agent-only device runs this training device's model
    index: int = 0              # position among [[devices]], for line lookups


@dataclass(frozen=True)
class FederationSpec:
    path: Path
    name: str
    broker: BrokerSpec
    dataset: DatasetSpec
    settings: dict[str, Any]    # FederationConfig fields from [training] and [privacy]
    devices: tuple[DeviceSpec, ...]
    lines: _LineIndex = field(repr=False, compare=False)

    def error(self, table: str, key: str | None, message: str,
              index: int | None = None) -> FederationFileError:
        """An error naming the line of ``key`` in ``table`` (``index``-th ``[[table]]``)."""
        return self.lines.error(table, key, message, index)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_port(v: Any) -> bool:
    return _is_int(v) and 1 <= v <= 65535


_STR = ("a string", lambda v: isinstance(v, str) and v.strip() != "")
# [training] values are checked against the type of the FederationConfig default.
_TYPE_CHECKS: dict[type, tuple[str, Callable[[Any], bool]]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", _is_int),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: _STR,
}
_PORT = ("a port number 1-65535", _is_port)
_Check = tuple[str, Callable[[Any], bool]]


class _Reader:
    """Reads one table, naming the line of any bad or unknown key."""

    def __init__(self, lines: _LineIndex) -> None:
        self.lines = lines
        self.error = lines.error

    def table(self, raw: dict[str, Any], name: str, fields: dict[str, _Check], *,
              required: tuple[str, ...] = (), index: int | None = None) -> dict[str, Any]:
        label = f"[[{name}]] #{index + 1}" if index is not None else f"[{name}]"
        if not isinstance(raw, dict):
            raise self.error(name, None, f"{name} must be a table", index)
        for key, value in raw.items():
            if key not in fields:
                raise self.error(name, key, f"unknown key {key!r} in {label}; known keys: "
                                            f"{', '.join(fields)}", index)
            want, ok = fields[key]
            if not ok(value):
                raise self.error(name, key, f"{key} must be {want}, got {value!r}", index)
        missing = [k for k in required if k not in raw]
        if missing:
            raise self.error(name, None, f"{label} lacks required key {missing[0]!r}", index)
        return dict(raw)


def load_federation_file(path: str | Path) -> FederationSpec:
    """Parse and check a federation file; every error names the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise FederationFileError(f"{path}: cannot read federation file ({exc.strerror})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FederationFileError(f"{path}: invalid TOML: {exc}") from None
    lines = _LineIndex(path, text)
    read = _Reader(lines)
    tables = {"federation", "broker", "dataset", "training", "privacy", "devices"}
    for key in raw:
        if key not in tables:
            raise read.error("", key, f"unknown table or key {key!r}; known tables: "
                                      f"{', '.join(sorted(tables))}")
    for name in ("federation", "broker", "dataset"):
        if name not in raw:
            raise FederationFileError(f"{path}: missing required table [{name}]")

    fed = read.table(raw["federation"], "federation", {"name": _STR}, required=("name",))
    try:
        validate_id(fed["name"], "federation name")
    except ProtocolError as exc:
        raise read.error("federation", "name", str(exc)) from None

    broker = BrokerSpec(**read.table(raw["broker"], "broker", {
        "host": _STR, "tls_port": _PORT,
        # bind and user are written into mosquitto.conf: one token each
        "bind": ("an IP address or host name", mq.is_host),
        "user": ("a system user name (letters, digits, '_', '-', '.')", mq.is_system_user),
        "plain_port": ("0 (none) or a port number 1-65535", lambda v: v == 0 or _is_port(v)),
        "alt_names": ("a list of host names or IP addresses",
                      lambda v: isinstance(v, list) and all(_STR[1](n) for n in v)),
    }, required=("host",)))
    broker = dataclasses.replace(broker, alt_names=tuple(broker.alt_names))
    if broker.plain_port and broker.plain_port == broker.tls_port:
        raise read.error("broker", "plain_port",
                         f"plain_port {broker.plain_port} equals tls_port; use another port")

    dataset = DatasetSpec(**read.table(raw["dataset"], "dataset", {
        "source": _STR,
        "partition": (f"one of {', '.join(PARTITIONERS)}", lambda v: v in PARTITIONERS),
        "alpha": ("a positive number", lambda v: isinstance(v, (int, float))
                  and not isinstance(v, bool) and v > 0),
        "seed": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    }, required=("source",)))

    settings = _settings(read, raw)
    devices = _devices(read, raw.get("devices"))
    return FederationSpec(path, fed["name"], broker, dataset, settings, devices, lines)


def _settings(read: _Reader, raw: dict[str, Any]) -> dict[str, Any]:
    """[training] (FederationConfig fields) and [privacy] (the ldp_* fields, short names)."""
    defaults = FederationConfig()
    checks = {f.name: _TYPE_CHECKS[type(getattr(defaults, f.name))]
              for f in dataclasses.fields(FederationConfig)
              if f.name not in DERIVED_SETTINGS and not f.name.startswith("ldp_")}
    training = read.table(raw.get("training", {}), "training", checks)
    privacy = read.table(raw.get("privacy", {}), "privacy",
                         dict.fromkeys(PRIVACY_KEYS, _TYPE_CHECKS[float]))
    return {**{k: float(v) if checks[k] is _TYPE_CHECKS[float] else v
               for k, v in training.items()},
            **{PRIVACY_KEYS[k]: float(v) for k, v in privacy.items()}}


def _devices(read: _Reader, raw: Any) -> tuple[DeviceSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise read.error("devices", None, "the federation needs at least one [[devices]] table "
                                          "with id and profile")
    seen: dict[str, int] = {}
    devices = []
    for index, entry in enumerate(raw):
        values = read.table(entry, "devices", {
            "id": _STR, "profile": _STR, "student": _STR, "data": _STR, "model_from": _STR,
            "role": (f"one of {', '.join(map(repr, ROLES))}", lambda v: v in ROLES),
        }, required=("id", "profile"), index=index)
        device = DeviceSpec(**values, index=index)
        try:
            validate_id(device.id)
        except ProtocolError as exc:
            raise read.error("devices", "id", str(exc), index) from None
        if device.id in RESERVED_IDS:
            raise read.error("devices", "id", f"device id {device.id!r} is reserved (the "
                                              "server's user and the kit directories "
                                              f"{', '.join(RESERVED_IDS)}); rename the device",
                             index)
        if device.id in seen:
            first = read.lines.find("devices", "id", seen[device.id])
            raise read.error("devices", "id", f"duplicate device id {device.id!r} (first used "
                                              f"on line {first}); ids must be unique", index)
        seen[device.id] = index
        devices.append(device)
    for device in devices:
        _check_model_from(read, device, seen)
    return tuple(devices)


def _check_model_from(read: _Reader, device: DeviceSpec, ids: dict[str, int]) -> None:
    """``model_from`` names another listed device (whether that one trains is provision's
    check: it depends on the profile catalog)."""
    source = device.model_from
    if source is None:
        return
    if source == device.id or source not in ids:
        what = "the device itself" if source == device.id else "no device of this file"
        raise read.error("devices", "model_from", f"device {device.id!r}: model_from "
                                                  f"{source!r} is {what}; name a device that "
                                                  "trains", device.index)
