"""An entry's rows held in memory on a device (GPU memory, or host RAM), served in the disk stream's order.

A build whose entry fits the store's device budget keeps the features where it computed them and serves
them from there; an entry opened from disk is loaded there once (verified) when a stream asks for that
device and it fits. Batches are gathered on the device with the row order of ``order.epoch_order``, the
order ``stream()`` reads the file in for the same (batch size, seed, epoch): the same batches, bit for bit,
whether they come from memory or from the file. Host rows bound for CUDA are gathered into reused
page-locked buffers and copied without blocking.

Device budget (``FeatureStore(device_budget=...)``): ``"auto"`` (the default) is half of the device's free
memory when the build (or stream) starts on CUDA, and half the RAM budget on the CPU (what a stream would
hold in RAM anyway); a float in (0, 1] is that fraction of the free memory (of ``psutil``'s available RAM on
the CPU); a size ("2GiB", bytes) is a fixed cap; 0 keeps nothing in memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from pystage.store.errors import StoreArgumentError
from pystage.store.sizes import parse_size

DeviceBudget = Union[str, int, float, None]
PIN_SLOTS = 3  # page-locked staging buffers in flight for host rows going to CUDA


def check_budget(budget: DeviceBudget) -> DeviceBudget:
    """``budget`` validated: "auto", a fraction in (0, 1], a size, or 0/None (nothing in memory)."""
    if budget is None or budget == 0 or budget == "auto":
        return budget
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise StoreArgumentError("device_budget", budget, "'auto', a fraction in (0, 1], a size like '8GiB', or 0")
        return budget
    return parse_size(budget, "device_budget")  # type: ignore[arg-type]


def budget_bytes(budget: DeviceBudget, device: Union[str, torch.device], ram_budget: int) -> int:
    """Bytes of features that may be kept in memory on ``device`` now."""
    budget = check_budget(budget)
    if not budget:
        return 0
    dev = torch.device(device)
    if isinstance(budget, int) and not isinstance(budget, bool):
        return budget
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
    elif budget == "auto":
        return ram_budget // 2
    else:
        import psutil

        free = psutil.virtual_memory().available
    return int(free * (0.5 if budget == "auto" else float(budget)))  # type: ignore[arg-type]


@dataclass
class MemoryRows:
    """Every row of an entry: ``x: (N, *feature_shape)`` as served (bfloat16 as bfloat16), ``y: (N, *label_shape)``.

    ``verified``: the bytes are the ones the entry's checksums describe (built here, or loaded with checks)."""

    x: torch.Tensor
    y: torch.Tensor
    verified: bool = True

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size() + self.y.numel() * self.y.element_size()

    def to(self, device: torch.device) -> "MemoryRows":
        return MemoryRows(self.x.to(device), self.y.to(device), self.verified)


def as_tensor(a: np.ndarray, bfloat16: bool) -> torch.Tensor:
    """A tensor sharing ``a``'s memory; raw bfloat16 bits (uint16) are viewed as ``torch.bfloat16``."""
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if bfloat16 else torch.from_numpy(a)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy array sharing the memory of CPU tensor ``t`` (bfloat16 as its raw uint16 bits)."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


class _Slots:
    """Page-locked buffers that host batches are gathered into before their non-blocking copy to CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.slots, self.next = device, [None] * PIN_SLOTS, 0  # type: ignore[var-annotated]

    def gather(self, rows: MemoryRows, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i, self.next = self.next, (self.next + 1) % PIN_SLOTS
        slot = self.slots[i]
        n = len(idx)
        if slot is None or slot[0].shape[0] < n:
            slot = self.slots[i] = [torch.empty((n, *t.shape[1:]), dtype=t.dtype, pin_memory=True)
                                    for t in (rows.x, rows.y)] + [None]
        if slot[2] is not None:
            slot[2].synchronize()  # the copy out of this buffer (PIN_SLOTS batches ago) is done
        out = []
        for buf, t in zip(slot[:2], (rows.x, rows.y)):
            view = buf[:n]
            torch.index_select(t, 0, idx, out=view)
            out.append(view.to(self.device, non_blocking=True))
        slot[2] = torch.cuda.Event()
        slot[2].record()
        return out[0], out[1]


def memory_batches(rows: MemoryRows, order: np.ndarray, batch_size: int, drop_last: bool,
                   device: Optional[torch.device]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``order``'s rows (consecutive runs of ``batch_size``), gathered where the rows are and moved to
    ``device`` (None: where the rows are)."""
    src = rows.device
    dest = src if device is None else torch.device(device)
    idx = torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64))  # (N,)
    if src.type == "cuda":
        idx = idx.pin_memory().to(src, non_blocking=True)  # the epoch's order: one small copy, no wait
    slots = _Slots(dest) if src.type == "cpu" and dest.type == "cuda" else None
    for i in range(0, len(order), batch_size):
        part = idx[i:i + batch_size]
        if len(part) < batch_size and drop_last:
            return
        if slots is not None:
            yield slots.gather(rows, part)
            continue
        x, y = rows.x.index_select(0, part), rows.y.index_select(0, part)
        yield (x, y) if dest == src else (x.to(dest), y.to(dest))


def same_device(a: torch.device, b: Optional[Any]) -> bool:
    """Whether ``a`` is device ``b`` (``cuda`` matches the current CUDA device)."""
    if b is None:
        return True
    b = torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda" or b.index is None or a.index is None:
        return True
    return a.index == b.index


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def trim_host_heap() -> None:
    """Give freed heap memory back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    Rows freed in RAM (an entry of tens of MiB released once the next stage's features are built) go back to
    glibc's heap, not to the OS: glibc raises its mmap threshold to the size of the last large block freed, so
    the next entries of that size come from the heap, and a run of 14 stages grew the process by ~30 MiB a
    stage (RSS 960 MiB instead of 430 MiB for the default job) with no rows alive. Trimming after each release
    keeps RSS at what is in use; it costs a few milliseconds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

