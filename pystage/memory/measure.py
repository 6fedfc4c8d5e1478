"""Run one training step of a stage and report its memory: estimated (meta), or measured (CPU / CUDA).

All three return a :class:`StageMemory`; only where the bytes come from differs:
* ``estimate_step``: meta tensors under :class:`LiveBytes` - nothing is allocated;
* ``measure_cpu_step``: the same accounting on real CPU tensors, plus peak RSS as a cross-check;
* ``measure_cuda_step``: ``torch.cuda.max_memory_allocated`` around a real step.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import psutil
import torch

from pystage.memory.cuda import CudaTarget, replay
from pystage.memory.step import Stage, training_step
from pystage.memory.tracker import CUDA_BLOCK, LiveBytes, storage_bytes


@dataclass(frozen=True)
class StageMemory:
    """Peak bytes of one training step of a stage (layers [start, stop) + head), and where they come from."""

    start: int
    stop: int
    peak: int  # the number the planner compares with the budget
    resident: int  # parameters + buffers + optimizer state + input batch + labels, before the step
    forward_peak: int = 0  # highest live bytes during forward + loss
    backward_peak: int = 0  # ... during backward
    step_peak: int = 0  # ... during optimizer.step
    source: str = "estimate"  # "estimate" | "cpu" | "cuda"
    rss_peak: Optional[int] = None  # CPU only: resident + peak RSS growth during the step (cross-check)
    fallback_layers: tuple[int, ...] = field(default=())  # layers estimated by the conservative stand-in
    reserved: Optional[int] = None  # CUDA: peak memory_reserved (segments the caching allocator holds)
    tensor_peak: Optional[int] = None  # CUDA estimate: the live-tensor peak alone (no allocator, no workspaces)
    once: int = 0  # CUDA: one-off workspaces (cuBLAS) the step allocates, included in peak (first stage only)


def _tracked_step(stage: Stage, device: torch.device, round_to: int, record: bool = False) -> LiveBytes:
    tracker = LiveBytes(device, round_to, record)
    tracker.track(stage.resident())
    with tracker:
        training_step(stage, tracker.phase)
    return tracker


def _from_tracker(tracker: LiveBytes, start: int, stop: int, resident: int, source: str,
                  **extra: Any) -> StageMemory:
    ph = tracker.phase_dict()
    return StageMemory(start, stop, tracker.peak, resident, ph["forward"].peak, ph["backward"].peak,
                       ph["step"].peak, source, **extra)


def estimate_step(stage: Stage, start: int, stop: int, target: torch.device,
                  fallback_layers: tuple[int, ...] = (), cuda: Optional[CudaTarget] = None) -> StageMemory:
    """Peak of one step of ``stage`` (built on meta tensors) as it would be on ``target``.

    For a CUDA target the recorded step is replayed on the caching-allocator model with the workspaces
    of ``cuda`` (default: :meth:`CudaTarget.detect`); the stage starting at layer 0 is the first one a
    training run steps, so it pays the one-off cuBLAS workspaces.
    """
    if target.type == "cuda":
        tracker = _tracked_step(stage, torch.device("meta"), CUDA_BLOCK, record=True)
        assert tracker.events is not None
        step = replay(tracker.events, cuda or CudaTarget.detect(target), first=start == 0)
        ph = step.phase_peaks
        return StageMemory(start, stop, step.peak, step.resident, ph.get("forward", 0), ph.get("backward", 0),
                           ph.get("step", 0), "estimate", fallback_layers=fallback_layers, reserved=step.reserved,
                           tensor_peak=tracker.peak, once=step.once)
    resident = storage_bytes(t for t in stage.resident() if t.device.type == "meta")
    tracker = _tracked_step(stage, torch.device("meta"), 1)
    # optimizer state kept on the CPU side even for meta parameters (Adam's step counters): CPU memory
    host = storage_bytes(t for t in stage.resident() if t.device.type == "cpu")
    for p in tracker.phases:
        p.start, p.peak = p.start + host, p.peak + host
    tracker.peak += host
    return _from_tracker(tracker, start, stop, resident + host, "estimate", fallback_layers=fallback_layers)


class PeakRSS:
    """Peak resident set size of this process while the ``with`` block runs, sampled every ``every`` s."""

    def __init__(self, every: float = 0.0005) -> None:
        self.every, self.proc = every, psutil.Process()
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def measure_cpu_step(stage: Stage, start: int, stop: int) -> StageMemory:
    """Peak of one real step of ``stage`` on CPU: live-tensor accounting, and resident + RSS growth beside it."""
    resident = storage_bytes(t for t in stage.resident() if t.device.type == "cpu")
    with PeakRSS() as rss:
        tracker = _tracked_step(stage, torch.device("cpu"), 1)
    return _from_tracker(tracker, start, stop, resident, "cpu", rss_peak=resident + rss.growth)


def measure_cuda_step(build: Any, start: int, stop: int, device: torch.device,
                      first: Optional[bool] = None) -> StageMemory:
    """Peak of one real step on CUDA: ``max_memory_allocated`` minus what was allocated before the stage existed.

    ``build()`` must create the stage on ``device``; it is called here, after the baseline is read.
    ``first`` (default: ``start == 0``): the step runs as the first stage of a training run, which allocates
    the process's cuBLAS workspaces; otherwise they are allocated beforehand, as an earlier stage would have
    (the same convention as the estimate). ``reserved``: the peak of ``memory_reserved`` during the step above
    what was reserved before it (after ``empty_cache``): the segments the stage added.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("measure_cuda_step needs CUDA, but torch.cuda.is_available() is False")
    cublas_workspaces(device, allocated=not (start == 0 if first is None else first))
    torch.cuda.empty_cache()  # reserved growth is then the stage's own segments, as in the estimate's replay
    torch.cuda.synchronize(device)
    before, reserved_before = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    stage: Stage = build()
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device) - before
    phases: dict[str, int] = {}
    reserved = [0]

    def mark(name: str) -> None:
        torch.cuda.synchronize(device)
        if phases:
            phases[list(phases)[-1]] = torch.cuda.max_memory_allocated(device) - before
            reserved[0] = max(reserved[0], torch.cuda.max_memory_reserved(device) - reserved_before)
        phases[name] = 0
        torch.cuda.reset_peak_memory_stats(device)

    training_step(stage, mark)
    mark("end")
    peak = max(phases[p] for p in ("forward", "backward", "step"))
    return StageMemory(start, stop, peak, resident, phases["forward"], phases["backward"], phases["step"], "cuda",
                       reserved=reserved[0])


def cublas_workspaces(device: torch.device, allocated: bool) -> None:
    """Free the process's cuBLAS workspaces (``allocated=False``), or make sure they exist: the forward
    thread's, cuBLASLt's and autograd's device thread's (one ``nn.Linear`` step on ``device``)."""
    torch.cuda.synchronize(device)
    if not allocated:
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        return
    x = torch.ones(2, 2, device=device, requires_grad=True)
    torch.nn.functional.linear(x, torch.ones(2, 2, device=device), torch.ones(2, device=device)).sum().backward()
    torch.cuda.synchronize(device)
