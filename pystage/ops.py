"""The compiled masked ops: public wrappers, fake kernels and autograd, op by op.

Layout of a masked layer (DESIGN.md): output units are ordered by age; the
frozen units read inputs ``[0, in_split)``, the trainable (newest) units read
inputs ``[0, in_active)``; only inputs ``[in_split, in_active)`` (the units that
are trainable in the layer below) get a gradient. Frozen work is never
computed: backward costs ``T*in_active + T*(in_active-in_split)`` multiply-adds
per sample instead of ``2*out*in``.

Autograd of ``masked_linear`` / ``masked_conv2d`` is registered in C++
(csrc/autograd.cpp: no Python on the per-step path); their backward runs the
masked path or dense-then-discard, whichever :mod:`pystage.autotune` found
faster for the shape. The general path takes an arbitrary trainable index set
(``out_index``) and input-gradient set (``in_index``) and gathers, computes and
scatters; its autograd is registered here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from pystage import _ext  # noqa: F401  (registers torch.ops.pystage.*)
from pystage import autotune  # noqa: F401  (registers the backward path tuner)

_ops = torch.ops.pystage
_Pair = Sequence[int]


def _none_if_empty(t: Tensor, wanted: bool) -> Optional[Tensor]:
    return t if wanted else None


# --------------------------------------------------------------------------- masked_linear

def masked_linear(x: Tensor, w_frozen: Tensor, b_frozen: Optional[Tensor], w_train: Tensor,
                  b_train: Optional[Tensor], in_split: int, out_features: int,
                  frozen_rows: Sequence[int] = (), frozen_cols: Sequence[int] = ()) -> Tensor:
    """``y[:, :F] = x[:, :in_split] @ w_frozen.T + b_frozen``; ``y[:, F:F+T] = x[:, :in_active] @ w_train.T + b_train``.

    x: (B, in_features); w_frozen: (F, in_split); w_train: (T, in_active). Returns (B, out_features),
    zero beyond the F + T active units. ``frozen_rows``/``frozen_cols``: the frozen block's growth steps
    (rows ``[rows[s-1], rows[s])`` read inputs ``[0, cols[s])``), one GEMM each; empty = one step.
    """
    return _ops.masked_linear(x, w_frozen, b_frozen, w_train, b_train, in_split, out_features,
                              list(frozen_rows), list(frozen_cols))


@torch.library.register_fake("pystage::masked_linear")
def _(x, w_frozen, b_frozen, w_train, b_train, in_split, out_features, frozen_rows=(), frozen_cols=()):
    torch._check(x.dim() == 2, lambda: f"pystage: x must be 2-D (batch, in_features), got {x.dim()}-D")
    torch._check(w_train.size(0) > 0, lambda: "pystage: w_train has 0 rows: the trainable set must hold at least one unit")
    return x.new_empty((x.size(0), out_features))


@torch.library.register_fake("pystage::masked_linear_backward")
def _(grad_out, x, w_train, in_split, out_frozen, output_mask, path=0):
    return _fake_grads(x, w_train, w_train.size(0), output_mask)


# --------------------------------------------------------------------------- masked_conv2d

def masked_conv2d(x: Tensor, w_frozen: Tensor, b_frozen: Optional[Tensor], w_train: Tensor,
                  b_train: Optional[Tensor], in_split: int, out_channels: int,
                  stride: _Pair = (1, 1), padding: _Pair = (0, 0), dilation: _Pair = (1, 1),
                  frozen_rows: Sequence[int] = (), frozen_cols: Sequence[int] = ()) -> Tensor:
    """Channel-blocked conv2d with the masked-layer layout (NCHW, groups=1).

    x: (B, C, H, W); w_frozen: (F, in_split, kh, kw); w_train: (T, in_active, kh, kw).
    Returns (B, out_channels, Ho, Wo), zero beyond the F + T active channels. Growth steps as in
    :func:`masked_linear`.
    """
    return _ops.masked_conv2d(x, w_frozen, b_frozen, w_train, b_train, in_split, out_channels,
                              list(stride), list(padding), list(dilation), list(frozen_rows), list(frozen_cols))


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@torch.library.register_fake("pystage::masked_conv2d")
def _(x, w_frozen, b_frozen, w_train, b_train, in_split, out_channels, stride, padding, dilation, frozen_rows=(),
      frozen_cols=()):
    torch._check(x.dim() == 4, lambda: f"pystage: x must be 4-D (batch, channels, height, width), got {x.dim()}-D")
    torch._check(w_train.size(0) > 0, lambda: "pystage: w_train has 0 rows: the trainable set must hold at least one unit")
    kh, kw = w_train.shape[2], w_train.shape[3]
    ho = _conv_out(x.size(2), kh, stride[0], padding[0], dilation[0])
    wo = _conv_out(x.size(3), kw, stride[1], padding[1], dilation[1])
    return x.new_empty((x.size(0), out_channels, ho, wo))


@torch.library.register_fake("pystage::masked_conv2d_backward")
def _(grad_out, x, w_train, in_split, out_frozen, stride, padding, dilation, output_mask, path=0):
    return _fake_grads(x, w_train, w_train.size(0), output_mask)


# --------------------------------------------------------------------------- general path (index sets)

def masked_linear_indexed(x: Tensor, weight: Tensor, bias: Optional[Tensor], w_train: Tensor,
                          b_train: Optional[Tensor], out_index: Tensor, in_index: Tensor) -> Tensor:
    """Dense linear whose rows ``out_index`` come from ``w_train``; grads only for those rows and ``in_index`` inputs.

    x: (B, in); weight: (out, in), the frozen values (rows in out_index ignored); w_train: (T, in).
    """
    return _ops.masked_linear_indexed(x, weight, bias, w_train, b_train, out_index, in_index)


def masked_conv2d_indexed(x: Tensor, weight: Tensor, bias: Optional[Tensor], w_train: Tensor,
                          b_train: Optional[Tensor], out_index: Tensor, in_index: Tensor,
                          stride: _Pair = (1, 1), padding: _Pair = (0, 0), dilation: _Pair = (1, 1)) -> Tensor:
    """Conv2d version of :func:`masked_linear_indexed` (NCHW, groups=1)."""
    return _ops.masked_conv2d_indexed(x, weight, bias, w_train, b_train, out_index, in_index,
                                      list(stride), list(padding), list(dilation))


@torch.library.register_fake("pystage::masked_linear_indexed")
def _(x, weight, bias, w_train, b_train, out_index, in_index):
    torch._check(x.dim() == 2, lambda: f"pystage: x must be 2-D (batch, in_features), got {x.dim()}-D")
    return x.new_empty((x.size(0), weight.size(0)))


@torch.library.register_fake("pystage::masked_linear_indexed_backward")
def _(grad_out, x, weight, w_train, out_index, in_index, output_mask):
    return _fake_grads(x, w_train, w_train.size(0), output_mask)


@torch.library.register_fake("pystage::masked_conv2d_indexed")
def _(x, weight, bias, w_train, b_train, out_index, in_index, stride, padding, dilation):
    torch._check(x.dim() == 4, lambda: f"pystage: x must be 4-D (batch, channels, height, width), got {x.dim()}-D")
    kh, kw = weight.shape[2], weight.shape[3]
    ho = _conv_out(x.size(2), kh, stride[0], padding[0], dilation[0])
    wo = _conv_out(x.size(3), kw, stride[1], padding[1], dilation[1])
    return x.new_empty((x.size(0), weight.size(0), ho, wo))


@torch.library.register_fake("pystage::masked_conv2d_indexed_backward")
def _(grad_out, x, weight, w_train, out_index, in_index, stride, padding, dilation, output_mask):
    return _fake_grads(x, w_train, w_train.size(0), output_mask)


def _indexed_setup(ctx, inputs, output):
    x, weight, bias, w_train, _, out_index, in_index = inputs[:7]
    ctx.save_for_backward(x, weight, w_train, out_index, in_index)
    ctx.conv = tuple(inputs[7:])  # (stride, padding, dilation) for conv, () for linear
    ctx.has_bias = bias is not None


def _indexed_backward(op):
    def backward(ctx, grad):
        x, weight, w_train, out_index, in_index = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[3], need[4] and ctx.has_bias]
        tail = (None,) * (2 + len(ctx.conv))
        if not any(mask):
            return (None,) * 5 + tail
        gx, gw, gb = op(grad.contiguous(), x, weight, w_train, out_index, in_index, *ctx.conv, mask)
        return (_none_if_empty(gx, mask[0]), None, None, _none_if_empty(gw, mask[1]), _none_if_empty(gb, mask[2])) + tail
    return backward


torch.library.register_autograd("pystage::masked_linear_indexed", _indexed_backward(_ops.masked_linear_indexed_backward),
                                setup_context=_indexed_setup)
torch.library.register_autograd("pystage::masked_conv2d_indexed", _indexed_backward(_ops.masked_conv2d_indexed_backward),
                                setup_context=_indexed_setup)


# --------------------------------------------------------------------------- block-triangular mask

def block_triangular_mask_(weight: Tensor, out_ends: Sequence[int], in_ends: Sequence[int]) -> Tensor:
    """Zero, in place, every weight from an input newer than its output unit (rule 2 of DESIGN.md).

    ``out_ends``/``in_ends``: cumulative unit counts after each growth step, ending at the layer's size.
    """
    _ops.block_triangular_mask_(weight, list(out_ends), list(in_ends))
    return weight


@torch.library.register_fake("pystage::block_triangular_mask_")
def _(weight, out_ends, in_ends):
    return None


def _fake_grads(x: Tensor, w_train: Tensor, units: int, mask) -> tuple[Tensor, Tensor, Tensor]:
    return (x.new_empty(x.shape if mask[0] else (0,)),  # each masked-off output is its own empty tensor
            w_train.new_empty(w_train.shape) if mask[1] else x.new_empty((0,)),
            x.new_empty((units,) if mask[2] else (0,)))
