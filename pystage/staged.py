"""Stages and staged networks: a chain of ``Stage`` (body + classifier head).

Partial learning trains stage k's body with its own head on the outputs of
stages 1..k-1, then drops the head; the last stage keeps its head. After
training, ``StagedNet`` is an ordinary ``nn.Module``: ``forward``,
``state_dict`` and ``.to()`` behave as for any model.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from pystage.errors import PystageError

HEADS = ("linear", "pool-linear")


class StageError(PystageError, ValueError):
    """A staging request that does not fit the model; the message names the argument and the valid range."""


def make_head(feature_shape: Sequence[int], num_classes: int, kind: str = "linear") -> nn.Module:
    """A classifier head on features of ``feature_shape`` (without batch): flatten -> linear, or global-pool -> linear."""
    if kind not in HEADS:
        raise StageError(f"head must be one of {HEADS}, got {kind!r}")
    if kind == "pool-linear" and len(feature_shape) == 3:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(feature_shape[0], num_classes))
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(feature_shape), num_classes))


class Stage(nn.Module):
    """One stage: ``body`` (the layers) and ``head`` (a classifier, ``None`` once dropped)."""

    def __init__(self, body: nn.Module, head: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        """The stage's features (the head is not applied)."""
        return self.body(x)

    def logits(self, x: Tensor) -> Tensor:
        if self.head is None:
            raise StageError("this stage's head was dropped; only the last stage keeps one")
        return self.head(self.body(x))


class StagedNet(nn.Module):
    """A chain of stages; ``forward`` runs every body, then the last stage's head."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        super().__init__()
        if not stages:
            raise StageError("a StagedNet needs at least one stage, got 0")
        self.stages = nn.ModuleList(stages)

    @classmethod
    def from_sequential(cls, model: nn.Sequential, split_points: Optional[Sequence[int]] = None, *,
                        input_shape: Sequence[int] = (3, 32, 32), num_classes: Optional[int] = None,
                        head: str = "linear") -> "StagedNet":
        """Split ``model`` at ``split_points`` (default ``model.split_points``) and give every stage a head."""
        points = tuple(getattr(model, "split_points", ()) if split_points is None else split_points)
        if any(not 0 < p < len(model) for p in points) or list(points) != sorted(set(points)):
            raise StageError(f"split_points must be strictly increasing layer indices in [1, {len(model) - 1}], "
                             f"got {points}")
        classes = num_classes or getattr(model, "num_classes", None) or 10
        bounds = (0, *points, len(model))
        bodies = [model[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]
        shapes = feature_shapes(bodies, input_shape)
        heads = [make_head(s, classes, head) for s in shapes]
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        if param is not None:  # heads live where the model lives, in its dtype (as feature_shapes probes it)
            heads = [h.to(device=param.device, dtype=param.dtype) for h in heads]
        return cls([Stage(b, h) for b, h in zip(bodies, heads)])

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        for stage in self.stages:
            x = stage.body(x)
        return self.stages[-1].head(x)

    def features(self, x: Tensor, upto: int) -> Tensor:
        """Output of stages ``[0, upto)``."""
        for stage in self.stages[:upto]:
            x = stage.body(x)
        return x

    def drop_heads(self) -> "StagedNet":
        """Drop every head but the last (they only served to train their stage)."""
        for stage in self.stages[:-1]:
            stage.head = None
        return self

    @property
    def bodies(self) -> list[nn.Module]:
        return [s.body for s in self.stages]

    def __len__(self) -> int:
        return len(self.stages)


def feature_shapes(bodies: Sequence[nn.Module], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Output shape (without batch) of each body in turn, from one zero sample (no grad, on the bodies' device)."""
    param = next((p for b in bodies for p in b.parameters()), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu",
                    dtype=param.dtype if param is not None else torch.float32)
    shapes = []
    was_training = [b.training for b in bodies]
    with torch.no_grad():
        for body in bodies:
            body.eval()
            x = body(x)
            shapes.append(tuple(x.shape[1:]))
    for body, mode in zip(bodies, was_training):
        body.train(mode)
    return shapes
