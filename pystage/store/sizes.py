"""Byte sizes written by people ("256MiB", "2GB", 1 << 20) to ints and back."""
from __future__ import annotations

import re
from typing import Optional, Union

from pystage.store.errors import StoreArgumentError

Size = Union[int, str]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Size, name: str = "size") -> int:
    """Bytes from an int or a string such as ``"256MiB"``, ``"2GB"``, ``"1.5G"`` (K/M/G/T are binary)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise StoreArgumentError(name, value, "an int number of bytes or a string like '256MiB'")
    if isinstance(value, int):
        n = value
    else:
        m = _PATTERN.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise StoreArgumentError(name, value, "a size like '256MiB', '2GiB', '500MB' or '1024'")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise StoreArgumentError(name, value, "a positive size")
    return n


def parse_optional_size(value: Optional[Size], name: str) -> Optional[int]:
    """``parse_size`` that lets None through."""
    return None if value is None else parse_size(value, name)


def format_size(n: float) -> str:
    """``1536`` -> ``"1.5KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"
