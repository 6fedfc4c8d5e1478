"""The masked ops re-written as narrowed ATen calls composed in Python.

This is the bar the compiled op must clear: same arithmetic, same memory
traffic, but every call crosses the Python/dispatcher boundary on its own.
Used only by ``pystage-bench layers``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pystage.layers import MaskedConv2d, MaskedLinear


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wf, bf, wt, bt, in_split, out_features):
        F_, T, in_active = wf.shape[0], wt.shape[0], wt.shape[1]
        y = x.new_empty(x.shape[0], out_features)
        torch.addmm(bf, x[:, :in_split], wf.t(), out=y[:, :F_]) if F_ else None
        torch.addmm(bt, x[:, :in_active], wt.t(), out=y[:, F_:F_ + T])
        if F_ + T < out_features:
            y[:, F_ + T:].zero_()
        ctx.save_for_backward(x, wt)
        ctx.args = (in_split, F_)
        return y

    @staticmethod
    def backward(ctx, g):
        x, wt = ctx.saved_tensors
        in_split, F_ = ctx.args
        T, in_active = wt.shape
        gy = g[:, F_:F_ + T]
        gx = torch.zeros_like(x)
        torch.mm(gy, wt[:, in_split:], out=gx[:, in_split:in_active])
        return gx, None, None, gy.t() @ x[:, :in_active], gy.sum(0), None, None


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wf, bf, wt, bt, in_split, out_channels, stride, padding, dilation):
        F_, T, in_active = wf.shape[0], wt.shape[0], wt.shape[1]
        yt = F.conv2d(x[:, :in_active], wt, bt, stride, padding, dilation)
        y = yt.new_empty(x.shape[0], out_channels, yt.shape[2], yt.shape[3])
        if F_:
            y[:, :F_] = F.conv2d(x[:, :in_split], wf, bf, stride, padding, dilation)
        y[:, F_:F_ + T] = yt
        if F_ + T < out_channels:
            y[:, F_ + T:].zero_()
        ctx.save_for_backward(x, wt)
        ctx.args = (in_split, F_, stride, padding, dilation)
        return y

    @staticmethod
    def backward(ctx, g):
        x, wt = ctx.saved_tensors
        in_split, F_, stride, padding, dilation = ctx.args
        T, in_active = wt.shape[:2]
        gy = g[:, F_:F_ + T].contiguous()
        conv_bw = torch.ops.aten.convolution_backward
        gw = conv_bw(gy, x[:, :in_active], wt, None, stride, padding, dilation, False, [0, 0], 1,
                     [False, True, False])[1]
        gx = torch.zeros_like(x)
        w_in = wt[:, in_split:].contiguous()
        gx[:, in_split:in_active] = conv_bw(gy, x[:, in_split:in_active], w_in, None, stride, padding, dilation,
                                            False, [0, 0], 1, [True, False, False])[0]
        return gx, None, None, gw, gy.sum((0, 2, 3)), None, None, None, None, None


class ComposedLinear(nn.Module):
    """Runs a MaskedLinear's parameters through the Python-composed version of the op."""

    def __init__(self, layer: MaskedLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        m = self.layer
        return _LinearFn.apply(x, m.frozen_weight, m.frozen_bias, m.weight, m.bias, m.in_split, m.out_features)


class ComposedConv2d(nn.Module):
    """Runs a MaskedConv2d's parameters through the Python-composed version of the op."""

    def __init__(self, layer: MaskedConv2d) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        m = self.layer
        return _ConvFn.apply(x, m.frozen_weight, m.frozen_bias, m.weight, m.bias, m.in_split, m.out_channels,
                             m.stride, m.padding, m.dilation)
