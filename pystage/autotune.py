"""Masked or dense-then-discard backward: per shape, dtype and device, the faster one, measured once.

Like ``torch.backends.cudnn.benchmark``: the first backward of ``masked_linear`` / ``masked_conv2d`` with
a new shape (grad, x and weight shapes, ``in_split``, frozen units, conv arguments, which gradients are
wanted) on a device and dtype runs every candidate path a few times and keeps the fastest; every later
backward of that shape runs it. The cache lives in C++ (csrc/backward_paths.cpp), so a step pays no
Python for it; this module is the tuner it asks on a miss.

Candidates (csrc/masked_backward.h): ``masked`` (least work), ``dense`` (the dense layer's backward call,
then the frozen part discarded) and, for linear layers on CUDA whose bias gradient is wanted,
``masked+fused-bias`` (the bias gradient folded into the weight-gradient GEMM by cuBLASLt).

Measuring off (``set_autotune(False)`` or ``PYSTAGE_AUTOTUNE=0``), and under
``torch.use_deterministic_algorithms(True)`` (a measured choice can differ from run to run, and the paths
round differently): :func:`heuristic` decides.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from pystage import _ext  # noqa: F401  (registers torch.ops.pystage.*)

MASKED, DENSE, FUSED_BIAS = 0, 1, 2
PATH_NAMES = {MASKED: "masked", DENSE: "dense", FUSED_BIAS: "masked+fused-bias"}

# A timer runs ``fn`` (one backward on one path) and returns its time in ms; injected by tests.
Timer = Callable[[str, Callable[[], object], torch.device], float]

# Heuristic on CUDA: below this many multiply-adds in a dense backward a layer is launch-bound (kernels of ~10 us).
CUDA_MIN_DENSE_MACS = 4e9
# ... and the masked path must skip at least this fraction of the dense FLOPs to be worth its extra launches.
CUDA_MIN_SAVING = 0.5


@dataclass(frozen=True)
class Decision:
    """One tuned shape: the path it runs and, when measured, each candidate's median time."""

    op: str
    device: str
    dtype: torch.dtype
    grad_shape: tuple
    x_shape: tuple
    w_shape: tuple
    in_split: int
    out_frozen: int
    output_mask: tuple
    path: str
    measured: bool
    times_ms: dict = field(default_factory=dict)


def _env_enabled() -> bool:
    return os.environ.get("PYSTAGE_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


class _State:
    def __init__(self) -> None:
        self.enabled = _env_enabled()
        self.timer: Optional[Timer] = None
        self.decisions: list[Decision] = []


_state = _State()


def set_autotune(enabled: bool) -> None:
    """Measure (True, the default) or use :func:`heuristic` (False); forgets the paths picked so far."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_autotune expects a bool, got {enabled!r}")
    _state.enabled = enabled
    clear_cache()


def autotune_enabled() -> bool:
    return _state.enabled


def clear_cache() -> None:
    """Forget every picked path (C++ cache and :func:`decisions`): the next backward of each shape picks again."""
    torch.ops.pystage.autotune_clear()
    _state.decisions.clear()


def decisions() -> list[Decision]:
    """The shapes tuned since the last :func:`clear_cache`, in order (for reports: which path ran)."""
    return list(_state.decisions)


def set_timer(timer: Optional[Timer]) -> Optional[Timer]:
    """Replace the measurement (``None``: the default wall-clock timer); returns the previous one."""
    previous, _state.timer = _state.timer, timer
    return previous


@contextmanager
def using_timer(timer: Timer) -> Iterator[None]:
    """Within the block, measure with ``timer`` (and start from an empty cache); restores both after."""
    previous = set_timer(timer)
    clear_cache()
    try:
        yield
    finally:
        set_timer(previous)
        clear_cache()


def wall_clock_ms(name: str, fn: Callable[[], object], device: torch.device, warmup: int = 1,
                  repeats: int = 3) -> float:
    """Median wall time of ``fn()`` in ms after ``warmup`` calls; synchronizes a CUDA device around each call."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------- the policy

def _flops(grad_shape: Sequence[int], x_shape: Sequence[int], w_shape: Sequence[int], in_split: int,
           mask: Sequence[bool]) -> tuple[float, float]:
    """(dense, masked) multiply-adds of the wanted gradients, per the cost model of DESIGN.md."""
    out, n_in = grad_shape[1], x_shape[1]
    t, in_active = w_shape[0], w_shape[1]
    per_unit = math.prod(w_shape[2:]) * grad_shape[0] * math.prod(grad_shape[2:])  # kernel taps x output positions
    dense = per_unit * out * n_in * (int(mask[0]) + int(mask[1]))
    masked = per_unit * t * (in_active * int(mask[1]) + (in_active - in_split) * int(mask[0]))
    return float(dense), float(masked)


def heuristic(op: str, device: torch.device, grad_shape: Sequence[int], x_shape: Sequence[int],
              w_shape: Sequence[int], in_split: int, output_mask: Sequence[bool]) -> int:
    """The path used with measuring off.

    CPU: masked (the CPU kernels win at every shape measured in bench/RESULTS.md, and at full width the
    masked path is the dense call). CUDA: masked when the layer is big enough not to be launch-bound
    (dense backward >= ``CUDA_MIN_DENSE_MACS`` multiply-adds) and the masked path skips at least
    ``CUDA_MIN_SAVING`` of them; dense otherwise.
    """
    if device.type != "cuda":
        return MASKED
    dense, masked = _flops(grad_shape, x_shape, w_shape, in_split, output_mask)
    if dense >= CUDA_MIN_DENSE_MACS and masked <= (1 - CUDA_MIN_SAVING) * dense:
        return MASKED
    return DENSE


def candidates(op: str, device: torch.device, output_mask: Sequence[bool]) -> list[int]:
    """The paths worth measuring for this call, masked first (it wins ties)."""
    paths = [MASKED, DENSE]
    if op == "masked_linear" and device.type == "cuda" and output_mask[1] and output_mask[2]:
        paths.insert(1, FUSED_BIAS)
    return paths


# ------------------------------------------------------------------------------------------- the tuner

def _runner(op: str, args: tuple, path: int) -> Callable[[], object]:
    grad_out, x, w_train, in_split, out_frozen, stride, padding, dilation, mask = args
    if op == "masked_linear":
        return lambda: torch.ops.pystage.masked_linear_backward(grad_out, x, w_train, in_split, out_frozen, mask, path)
    return lambda: torch.ops.pystage.masked_conv2d_backward(grad_out, x, w_train, in_split, out_frozen, stride,
                                                            padding, dilation, mask, path)


def _measure(op: str, args: tuple, paths: list[int], device: torch.device) -> dict[int, float]:
    timer = _state.timer or wall_clock_ms
    times = {}
    for path in paths:
        try:
            times[path] = float(timer(PATH_NAMES[path], _runner(op, args, path), device))
        except torch.OutOfMemoryError:  # a path that does not fit is not a candidate
            times[path] = math.inf
        except RuntimeError:  # nor is an alternative the libraries refuse; the masked path itself must run
            if path == MASKED:
                raise
            times[path] = math.inf
    return times


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _pick(op: str, grad_out: Tensor, x: Tensor, w_train: Tensor, in_split: int, out_frozen: int,
          stride: list[int], padding: list[int], dilation: list[int], output_mask: list[bool]) -> tuple[int, bool]:
    """Kernel of ``pystage::autotune_pick``: (path, whether the C++ cache may keep it)."""
    device, mask = x.device, tuple(bool(m) for m in output_mask)
    args = (grad_out, x, w_train, in_split, out_frozen, stride, padding, dilation, list(mask))
    guess = heuristic(op, device, grad_out.shape, x.shape, w_train.shape, in_split, mask)
    if _capturing(device):  # no timing inside a CUDA graph capture: decide later, outside it
        return guess, False
    times: dict[int, float] = {}
    path = guess
    measure = _state.enabled and not torch.are_deterministic_algorithms_enabled()
    if measure:
        paths = candidates(op, device, mask)
        times = _measure(op, args, paths, device)
        path = min(paths, key=lambda p: times[p])  # min keeps the first of equal times: masked
    _state.decisions.append(Decision(
        op=op, device=str(device), dtype=x.dtype, grad_shape=tuple(grad_out.shape), x_shape=tuple(x.shape),
        w_shape=tuple(w_train.shape), in_split=in_split, out_frozen=out_frozen, output_mask=mask,
        path=PATH_NAMES[path], measured=measure, times_ms={PATH_NAMES[p]: t for p, t in times.items()}))
    return path, True


_lib = torch.library.Library("pystage", "IMPL")  # noqa: TOR901 (kept alive: it holds the registration)
_lib.impl("autotune_pick", _pick, "CompositeExplicitAutograd")
