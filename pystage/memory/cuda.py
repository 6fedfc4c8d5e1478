"""A training step's memory on a CUDA device, computed from the meta trace of the step on any machine.

The meta step (``LiveBytes(record=True)``) gives every tensor allocation and free in order, and the ops
whose CUDA kernels use memory the dispatcher never sees. :func:`replay` plays that trace through a model
of the CUDA caching allocator (:mod:`pystage.memory.allocator`) and adds, where the kernels would:

* **cuBLAS workspaces** (PyTorch's ``CublasHandlePool.cpp``): each cuBLAS handle gets a workspace from the
  caching allocator the first time it runs a matmul, kept for the life of the process: 32 MiB on sm_90,
  4096 KiB x 2 + 16 KiB x 8 elsewhere (or ``CUBLAS_WORKSPACE_CONFIG``). Handles are per thread, and
  backward runs on autograd's device thread, so a step that multiplies matrices in forward and backward
  allocates two; ``addmm`` with a bias (``nn.Linear``) runs through cuBLASLt, whose workspace is another
  1 MiB (``CUBLASLT_WORKSPACE_SIZE``). These are one-off costs: only the first stage a process trains pays
  them (``first=True``); later stages find them allocated.
* **cuDNN convolution workspaces**: each forward, data-gradient and weight-gradient call allocates the
  workspace of the engine cuDNN's heuristics pick, and frees it when the call returns. Which engine is
  picked cannot be read off a CPU; :mod:`pystage.memory.workspace` gives the size (measured on the device
  where there is one, else a model).
* ``foreach`` optimizer temporaries are not a term here: the meta step runs the implementation CUDA runs
  (``TrainConfig.uses_foreach``), so its temporaries are in the trace.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from pystage.memory.allocator import Block, CachingAllocator
from pystage.memory.tracker import Event, TensorSpec
from pystage.memory.workspace import ConvCall, ConvWorkspaces, conv_calls

_aten = torch.ops.aten
BLAS = frozenset({_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
                  _aten.addmv.default, _aten.mv.default})
DEFAULT_CAPABILITY = (9, 0)  # what an estimate on a machine without a GPU assumes: H100 / H200


def cublas_workspace_bytes(capability: tuple[int, int], config: Optional[str] = None) -> int:
    """Bytes of the workspace PyTorch gives each cuBLAS handle (``parseChosenWorkspaceSize``)."""
    if config:
        pairs = re.findall(r":([0-9]+):([0-9]+)", config)
        if pairs:
            return sum(int(size) * 1024 * int(count) for size, count in pairs)
    return 4096 * 8 * 1024 if tuple(capability) == (9, 0) else 4096 * 1024 * 2 + 16 * 1024 * 8


def cublaslt_workspace_bytes(cublas: int, size_kib: Optional[str] = None) -> int:
    """Bytes of the cuBLASLt workspace (``getCUDABlasLtWorkspaceSize``: 1 MiB, at most the cuBLAS one)."""
    kib = int(size_kib) if size_kib and size_kib.isdigit() else 1024
    return min(kib * 1024, cublas)


@dataclass(frozen=True)
class CudaTarget:
    """The CUDA device an estimate is for: what sets the sizes of the hidden terms."""

    capability: tuple[int, int] = DEFAULT_CAPABILITY
    name: str = "no GPU here: an sm_90 GPU (H100/H200) assumed"
    cublas_workspace: int = field(default=-1)  # -1: from capability and the environment, as PyTorch does
    cublaslt_workspace: int = field(default=-1)
    workspaces: ConvWorkspaces = field(default_factory=ConvWorkspaces)

    def __post_init__(self) -> None:
        if self.cublas_workspace < 0:
            object.__setattr__(self, "cublas_workspace", cublas_workspace_bytes(
                self.capability, os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        if self.cublaslt_workspace < 0:
            object.__setattr__(self, "cublaslt_workspace", cublaslt_workspace_bytes(
                self.cublas_workspace, os.environ.get("CUBLASLT_WORKSPACE_SIZE")))

    @classmethod
    def detect(cls, device: torch.device | str = "cuda") -> "CudaTarget":
        """The GPU at ``device`` when there is one (its capability, calibrated workspaces), else the default."""
        if not torch.cuda.is_available():
            return cls()
        device = torch.device(device)
        return cls(tuple(torch.cuda.get_device_capability(device)), torch.cuda.get_device_name(device),
                   workspaces=ConvWorkspaces.on(device))


@dataclass
class CudaStep:
    """One step replayed on the allocator model: peaks of ``memory_allocated`` and ``memory_reserved``."""

    peak: int
    reserved: int
    resident: int
    phase_peaks: dict[str, int]
    once: int  # one-off workspaces (cuBLAS) allocated during the step, included in the peaks
    conv_calls: list[ConvCall]


def replay(events: Sequence[Event], target: CudaTarget, first: bool) -> CudaStep:
    """Play a recorded meta step through the caching-allocator model with the hidden CUDA terms added.

    Events before the first phase are the resident tensors (parameters, state, batch). ``first``: the step
    is the first the process runs, so it allocates the cuBLAS workspaces.
    """
    alloc, blocks = CachingAllocator(), {}
    handles: set[str] = set() if first else {"forward", "backward", "lt-forward", "lt-backward"}
    phase, resident, once = "resident", 0, 0
    peaks: dict[str, int] = {}
    calls: list[ConvCall] = []

    def close(name: str) -> None:
        if name != "resident":
            peaks[name] = max(peaks.get(name, 0), alloc.peak_allocated)

    for ev in events:
        kind = ev[0]
        if kind == "alloc":
            blocks[ev[1]] = alloc.malloc(ev[2])
        elif kind == "free":
            block: Optional[Block] = blocks.pop(ev[1], None)
            if block is not None:
                alloc.free(block)
        elif kind == "phase":
            close(phase)
            if phase == "resident":
                resident = alloc.allocated
            phase = ev[1]
            alloc.reset_peak()
        elif ev[1] in BLAS:
            thread = "backward" if phase == "backward" else "forward"
            for handle, size in ((thread, target.cublas_workspace),
                                 (f"lt-{thread}", target.cublaslt_workspace if _uses_lt(ev[1], ev[2]) else 0)):
                if size and handle not in handles:
                    handles.add(handle)
                    before = alloc.allocated
                    alloc.malloc(size)  # kept for the life of the process
                    once += alloc.allocated - before
        else:
            for call in conv_calls(ev[1], ev[2], ev[3]):
                calls.append(call)
                size = target.workspaces.bytes(call)
                if size:
                    alloc.free(alloc.malloc(size))
    close(phase)
    if phase == "resident":
        resident = alloc.allocated
    return CudaStep(max(peaks.values(), default=alloc.peak_allocated), alloc.peak_reserved, resident, peaks, once,
                    calls)


def _uses_lt(func: object, sig: tuple) -> bool:
    """``addmm(bias, mat1, mat2)`` with a 1-D bias goes through cuBLASLt (``gemm_and_bias``) in PyTorch."""
    if func is not _aten.addmm.default:
        return False
    bias, mat1 = sig[0], sig[1]
    return isinstance(bias, TensorSpec) and len(bias.shape) == 1 and isinstance(mat1, TensorSpec) \
        and mat1.shape[0] > 1 and mat1.shape[1] > 1
