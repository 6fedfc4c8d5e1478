"""Errors of the masked layers and the checks of their constructor arguments.

Each error names the argument, the value it got and what was expected, before any tensor is made.
"""
from __future__ import annotations

import operator
from typing import Any, Optional, Sequence, Union

from pystage.errors import PystageError

_IntPair = Union[int, Sequence[int]]


class GrowthError(PystageError, ValueError):
    """A growth or freeze request that the layer cannot satisfy; carries the numbers."""


class LayerArgumentError(GrowthError):
    """A masked layer's constructor argument of the wrong type or out of range."""

    def __init__(self, layer: str, name: str, got: Any, expected: str) -> None:
        self.layer, self.name, self.got, self.expected = layer, name, got, expected
        super().__init__(f"{layer}: {name} must be {expected}, got {got!r}")


def _as_int(v: Any) -> Optional[int]:
    """v as an int if it is one (Python, NumPy or 0-d integer tensor; not a bool or a float), else None."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def check_int(layer: str, name: str, v: Any, lo: int, hi: Optional[int] = None, what: str = "") -> int:
    """v as an int in [lo, hi] (hi None: no upper bound), else LayerArgumentError."""
    i = _as_int(v)
    if i is None or i < lo or (hi is not None and i > hi):
        if hi is None:
            raise LayerArgumentError(layer, name, v, f"an int >= {lo}" + (f" ({what})" if what else ""))
        raise LayerArgumentError(layer, name, v, f"in [{lo}, {hi}] ({what + ', ' if what else ''}an int)")
    return i


def int_pair(layer: str, name: str, v: _IntPair, lo: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= lo, as a pair (nn.Conv2d's spelling of kernel_size, stride, ...)."""
    items = (v, v) if _as_int(v) is not None else (tuple(v) if isinstance(v, (tuple, list)) else ())
    ints = tuple(_as_int(i) for i in items)
    if len(ints) != 2 or any(i is None or i < lo for i in ints):
        raise LayerArgumentError(layer, name, v, f"an int or a pair of ints, each >= {lo}")
    return ints  # type: ignore[return-value]


def check_bool(layer: str, name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise LayerArgumentError(layer, name, v, "True or False")
    return v
