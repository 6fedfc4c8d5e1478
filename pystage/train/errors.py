"""The typed errors of training: each names the argument (or stage and step), what it got and what was expected.

``TrainError`` is the base of every error ``fit`` raises on purpose. The argument errors are also
``ValueError`` (``FitTypeError`` also ``TypeError``), so ``except ValueError`` keeps working.
"""
from __future__ import annotations

from typing import Any

from pystage.errors import PystageError


class TrainError(PystageError):
    """Base class of pystage's training errors."""


class FitArgumentError(TrainError, ValueError):
    """An argument of ``fit`` (or of a config) that cannot be used; raised before any stage trains."""

    def __init__(self, name: str, got: Any, expected: str, detail: str = "") -> None:
        self.name, self.got, self.expected = name, got, expected
        tail = f" ({detail})" if detail else ""
        super().__init__(f"{name}: got {_short(got)}, expected {expected}{tail}")


class FitTypeError(FitArgumentError, TypeError):
    """An argument of the wrong type (a model that is not an ``nn.Sequential``, a config of another class)."""


class UnsupportedOptionError(FitArgumentError):
    """An option the chosen method does not support (it would otherwise be silently ignored)."""

    def __init__(self, method: str, option: str, got: Any, supported: Any) -> None:
        self.method, self.option = method, option
        super().__init__(option, got, f"its default: method={method!r} does not support {option!r} "
                                      f"(it supports {', '.join(sorted(supported))})")


class GrowthConfigError(FitArgumentError):
    """A growth option out of range; the message names the option, its value and the valid range."""

    def __init__(self, message: str, name: str = "growth", got: Any = None) -> None:
        TrainError.__init__(self, message)
        self.name, self.got, self.expected = name, got, message


class NonFiniteError(TrainError, FloatingPointError):
    """A stage's loss or parameters became NaN or infinite: training stopped, nothing was cached or stored."""

    def __init__(self, stage: str, step: int, what: str) -> None:
        self.stage, self.step, self.what = stage, step, what
        super().__init__(f"stage {stage}: non-finite {what} at step {step}; training stopped and nothing of this "
                         "stage was cached (check the data for NaN/inf values, or lower the learning rate)")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 200 else text[:197] + "..."
