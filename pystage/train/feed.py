"""Batches onto the training device: prefetched, pinned, copied on a side stream, cast on the device.

A CPU batch bound for a GPU is first copied into a page-locked staging buffer (one of ``slots``, reused
round-robin once the copy out of it has finished), then copied to the device on a copy stream without
blocking the host; the compute stream waits for that copy only where it uses the batch. ``Feed.batches``
runs one batch ahead: batch i+1 is gathered and its copy issued before batch i is handed to the step, so the
host work and the transfer of the next batch overlap the current step on the device. On the CPU, a source
whose batches cost host work (``source.prefetch``: row-by-row reads) is read by a background thread, up to
``depth`` batches ahead. A batch already pinned (the store's windows) goes as it is; one already on the
device (a data set or a store entry held in device memory) is not copied at all. Floating inputs are cast to
the model's dtype *after* the copy: stored fp16/bf16 features cross the bus at half size.

Nothing here waits for the device except a staging buffer's reuse, which waits for the copy out of it
``slots`` batches earlier.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

THREAD_NAME = "pystage-prefetch"


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
    """``feed(x, y)``: the batch on ``device``, ``x`` in ``dtype`` when it is floating; ``feed.batches(it)``: every
    batch of ``it`` so, prefetched."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32, slots: int = 3, depth: int = 2) -> None:
        self.device, self.dtype, self.depth = torch.device(device), dtype, depth
        cuda = self.device.type == "cuda"
        if cuda and self.device.index is None:  # "cuda" is the current device: a tensor there is on cuda:<i>
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._slots = [_Slot() for _ in range(slots)] if cuda else []
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._next = 0

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._ready(*self._issue(x, y))

    def batches(self, items: Iterable[tuple[Tensor, Tensor]], threaded: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """Every batch of ``items`` fed, one ahead (its copy in flight while the caller runs a step on the one
        before); ``threaded``: ``items`` is read by a background thread (CPU sources with host work per batch)."""
        source = _threaded(iter(items), self.depth) if threaded else iter(items)
        try:
            ahead = next(source, None)
            issued = None if ahead is None else self._issue(*ahead)
            while issued is not None:
                ahead = next(source, None)
                current, issued = issued, (None if ahead is None else self._issue(*ahead))
                yield self._ready(*current)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _issue(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Optional[torch.cuda.Event]]:
        """Start moving the batch: (x, y on the device, the event after their copy; None: nothing to wait for)."""
        if x.device == self.device and y.device == self.device:
            return x, y, None
        if not self._slots:
            return x.to(self.device), y.to(self.device), None
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        if slot.event is not None:
            slot.event.synchronize()  # the copy out of this buffer (``slots`` batches ago) is done
        out = []
        with torch.cuda.stream(self._stream):  # type: ignore[arg-type]
            for i, t in enumerate((x, y)):
                if t.device.type == "cpu" and not t.is_pinned():
                    t = slot.stage(i, t)
                out.append(t.to(self.device, non_blocking=True))
            slot.event = torch.cuda.Event()
            slot.event.record()
        return out[0], out[1], slot.event

    def _ready(self, x: Tensor, y: Tensor, copied: Optional[torch.cuda.Event]) -> tuple[Tensor, Tensor]:
        """The batch as the step uses it: the compute stream waits for its copy (on the device, not the host)."""
        if copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            for t in (x, y):
                t.record_stream(compute)  # its memory is not reused before the step that reads it has run
        if x.is_floating_point() and x.dtype != self.dtype:
            x = x.to(self.dtype)  # on the device
        return x, y


def _threaded(items: Iterator[tuple[Tensor, Tensor]], depth: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``items`` read by a background thread, at most ``depth`` batches ahead; closing stops the thread."""
    q: "queue.Queue[object]" = queue.Queue(maxsize=max(1, depth))
    stop, done = threading.Event(), object()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - raised in the consumer
            q.put(e)

    thread = threading.Thread(target=work, name=THREAD_NAME, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
        close = getattr(items, "close", None)
        if close is not None:
            close()  # the source's own clean-up (a store stream's read threads) runs now, not at garbage collection
