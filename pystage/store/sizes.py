"""Byte sizes for the store's arguments: ``pystage.units`` with the store's errors and a positive-size rule."""
from __future__ import annotations

from typing import Optional, Union

from pystage.store.errors import StoreArgumentError
from pystage.units import SizeError, format_bytes, parse_bytes

Size = Union[int, str]


def parse_size(value: Size, name: str = "size") -> int:
    """Bytes from an int or a string such as ``"256MiB"``, ``"2GB"``, ``"1.5G"`` (K/M/G/T are binary); > 0."""
    try:
        n = parse_bytes(value, name)
    except SizeError:
        raise StoreArgumentError(name, value, "a size like '256MiB', '2GiB', '500MB' or '1024'") from None
    if n <= 0:
        raise StoreArgumentError(name, value, "a positive size")
    return n


def parse_optional_size(value: Optional[Size], name: str) -> Optional[int]:
    """``parse_size`` that lets None through."""
    return None if value is None else parse_size(value, name)


def format_size(n: float) -> str:
    """``1536`` -> ``"1.5KiB"``."""
    return format_bytes(n)
