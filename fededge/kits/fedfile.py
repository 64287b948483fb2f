"""The federation file (``federation.toml``): what ``fededge provision`` turns into kits.

Parsing and structural checks only (types, ranges, unknown keys, duplicate ids); the checks that
need the dataset or the profile catalog run in ``provision.py`` and use ``FederationSpec.where``
so every error still names the file and line. ``tomllib`` reports syntax errors with a line but
keeps no positions for values, hence the small line index built from the raw text.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, TypeVar

from pydantic import AfterValidator, Field
from pydantic.dataclasses import dataclass

from fededge.errors import FedEdgeError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

from fededge.config import DERIVED, SETTINGS, ConfigError, check_setting
from fededge.kits import mosquitto as mq
from fededge.kits.kit import MANIFEST_FILE
from fededge.learn.data import PARTITIONERS
from fededge.schema import STRICT, Identifier, NonNegative, Port, SchemaError, Text, parse
from fededge.wire.topics import SERVER_ID

T = TypeVar("T")
# FederationConfig settings the [federation] table decides (who may see what), not [training].
FEDERATION_SETTINGS = ("collect_models",)
# Ids a device cannot take: the server's MQTT user, and the provision output's other kits.
RESERVED_IDS = (SERVER_ID, "ca", "broker", MANIFEST_FILE)
PRIVACY_KEYS = {"noise_multiplier": "ldp_noise_multiplier", "clip": "ldp_clip",
                "delta": "ldp_delta"}


class FederationFileError(FedEdgeError, ValueError):
    """A federation file that cannot be provisioned; the message names file, line and fix."""


def _host(value: str) -> str:
    if not mq.is_host(value):
        raise ValueError("must be an IP address or a host name")
    return value


def _system_user(value: str) -> str:
    if not mq.is_system_user(value):
        raise ValueError("must be a system user name (letters, digits, '_', '-', '.')")
    return value


def _partition(value: str) -> str:
    if value not in PARTITIONERS:
        raise ValueError(f"must be one of {', '.join(PARTITIONERS)}")
    return value


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


Host = Annotated[str, AfterValidator(_host)]
SystemUser = Annotated[str, AfterValidator(_system_user)]
Partition = Annotated[str, AfterValidator(_partition)]


@dataclass(frozen=True, config=STRICT)
class BrokerSpec:
    host: Host                  # what devices dial; the broker certificate is valid for it
    tls_port: Port = 8883
    plain_port: Annotated[int, Field(ge=0, le=65535)] = 0  # 0: none; else loopback-only
    bind: Host = "0.0.0.0"      # address the TLS listener binds (written into mosquitto.conf)
    user: SystemUser = "mosquitto"  # the user Mosquitto runs as when started as root
    alt_names: Annotated[tuple[Host, ...], Field(strict=False, max_length=32)] = ()
    # more names the broker certificate is valid for


@dataclass(frozen=True, config=STRICT)
class DatasetSpec:
    source: Text                # a built-in dataset name or the path of a .npz shipped in kits
    partition: Partition = "dirichlet"
    alpha: Annotated[float, Field(gt=0.0, le=1e6)] = 0.5
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0


@dataclass(frozen=True, config=STRICT)
class DeviceSpec:
    id: Identifier
    profile: Identifier
    student: Identifier | None = None  # override of the student picked from the profile
    data: Text | None = None    # path of the device's private .npz, on the device
    role: Literal["client", "agent"] | None = None  # "client" (trains) or "agent" (only
                                # receives models); None: by the profile's can_train
    model_from: Identifier | None = None  # an agent-only device runs this training device's
    index: NonNegative = 0      # position among [[devices]], for line lookups (not a key)


@dataclass(frozen=True, config=STRICT)
class _FederationTable:
    name: Identifier
    collect_models: bool = False
    zoo: Text | None = None     # a Python file of the user's students, relative to this file


@dataclasses.dataclass(frozen=True)
class FederationSpec:
    path: Path
    name: str
    broker: BrokerSpec
    dataset: DatasetSpec
    settings: dict[str, Any]    # FederationConfig fields from [training] and [privacy]
    devices: tuple[DeviceSpec, ...]
    lines: _LineIndex = field(repr=False, compare=False)
    zoo: Path | None = None     # the user zoo file (``learn.userzoo``), copied into every kit

    def error(self, table: str, key: str | None, message: str,
              index: int | None = None) -> FederationFileError:
        """An error naming the line of ``key`` in ``table`` (``index``-th ``[[table]]``)."""
        return self.lines.error(table, key, message, index)


class _Reader:
    """Reads one table through its schema, naming the line of any bad or unknown key."""

    def __init__(self, lines: _LineIndex) -> None:
        self.lines = lines
        self.error = lines.error

    def keys(self, raw: Any, name: str, known: Iterable[str],
             index: int | None = None) -> dict[str, Any]:
        """``raw`` as a table whose keys are all ``known``."""
        label = f"[[{name}]] #{index + 1}" if index is not None else f"[{name}]"
        if not isinstance(raw, dict):
            raise self.error(name, None, f"{name} must be a table", index)
        known = list(known)
        for key in raw:
            if key not in known:
                raise self.error(name, key, f"unknown key {key!r} in {label}; known keys: "
                                            f"{', '.join(known)}", index)
        return raw

    def record(self, kind: type[T], raw: Any, name: str, index: int | None = None,
               extra: dict[str, Any] | None = None) -> T:
        """One table parsed as ``kind`` (a schema dataclass; ``extra`` are fields the file
        does not give)."""
        extra = extra or {}
        fields = [f.name for f in dataclasses.fields(kind) if f.name not in extra]
        self.keys(raw, name, fields, index)
        label = f"[[{name}]] #{index + 1}" if index is not None else f"[{name}]"
        try:
            return parse(kind, {**raw, **extra})
        except SchemaError as exc:
            if str(exc).endswith(": is required"):
                raise self.error(name, None, f"{label} lacks required key {exc.key!r}",
                                 index) from None
            raise self.error(name, exc.key, f"{label} {exc}", index) from None


def load_federation_file(path: str | Path) -> FederationSpec:
    """Parse and check a federation file; every error names the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FederationFileError(f"{path}: cannot read federation file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise FederationFileError(f"{path}: not a TOML text file (byte {exc.start} is not "
                                  "UTF-8); pass the federation file") from None
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

    fed = read.record(_FederationTable, raw["federation"], "federation")
    broker = read.record(BrokerSpec, raw["broker"], "broker")
    if broker.plain_port and broker.plain_port == broker.tls_port:
        raise read.error("broker", "plain_port",
                         f"plain_port {broker.plain_port} equals tls_port; use another port")
    dataset = read.record(DatasetSpec, raw["dataset"], "dataset")

    settings = {**_settings(read, raw),
                **{key: getattr(fed, key) for key in FEDERATION_SETTINGS}}
    devices = _devices(read, raw.get("devices"))
    return FederationSpec(path, fed.name, broker, dataset, settings, devices, lines,
                          _zoo_file(read, path, fed.zoo))


def _zoo_file(read: _Reader, path: Path, zoo: str | None) -> Path | None:
    """The zoo file ``[federation] zoo`` names, relative to the federation file; it must be
    readable here, since every kit gets a copy."""
    if zoo is None:
        return None
    zoo_path = Path(zoo) if Path(zoo).is_absolute() else path.parent / zoo
    try:
        zoo_path.read_bytes()
    except OSError as exc:
        raise read.error("federation", "zoo", f"zoo {str(zoo_path)!r}: cannot read it "
                                              f"({exc.strerror}); give the path, relative to "
                                              "the federation file, of a Python file defining "
                                              "students(input_shape, num_classes)") from None
    return zoo_path


def _settings(read: _Reader, raw: dict[str, Any]) -> dict[str, Any]:
    """[training] (FederationConfig fields) and [privacy] (the ldp_* fields, short names),
    each value checked by the federation settings' schema (``config.check_setting``)."""
    settable = [name for name in SETTINGS if name not in DERIVED
                and name not in FEDERATION_SETTINGS and not name.startswith("ldp_")]
    tables = {"training": (settable, lambda key: key),
              "privacy": (list(PRIVACY_KEYS), PRIVACY_KEYS.__getitem__)}
    settings: dict[str, Any] = {}
    for table, (known, setting) in tables.items():
        values = raw.get(table, {})
        if table == "training" and isinstance(values, dict):
            for key in values:
                if key in DERIVED:
                    raise read.error(table, key, f"{key} is derived from the dataset or the "
                                                 "federation; drop it from [training]")
        for key, value in read.keys(values, table, known).items():
            try:
                settings[setting(key)] = check_setting(setting(key), value)
            except ConfigError as exc:
                raise read.error(table, key, f"[{table}] {key}: {exc}") from None
    return settings


def _devices(read: _Reader, raw: Any) -> tuple[DeviceSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise read.error("devices", None, "the federation needs at least one [[devices]] table "
                                          "with id and profile")
    seen: dict[str, int] = {}
    devices = []
    for index, entry in enumerate(raw):
        device = read.record(DeviceSpec, entry, "devices", index, {"index": index})
        if device.id.lower() in RESERVED_IDS:
            raise read.error("devices", "id", f"device id {device.id!r} is reserved (the "
                                              "server's user, the kit directories and the "
                                              f"files beside them: {', '.join(RESERVED_IDS)});"
                                              " rename the device", index)
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
