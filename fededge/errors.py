"""The one base of every error a user can cause: bad input, a broken kit, an unreachable broker.

The command line catches ``FedEdgeError`` and prints its message as one line; anything else is
a bug and keeps its traceback. Each subclass also derives from the built-in exception it always
was (``ValueError``, ``RuntimeError``), so library callers catching those keep working.
Standard library only: the torch-free edge agent imports it too.
"""

from __future__ import annotations


class FedEdgeError(Exception):
    """A problem the user can fix; the message names the bad input and the fix."""
