"""cuDNN convolution workspaces: which calls a convolution makes, and how much scratch memory each takes.

PyTorch (``aten/src/ATen/native/cudnn/Conv_v8.cpp``, ``benchmark=False``) asks cuDNN's heuristics for
engine configurations and runs the first that works, with a workspace of that engine's size taken from the
caching allocator for the duration of the call. The size depends on the engine cuDNN picks for the GPU,
the cuDNN version, the shapes and the dtype, so it cannot be derived on a CPU. Two sources:

* **measured** (:meth:`ConvWorkspaces.on`): where a GPU is present, each distinct call (kind, shapes,
  dtype, stride, padding, dilation, groups) runs once, alone, on the device, and what it took above its
  inputs and outputs (``max_memory_allocated`` during the call minus ``memory_allocated`` after it) is
  its workspace from then on;
* **modelled** (:func:`modelled_workspace`), everywhere else - see its docstring for what is derived and
  what is a constant calibrated on recorded H200 figures.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from pystage.memory.tracker import TensorSpec

logger = logging.getLogger(__name__)
_aten = torch.ops.aten
MiB = 1 << 20


@dataclass(frozen=True)
class ConvCall:
    """One cuDNN call: ``kind`` "fwd" (x, w -> y), "dgrad" (dy, w -> dx) or "wgrad" (x, dy -> dw)."""

    kind: str
    x: TensorSpec  # the convolution's input (or its gradient, for dgrad: same shape)
    w: TensorSpec
    y: TensorSpec  # the convolution's output (or its gradient)
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int

    @property
    def operand_bytes(self) -> int:
        """Bytes of the two activation-sized operands of the call (input and output, or their gradients)."""
        return self.x.nbytes + self.y.nbytes


def conv_calls(func: Any, args: tuple, outputs: Any = None) -> list[ConvCall]:
    """The cuDNN calls behind one ``aten.convolution`` / ``aten.convolution_backward`` (as op signatures)."""
    if func is _aten.convolution.default:
        x, w, _bias, stride, padding, dilation, transposed, output_padding, groups = args[:9]
        y = outputs
        return [ConvCall("fwd", x, w, y, *_geometry(stride, padding, dilation, transposed, output_padding, groups))]
    if func is _aten.convolution_backward.default:
        dy, x, w, _bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask = args[:11]
        geo = _geometry(stride, padding, dilation, transposed, output_padding, groups)
        kinds = [k for k, on in zip(("dgrad", "wgrad"), mask[:2]) if on]
        return [ConvCall(k, x, w, dy, *geo) for k in kinds]
    return []


def _geometry(stride: Any, padding: Any, dilation: Any, transposed: Any, output_padding: Any,
              groups: Any) -> tuple:
    return tuple(stride), tuple(padding), tuple(dilation), bool(transposed), tuple(output_padding), int(groups)


def modelled_workspace(call: ConvCall) -> int:
    """The workspace of ``call`` when it cannot be measured on the device: a model with one calibrated constant.

    * **NHWC copies** (derived): cuDNN's tensor-core engines work on NHWC data, so a call on NCHW tensors
      keeps NHWC copies of its two activation-sized operands in its workspace (input and output for
      forward, both gradients for dgrad, input and output gradient for wgrad): ``operand_bytes``. None for
      channels-last inputs.
    * **split-K partial sums** (calibrated): a weight-gradient call reduces over batch x height x width,
      which its engines split into slices with one fp32 partial weight gradient each;
      ``SPLIT_K_SLICES`` partials. A wgrad call takes the larger of the two terms.

    ``SPLIT_K_SLICES = 512`` is fitted to the recorded H200 run (cuDNN 9, torch 2.11, fp32, batch 256,
    64 -> 64 channels, 3x3): stages whose largest live set falls at 8x8 maps need 72-77 MiB above their
    tensors there, 512 x the 144 KiB weight gradient. The NHWC-copy term has no constant, and alone it
    predicts the stages whose peak falls at 32x32 maps (0.5% low). See docs/planner.md.
    """
    copies = 0 if _channels_last(call.x) else call.operand_bytes
    if call.kind == "wgrad":
        numel = call.w.nbytes // call.w.dtype.itemsize
        return max(copies, SPLIT_K_SLICES * numel * 4)
    return copies


SPLIT_K_SLICES = 512  # calibrated on the recorded H200 figures (see modelled_workspace)


def _channels_last(t: TensorSpec) -> bool:
    """A 4-D tensor laid out NHWC (channels innermost) that is not also NCHW-contiguous."""
    if len(t.shape) != 4 or t.shape[1] == 1:
        return False
    n, c, h, w = t.shape
    return t.stride[1] == 1 and t.stride[3] == c and t.stride[2] == c * w


@dataclass
class ConvWorkspaces:
    """Workspace bytes per cuDNN call: measured where ``device`` is a GPU, modelled otherwise."""

    device: Optional[torch.device] = None
    measured: dict[ConvCall, int] = field(default_factory=dict)

    @classmethod
    def on(cls, device: torch.device | str) -> "ConvWorkspaces":
        """Workspaces measured on ``device`` (each distinct call once, cached for the process)."""
        device = torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(device, _MEASURED.setdefault(device.index, {}))

    def bytes(self, call: ConvCall) -> int:
        if self.device is None:
            return modelled_workspace(call)
        if call not in self.measured:
            self.measured[call] = measure_call(call, self.device)
            logger.debug("cuDNN %s %s x %s: workspace %d bytes (measured)", call.kind, call.x.shape, call.w.shape,
                         self.measured[call])
        return self.measured[call]


_MEASURED: dict[int, dict[ConvCall, int]] = {}


def measure_call(call: ConvCall, device: torch.device) -> int:
    """Run ``call`` alone on ``device``: bytes it held above its inputs and outputs at its peak."""
    def make(spec: TensorSpec) -> torch.Tensor:
        return torch.randn(spec.shape, dtype=spec.dtype, device=device)

    geo = (list(call.stride), list(call.padding), list(call.dilation), call.transposed, list(call.output_padding),
           call.groups)
    x, w = make(call.x), make(call.w)
    dy = make(call.y) if call.kind != "fwd" else None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    if call.kind == "fwd":
        out: Any = _aten.convolution(x, w, None, *geo)
    else:
        mask = [call.kind == "dgrad", call.kind == "wgrad", False]
        out = _aten.convolution_backward(dy, x, w, None, *geo, mask)
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return max(0, peak - max(held, before))
