"""What a name may be: party ids, federation names, run ids. Standard library only.

Ids become MQTT topic levels, user names in Mosquitto's password file and ACL, directory names
and systemd unit text, so the rule is strict: 1-64 letters, digits, ``.``, ``_`` or ``-``,
starting with a letter or digit (a leading dot would hide a kit directory and could name
``deploy/.sync``). ``\\A`` and ``\\Z`` anchor the whole string: ``$`` would also match before a
trailing newline, and ``"a1\\n"`` would pass and then break the ACL file.
"""

from __future__ import annotations

import re

ID_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
ID_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_id(value: object) -> bool:
    """True if ``value`` is a string that may be used as an id."""
    return isinstance(value, str) and ID_PATTERN.match(value) is not None
