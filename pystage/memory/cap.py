"""A memory budget the GPU enforces: the CUDA caching allocator capped while a stage trains.

``with StageCap(device, budget, planned) as cap:`` sets ``torch.cuda.set_per_process_memory_fraction``
so that the allocator may hold at most what was allocated when the block started plus ``budget`` bytes,
and puts the previous fraction back when the block ends. Going over the budget is then a
``torch.OutOfMemoryError`` raised by the allocator - before cuDNN takes a smaller-workspace engine if
there is one - which ``fit``'s guard catches to re-plan the rest, never a silent overrun.

What the cap counts is the allocator's *reserved* memory (segments), the memory the GPU really gives
the process: cached free blocks are released and the request retried before the error is raised, but a
stage whose blocks fragment its segments can fail below its allocated-byte budget. The budget sits on top
of what the process holds when the stage starts (the CUDA context, cuBLAS workspaces, earlier stages'
weights): those are not the stage's, and the planner does not count them either.

After the block, on CUDA: ``used_mib`` (``max_memory_allocated`` above what was allocated when the block
started: what the budget bounds, the quantity the planner predicts) and ``reserved_mib``
(``max_memory_reserved`` above the reserved memory at the start), beside ``planned_mib`` (the planner's
figure for the stage). On a CPU device, or without a budget, the block is not capped; on CPU only
``planned_mib`` is set.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)
MIB = 2**20


class StageCap:
    """Cap the caching allocator of ``device`` at (allocated now + ``budget``) bytes inside the block."""

    def __init__(self, device: torch.device | str, budget: Optional[int] = None, planned: Optional[int] = None) -> None:
        self.device = torch.device(device)
        if budget is not None and budget <= 0:
            raise ValueError(f"budget must be a positive number of bytes or None, got {budget}")
        self.budget, self.planned = budget, planned
        self.limit: Optional[int] = None  # bytes the allocator may hold inside the block (CUDA with a budget)
        self.used_mib: Optional[float] = None
        self.reserved_mib: Optional[float] = None
        self._previous: Optional[float] = None
        self._base = (0, 0)  # allocated, reserved when the block started

    @classmethod
    def for_stage(cls, device: torch.device | str, plan: Any, k: int) -> "StageCap":
        """The cap for stage ``k`` of ``plan`` (a ``pystage.plan.Plan`` or None: no cap)."""
        if plan is None:
            return cls(device)
        planned = plan.stages[k].peak if 0 <= k < len(plan.stages) else None
        return cls(device, plan.budget, planned)

    @property
    def planned_mib(self) -> Optional[float]:
        return None if self.planned is None else self.planned / MIB

    @property
    def active(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def __enter__(self) -> "StageCap":
        if not self.active:
            return self
        torch.cuda.synchronize(self.device)
        if self.budget is not None:
            torch.cuda.empty_cache()  # the stage starts from its own blocks only
            total = torch.cuda.get_device_properties(self.device).total_memory
            self.limit = torch.cuda.memory_allocated(self.device) + self.budget
            get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
            self._previous = get(self.device) if get is not None else 1.0
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.limit / total), self.device)
            log.debug("CUDA allocator capped at %.1f MiB (budget %.1f MiB)", self.limit / MIB, self.budget / MIB)
        self._base = (torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.active:
            return
        torch.cuda.synchronize(self.device)
        self.used_mib = (torch.cuda.max_memory_allocated(self.device) - self._base[0]) / MIB
        self.reserved_mib = (torch.cuda.max_memory_reserved(self.device) - self._base[1]) / MIB
        if self._previous is not None:
            torch.cuda.set_per_process_memory_fraction(self._previous, self.device)
            self._previous = None
