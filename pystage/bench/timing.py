"""One timing helper for every benchmark: warm-up, synchronize, median of repeats."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 3, repeats: int = 11,
              setup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``fn()`` in milliseconds; ``setup()`` runs untimed before each call."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
