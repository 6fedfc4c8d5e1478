"""Which exceptions ``pystage-bench`` prints as one line (the user's to fix), and how they leave worker processes.

A user error is a :class:`pystage.errors.PystageError` (bad data, unknown model, bad option, an impossible
budget, a bad size, a full disk, a corrupt store, a diverged stage). Anything else is a bug and keeps its
traceback. Jobs that run methods in child processes (``train``, ``budget``) get a user
error raised there back as :class:`WorkerError`, with the child's traceback for ``-v``.
"""
from __future__ import annotations

import traceback
from typing import Any, Optional

from pystage.errors import PystageError


class WorkerError(PystageError):
    """A user error raised in a worker process; ``child_traceback`` is the traceback there."""

    def __init__(self, message: str, child_traceback: str = "") -> None:
        super().__init__(message)
        self.child_traceback = child_traceback


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types a job reports as ``pystage-bench <job>: error: <message>`` (exit status 2)."""
    return (PystageError,)


def to_json(exc: BaseException) -> dict[str, Any]:
    """A user error as the JSON a worker writes instead of its figures."""
    return {"error": {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}}


def from_json(out: dict[str, Any], what: str) -> Optional[WorkerError]:
    """The :class:`WorkerError` in a worker's JSON (``what``: which run, for the message), or None."""
    err = out.get("error")
    if not err:
        return None
    return WorkerError(f"{what}: {err['message']}", err.get("traceback", ""))
