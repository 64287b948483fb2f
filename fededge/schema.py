"""The value types every setting is parsed with, and one way to turn a failed parse into a line.

``--set``, the federation file, the kit files (``client.toml``, ``server.toml``) and the config
the server publishes are all parsed through pydantic (v2) with these types, in strict mode: an
integer setting takes an integer (not ``2.5``, ``"5"`` or ``true``), a number is finite (no
``inf``, ``nan``), an id matches ``names.ID_PATTERN``, and text that ends up in a Mosquitto or
systemd file is one line of printable characters. pydantic-core is compiled (Rust) with
manylinux wheels for x86_64 and aarch64, so the torch-free device install has it too.

``parse`` validates one value or record and raises ``SchemaError`` naming the first bad key,
its value and what it must be; callers prefix where it came from (``--set``, file and line).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError

from fededge.errors import FedEdgeError
from fededge.names import ID_RULE, is_id

T = TypeVar("T")

STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
"""Every schema's pydantic config: no coercion, finite numbers, unknown keys refused."""

MAX_TEXT = 200


class SchemaError(FedEdgeError, ValueError):
    """A value that does not fit its schema; ``key`` is the first bad key (``None`` for the
    record itself), the message names it, the value and the rule."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _identifier(value: str) -> str:
    if not is_id(value):
        raise ValueError(f"must be {ID_RULE}")
    return value


def _one_line(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must be one line of printable characters (no newline, tab or other "
                         "control character)")
    return value


Identifier = Annotated[str, AfterValidator(_identifier)]
"""A party id, federation name, run id, strategy or student name."""
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT), AfterValidator(_one_line)]
"""Free text that may be written into a generated file: one printable line."""
Port = Annotated[int, Field(ge=1, le=65535)]
NonNegative = Annotated[int, Field(ge=0)]


def describe(exc: ValidationError) -> tuple[str | None, str]:
    """The first error of a pydantic ``ValidationError`` as (key, 'key: why, got value')."""
    error = exc.errors(include_url=False)[0]
    loc = [str(part) for part in error["loc"]]
    key = loc[0] if loc else None
    why = error["msg"]
    if error["type"] == "value_error":
        why = str(error.get("ctx", {}).get("error", why))
    elif why.startswith("Value error, "):
        why = why[len("Value error, "):]
    why = why[0].lower() + why[1:] if why else why
    where = ".".join(loc)
    if error["type"] == "missing":
        return key, f"{where}: is required"
    if error["type"] == "extra_forbidden":
        return key, f"{where}: unknown key"
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return key, (f"{where}: {why}, got {shown}" if where else f"{why}")


@functools.lru_cache(maxsize=None)
def adapter(kind: Any) -> TypeAdapter:
    """A cached validator of a bare type (``int``, an ``Annotated`` type) under ``STRICT``."""
    return TypeAdapter(kind, config=STRICT)


def parse(kind: type[T] | Any, value: Any) -> T:
    """``value`` validated as ``kind``: a schema dataclass built from a table (a dict), or a
    bare type; ``SchemaError`` (with the bad key) otherwise."""
    try:
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise SchemaError(f"must be a table, got {type(value).__name__}")
            return kind(**value)  # strict mode validates keyword arguments, not a dict
        return adapter(kind).validate_python(value)
    except ValidationError as exc:
        key, message = describe(exc)
        raise SchemaError(message, key) from None
