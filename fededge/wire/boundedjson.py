"""JSON from untrusted parties, parsed within hard limits before anything recurses or allocates.

Python's ``json`` decoder recurses once per nesting level: an 8-byte length and 60,000 ``[``
raised ``RecursionError`` out of the server's loop (which caught only ``ProtocolError``). It also
turns a 5,000-digit number into a ``ValueError`` of its own, ``1e999`` into ``inf`` and ``NaN``
into a float. ``loads`` therefore first scans the text's structure with one regular expression
(strings are skipped whole, so brackets inside them do not count), refusing it when it nests
deeper than ``max_depth`` or holds more than ``max_items`` values, and only then decodes it, with
integers of at most ``MAX_DIGITS`` digits and finite numbers only. Every refusal is a
``ProtocolError`` naming the limit. Standard library only (the edge agent parses descriptors
with it).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fededge.wire.topics import ProtocolError

MAX_DEPTH = 32
MAX_ITEMS = 100_000
MAX_DIGITS = 20
"""An int64 has at most 19 digits: more can only overflow whatever stores it."""

# A JSON string (unrolled: no backtracking), or one structural character.
_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]')


def _check_structure(text: str, max_depth: int, max_items: int) -> None:
    depth = items = 0
    for match in _STRUCTURE.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            items += 1
            if depth > max_depth:
                raise ProtocolError(f"JSON nests deeper than {max_depth} levels")
        elif token in "]}":
            depth -= 1
        elif token == ",":
            items += 1
        if items > max_items:
            raise ProtocolError(f"JSON holds more than {max_items} values")


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ProtocolError(f"JSON integer of {len(text)} digits (at most {MAX_DIGITS})")
    return int(text)


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"JSON number {text[:40]!r} is not finite")
    return value


def _constant(name: str) -> Any:
    raise ProtocolError(f"JSON constant {name} is not a finite number")


def loads(data: str | bytes, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> Any:
    """The JSON value of ``data`` (UTF-8 if bytes), within the limits; else ``ProtocolError``."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"JSON is not UTF-8: {exc}") from None
    _check_structure(text, max_depth, max_items)
    try:
        return json.loads(text, parse_int=_integer, parse_float=_number,
                          parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    except RecursionError:  # unreachable within MAX_DEPTH; kept so no input can escape
        raise ProtocolError("JSON nests too deeply") from None
