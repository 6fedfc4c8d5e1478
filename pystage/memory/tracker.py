"""Live tensor bytes, op by op: a TorchDispatchMode that counts storages from allocation until they are freed.

The same accounting runs on meta tensors (an estimate that allocates nothing)
and on real tensors (the CPU "measurement"). It plays the role of
``torch.distributed._tools.mem_tracker.MemTracker`` (and agrees with its peak,
see tests/test_memory.py) without its per-module snapshots, which cost more than
the planner can afford for O(layers^2) candidate stages.

What it sees: every storage an ATen op returns, from the moment the op returns
until the storage's last reference dies (weakref callback). What it does not
see: memory an op allocates and frees inside itself (oneDNN/cuDNN workspaces),
allocator caching and fragmentation, and anything outside tensors.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to 512 bytes


Event = tuple
"""What a recording :class:`LiveBytes` saw, in order: ``("alloc", uid, nbytes)``, ``("free", uid)``,
``("phase", name)``, and ``("op", func, args, outputs)`` (as :func:`op_signature`) after the outputs of an op
in :data:`WATCHED` were allocated."""

_aten = torch.ops.aten
WATCHED = frozenset({_aten.convolution.default, _aten.convolution_backward.default, _aten.mm.default,
                     _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.addmv.default,
                     _aten.mv.default})
"""Ops whose CUDA kernels use memory the dispatcher does not see (cuDNN/cuBLAS workspaces)."""


@dataclass(frozen=True)
class TensorSpec:
    """What an op signature keeps of a tensor argument (never the tensor: that would keep it alive)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def op_signature(args: tuple, kwargs: dict) -> tuple:
    """``args`` (then ``kwargs`` values) with tensors replaced by :class:`TensorSpec`; hashable."""
    def spec(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return TensorSpec(tuple(a.shape), tuple(a.stride()), a.dtype)
        if isinstance(a, (list, tuple)):
            return tuple(spec(x) for x in a)
        return a
    return tuple(spec(a) for a in (*args, *kwargs.values()))


@dataclass
class Phase:
    """Live bytes at the start of a phase of a training step, and the highest value reached during it."""

    name: str
    start: int
    peak: int


class LiveBytes(TorchDispatchMode):
    """Counts bytes of live storages on ``device``; ``peak`` is the highest count seen after any op.

    ``device`` is the device whose tensors count ("meta" for an estimate);
    ``round_to`` rounds each storage up, as an allocator would (512 for CUDA, 1 for CPU).
    """

    def __init__(self, device: torch.device | str = "cpu", round_to: int = 1, record: bool = False) -> None:
        super().__init__()
        self.device, self.round_to = torch.device(device), round_to
        self.current = self.peak = 0
        self.phases: list[Phase] = []
        self._live: dict[int, Any] = {}
        self.events: Optional[list[Event]] = [] if record else None
        self._uid = 0

    def _bytes(self, nbytes: int) -> int:
        return -(-nbytes // self.round_to) * self.round_to

    def track(self, tensors: Iterable[Any]) -> None:
        """Count the storages of ``tensors`` (anything not a tensor, or on another device, is skipped)."""
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device != self.device:
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in self._live:
                continue
            n = self._bytes(st.nbytes())
            self._uid += 1
            uid = self._uid
            self._live[key] = weakref.ref(st, lambda _r, key=key, n=n, uid=uid: self._free(key, n, uid))
            self.current += n
            if self.events is not None:
                self.events.append(("alloc", uid, st.nbytes()))
        self._update_peak()

    def _free(self, key: int, n: int, uid: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= n
            if self.events is not None:
                self.events.append(("free", uid))

    def _update_peak(self) -> None:
        self.peak = max(self.peak, self.current)
        if self.phases:
            self.phases[-1].peak = max(self.phases[-1].peak, self.current)

    def phase(self, name: str) -> None:
        """Start a new phase (forward, backward, step...) at the current count."""
        self.phases.append(Phase(name, self.current, self.current))
        if self.events is not None:
            self.events.append(("phase", name))

    def phase_dict(self) -> dict[str, Phase]:
        return {p.name: p for p in self.phases}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.track(tree_flatten(out)[0])
        if self.events is not None and func in WATCHED:
            self.events.append(("op", func, op_signature(args, kwargs or {}), op_signature((out,), {})[0]))
        return out


def storage_bytes(tensors: Iterable[torch.Tensor], round_to: int = 1) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[id(st)] = -(-st.nbytes() // round_to) * round_to
    return sum(seen.values())


def track_device(device: torch.device | str, target: Optional[torch.device | str] = None) -> tuple[torch.device, int]:
    """(device whose tensors count, per-block rounding) for tensors on ``device`` that stand for ``target``."""
    device = torch.device(device)
    target = torch.device(target) if target is not None else device
    return device, CUDA_BLOCK if target.type == "cuda" else 1
