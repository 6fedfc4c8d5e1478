"""Peak memory of a block of work: CUDA's allocator peak, or the process's peak RSS sampled on CPU."""
from __future__ import annotations

from typing import Optional

import torch

from pystage.memory.measure import PeakRSS

MIB = 2**20


class PeakMeter:
    """Context manager; after it, ``peak_mib`` and ``source`` say what was measured and how."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device, self.interval = device, interval_s
        self.peak_mib = 0.0
        self.source = "cuda max_memory_allocated" if device.type == "cuda" else "psutil peak RSS (process)"
        self._rss: Optional[PeakRSS] = None

    def __enter__(self) -> "PeakMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss = PeakRSS(every=self.interval).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / MIB
            return
        assert self._rss is not None
        self._rss.__exit__(*exc)
        self.peak_mib = self._rss.peak / MIB
