"""Batches onto the training device: pinned staging and non-blocking copies on CUDA, the dtype cast on the device.

A CPU batch bound for a GPU is first copied into a page-locked staging buffer (one of ``slots``, reused
round-robin once the copy out of it has finished), then copied to the device without blocking the host, so
the next batch is gathered while this one crosses the bus. A batch already pinned (the feature store's
windows) or already on the device goes as it is. Floating inputs are cast to the model's dtype *after* the
copy: stored fp16/bf16 features cross the bus at half size and fp64 features are accepted.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def model_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating parameter (float32 when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


class _Slot:
    """One pinned staging buffer per tensor of a batch, and the event after the copy out of it."""

    def __init__(self) -> None:
        self.buffers: dict[int, Tensor] = {}
        self.event: Optional[torch.cuda.Event] = None

    def stage(self, i: int, t: Tensor) -> Tensor:
        buf = self.buffers.get(i)
        if buf is None or buf.dtype != t.dtype or buf.numel() < t.numel():
            buf = torch.empty(max(t.numel(), 1), dtype=t.dtype, pin_memory=True)
            self.buffers[i] = buf
        view = buf[:t.numel()].view(t.shape)
        view.copy_(t)
        return view


class Feed:
    """``feed(x, y)``: the batch on ``device``, ``x`` in ``dtype`` when it is floating."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32, slots: int = 2) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self._slots = [_Slot() for _ in range(slots)] if self.device.type == "cuda" else []
        self._next = 0

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if x.device != self.device or y.device != self.device:
            x, y = self._move(x, y)
        if x.is_floating_point() and x.dtype != self.dtype:
            x = x.to(self.dtype)  # on the device
        return x, y

    def _move(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not self._slots:
            return x.to(self.device), y.to(self.device)
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        if slot.event is not None:
            slot.event.synchronize()  # the copy out of this buffer (two batches ago) is done
        out = []
        for i, t in enumerate((x, y)):
            if t.device.type == "cpu" and not t.is_pinned():
                t = slot.stage(i, t)
            out.append(t.to(self.device, non_blocking=True))
        slot.event = torch.cuda.Event()
        slot.event.record()
        return out[0], out[1]
