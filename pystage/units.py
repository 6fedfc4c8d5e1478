"""Byte sizes as people write them ("512MiB", "4GiB", "2GB", 1 << 20) to ints, and back.

Binary units (KiB, MiB, GiB, TiB; and the bare K, M, G, T) are powers of 1024;
decimal units (kB/KB, MB, GB, TB) are powers of 1000. Case is ignored, a space
between number and unit is allowed, fractions are allowed ("1.5GiB").
"""
from __future__ import annotations

import math
import re
from typing import Union

from pystage.errors import PystageError

Bytes = Union[int, str]

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


class SizeError(PystageError, ValueError):
    """A value that is not a byte size; ``value`` is what was given, ``name`` the argument it came from."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        super().__init__(f"{name} must be {reason}, got {value!r}")
        self.name, self.value = name, value


def parse_bytes(value: Bytes, name: str = "size") -> int:
    """Bytes from an int (taken as is) or a string: ``"512MiB"`` -> 536870912, ``"2GB"`` -> 2000000000.

    Raises :class:`SizeError` for anything else, for negative sizes and for unknown units.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SizeError(name, value, "an int number of bytes or a string like '512MiB'")
    if isinstance(value, int):
        n = value
    else:
        m = _PATTERN.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise SizeError(name, value, "a size like '512MiB', '4GiB', '2GB' or '1024'")
        n = math.floor(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 0:
        raise SizeError(name, value, "a size >= 0")
    return n


def format_bytes(n: float, digits: int = 1) -> str:
    """Binary units, short: ``1536`` -> ``"1.5KiB"``, ``3 << 30`` -> ``"3.0GiB"``, ``100`` -> ``"100B"``.

    ``parse_bytes(format_bytes(n))`` is ``n`` up to the rounding of ``digits`` decimals.
    """
    sign, n = ("-" if n < 0 else ""), abs(float(n))
    if n < 1024:
        return f"{sign}{n:.0f}B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.{digits}f}{unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def mib(n: float) -> float:
    """Bytes -> MiB, as a float (for tables and JSON)."""
    return n / 2**20
