"""The files provisioning writes from templates: ``fededge/kits/templates/*.in``, package data
shipped in the wheel (start scripts, systemd units, ``mosquitto.conf``).

A template is the file's text with ``@name@`` placeholders, the convention of autoconf's and
meson's ``.in`` files, read by a ``string.Template`` subclass; any other ``@`` is text, and the
shell's ``$`` and ``"$@"`` or systemd's ``$MAINPID`` need no escaping. Beyond substitution:

- a line starting with ``@#`` is a comment of the template, not of the file it renders;
- a line holding a placeholder whose value is ``None`` is left out, so optional lines stay in
  the template and the caller only says which apply (``@if_broker@ExecReload=...`` with
  ``if_broker=when(role == "broker")``);
- every value is one line of printable text (a string for which ``str.isprintable()`` holds, or
  an integer), so no value can add a line, and with it a directive, to the file; a template may
  forbid more characters (``%``, a specifier in systemd units);
- every placeholder needs a value and every value a placeholder: a typo fails loudly instead of
  leaving a file half filled.
"""

from __future__ import annotations

import string
from functools import cache
from importlib import resources

from fededge.errors import FedEdgeError

TEMPLATES = "templates"  # below the fededge.kits package
# Characters a value may not hold in a template, beyond line breaks and control characters.
FORBIDDEN = {"fededge.service.in": ("%", "systemd expands % specifiers in unit files")}


class TemplateError(FedEdgeError, ValueError):
    """A value that cannot be written into a generated file; names the value and the file."""


class _Template(string.Template):
    delimiter = "@"
    pattern = r"""
    @(?:
      (?P<named>[a-z][a-z0-9_]*)@ |    # @name@; any other @ is text (the shell's "$@")
      (?P<escaped>(?!)) | (?P<braced>(?!)) | (?P<invalid>(?!))   # no such forms
    )
    """


def when(condition: bool) -> str | None:
    """The value of a placeholder that only keeps its line in or out (it renders as nothing)."""
    return "" if condition else None


@cache
def _source(name: str) -> str:
    text = resources.files("fededge.kits").joinpath(TEMPLATES, name).read_text(encoding="utf-8")
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("@#"))


def _names(text: str) -> set[str]:
    return {m.group("named") for m in _Template.pattern.finditer(text) if m.group("named")}


def render(name: str, **values: str | int | None) -> str:
    """The text of template ``name`` (a file of ``templates/``) with ``values`` in place."""
    text = _source(name)
    wanted = _names(text)
    if wanted != set(values):
        raise TypeError(f"template {name}: missing values {sorted(wanted - set(values))}, "
                        f"unknown values {sorted(set(values) - wanted)}")
    forbidden, why = FORBIDDEN.get(name, ("", ""))
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TypeError(f"template {name}: @{key}@ must be a string or an integer, "
                            f"got {value!r}")
        text_value = str(value)
        if not text_value.isprintable():
            raise TemplateError(f"{text_value!r} cannot be written into {_target(name)}: "
                                "it must be one line of printable characters")
        bad = sorted({c for c in text_value if c in forbidden})
        if bad:
            raise TemplateError(f"{text_value!r} cannot be written into {_target(name)}: "
                                f"{why} (found {''.join(bad)!r})")
    kept = [line for line in text.splitlines(keepends=True)
            if all(values[n] is not None for n in _names(line))]
    return _Template("".join(kept)).substitute(
        {k: "" if v is None else str(v) for k, v in values.items()})


def _target(name: str) -> str:
    """What a template renders, for messages: ``fededge.service.in`` → a systemd unit."""
    return {"fededge.service.in": "a systemd unit", "start.sh.in": "a start script",
            "mosquitto.conf.in": "mosquitto.conf"}.get(name, name.removesuffix(".in"))
