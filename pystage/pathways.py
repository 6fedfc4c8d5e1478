"""Skip pathways (Gil): max-pool every conv layer's output and join it with the features the classifier reads.

``PathwayNet`` wraps a plain ``nn.Sequential`` (conv [+ BatchNorm] + ReLU blocks and pools). Each conv
block's output (after its activation) is max-pooled to the spatial size of the Sequential's final output
and joined with that output: concatenated along channels (``"concat"``: C_final + sum of the conv widths),
or summed (``"sum"``: every width must equal C_final). The classifier head, added by the training code
as for any model, then has a one-hop path to every layer.

A ``PathwayNet`` is one stage (its pathways cross every boundary); train it as ``StagedNet``, see
:func:`as_staged`.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pystage.errors import PystageError
from pystage.staged import Stage, StagedNet, make_head

logger = logging.getLogger(__name__)
MODES = ("concat", "sum")
_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid)


class PathwayError(PystageError, ValueError):
    """A pathway request that does not fit the model; the message names the mode, widths or layer."""


def conv_taps(body: nn.Sequential) -> list[int]:
    """Index of the module whose output is each conv block's output: the activation after a conv (else the conv)."""
    taps: list[int] = []
    for i, m in enumerate(body):
        if isinstance(m, nn.Conv2d):
            j = i
            while j + 1 < len(body) and isinstance(body[j + 1], (nn.modules.batchnorm._BatchNorm, *_ACTIVATIONS)):
                j += 1
            taps.append(j)
    return taps


class PathwayNet(nn.Module):
    """``body`` (an ``nn.Sequential`` CNN) plus max-pooled skip pathways from every conv to its output.

    forward: ``(B, C_in, H, W) -> (B, C_out, h, w)`` with ``(h, w)`` the body's output size and ``C_out`` the
    body's width plus every conv's width (``"concat"``) or the body's width (``"sum"``).
    """

    def __init__(self, body: nn.Sequential, mode: str = "concat") -> None:
        super().__init__()
        if mode not in MODES:
            raise PathwayError(f"pathways must be one of {MODES} or None, got {mode!r}")
        self.body, self.mode = body, mode
        self.taps = conv_taps(body)
        if not self.taps:
            raise PathwayError(f"a PathwayNet needs at least one Conv2d in its body, got {len(body)} layers without")
        widths = [m.out_channels for m in body if isinstance(m, nn.Conv2d)]
        if mode == "sum" and len(set(widths)) != 1:
            raise PathwayError(f"pathways='sum' needs equal conv widths, got {widths}; use 'concat'")
        self.widths = widths
        self.split_points: tuple[int, ...] = ()

    @property
    def out_channels(self) -> int:
        return self.widths[-1] + (sum(self.widths) if self.mode == "concat" else 0)

    def forward(self, x: Tensor) -> Tensor:
        taps, tapped = set(self.taps), []
        for i, m in enumerate(self.body):
            x = m(x)
            if i in taps:
                tapped.append(x)  # (B, C_i, H_i, W_i)
        size = x.shape[-2:]  # the classifier's input size (h, w)
        pooled = [t if t.shape[-2:] == size else F.adaptive_max_pool2d(t, size) for t in tapped]  # each (B, C_i, h, w)
        if self.mode == "concat":
            return torch.cat([x, *pooled], dim=1)  # (B, C_final + sum C_i, h, w)
        return torch.stack([x, *pooled]).sum(0)  # (B, C_final, h, w)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, taps={self.taps}"


def with_pathways(body: nn.Sequential, mode: Optional[str]) -> nn.Module:
    """``body`` itself when ``mode`` is None, else a ``PathwayNet`` carrying the body's model attributes."""
    if mode is None:
        return body
    net = PathwayNet(body, mode)
    for attr in ("name", "in_channels", "num_classes"):
        if hasattr(body, attr):
            setattr(net, attr, getattr(body, attr))
    logger.debug("pathways=%s on %d conv layers: %d output channels", mode, len(net.taps), net.out_channels)
    return net


def as_staged(net: nn.Module, input_shape: Sequence[int], num_classes: Optional[int] = None,
              head: str = "linear") -> StagedNet:
    """One-stage ``StagedNet`` of ``net`` with a classifier head, ready for ``pystage.fit(..., method="total")``."""
    classes = num_classes or getattr(net, "num_classes", None) or 10
    param = next(net.parameters())
    with torch.no_grad():
        was = net.training
        shape = tuple(net.eval()(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)).shape[1:])
        net.train(was)
    return StagedNet([Stage(net, make_head(shape, classes, head).to(device=param.device, dtype=param.dtype))])
