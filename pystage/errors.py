"""The base class of the errors a user can fix: bad input, missing or malformed data, an impossible request.

pystage's typed errors derive from :class:`PystageError` (and from the builtin that fits, e.g.
``ValueError``), so a caller can tell "your input" from "a bug": ``pystage-bench`` prints a
``PystageError`` as one line (``-v`` adds the traceback) and lets anything else show its traceback.
Each message names the argument or path, the value it got and what was expected.
"""
from __future__ import annotations


class PystageError(Exception):
    """An error in what the user asked for or supplied (not a bug); the message says what to change."""


class UsageError(PystageError, ValueError):
    """An option or argument value that cannot work; the message names the option, the value and what was expected."""
