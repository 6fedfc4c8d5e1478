"""pystage.units: byte sizes as people write them, and back."""
from __future__ import annotations

import pytest

from pystage.units import SizeError, format_bytes, parse_bytes


@pytest.mark.parametrize("text, expected", [
    ("512MiB", 512 << 20), ("4GiB", 4 << 30), ("2GB", 2 * 10**9), ("1024", 1024), ("1.5GiB", 3 << 29),
    ("256 mib", 256 << 20), ("10kB", 10_000), ("3K", 3072), ("1T", 1 << 40), ("7b", 7), (".5KiB", 512),
    (12345, 12345), (0, 0),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "MiB", "12XB", "1e3", "-5MiB", -1, 1.5, None, True, "5 Mi B"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(SizeError) as err:
        parse_bytes(bad, "memory_budget")
    assert err.value.name == "memory_budget" and err.value.value == bad
    assert "memory_budget" in str(err.value)


@pytest.mark.parametrize("n, text", [(0, "0B"), (100, "100B"), (1023, "1023B"), (1536, "1.5KiB"),
                                     (512 << 20, "512.0MiB"), (3 << 30, "3.0GiB"), (5 << 40, "5.0TiB"),
                                     (-2048, "-2.0KiB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("n", [1, 999, 4096, 123 << 20, 7 << 30])
def test_round_trip(n):
    assert abs(parse_bytes(format_bytes(n, digits=3)) - n) <= n * 1e-3
