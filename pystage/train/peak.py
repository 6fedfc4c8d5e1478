"""Peak memory of a block of work: CUDA's allocator peak, or the process's peak RSS sampled on CPU."""
from __future__ import annotations

import threading
from typing import Optional

import psutil
import torch

MIB = 2**20


class PeakMeter:
    """Context manager; after it, ``peak_mib`` and ``source`` say what was measured and how."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device, self.interval = device, interval_s
        self.peak_mib = 0.0
        self.source = "cuda max_memory_allocated" if device.type == "cuda" else "psutil peak RSS (process)"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._proc = psutil.Process()
            self._peak = self._proc.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / MIB
            return
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mib = self._peak / MIB
