"""A built-in, deterministic, learnable CIFAR-shaped data set: class = oriented grating patch + colour cue.

Each class ``k`` has a fixed orientation and spatial period (a 2-D Gabor-like
pattern) and a mean background colour, drawn once from ``seed`` (the *task*).
Each sample draws a random phase, a random patch position and size, a random
contrast, a jittered colour and per-pixel Gaussian noise from a generator seeded
by ``(seed, split)``, so splits share the task but never a sample.

Why it is a useful test bed: the grating's phase and position are random, so a
linear classifier on raw pixels cannot see the orientation (it averages out) and
is left with the noisy colour cue; a small CNN (oriented 3x3 filters + ReLU +
pooling = phase-invariant energy) reads the orientation and does much better.
Values are roughly zero-mean, unit-scale; no further normalisation is applied.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pystage.data.base import DataError, TensorData

logger = logging.getLogger(__name__)

SPLITS = {"train": 1, "val": 2, "test": 3}


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of :func:`synthetic`; the defaults are the measured ones in docs/models.md."""

    n: int = 5000
    num_classes: int = 10
    shape: tuple[int, int, int] = (3, 32, 32)  # (C, H, W)
    seed: int = 0
    split: str = "train"
    periods: tuple[float, ...] = (4.0, 8.0)  # grating periods in pixels; classes cycle orientations within each
    colour: float = 0.6  # norm of each class's mean colour offset
    colour_jitter: float = 0.5  # per-sample std of the colour offset (per channel)
    contrast: float = 1.0  # mean grating amplitude
    noise: float = 0.6  # per-pixel Gaussian noise std (1.0: much harder)


def _class_params(cfg: SyntheticConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class orientation (K,), period (K,) and colour (K, C), from the task seed only."""
    g = torch.Generator().manual_seed(cfg.seed)
    k = torch.arange(cfg.num_classes)
    n_orient = math.ceil(cfg.num_classes / len(cfg.periods))
    offset = torch.rand(len(cfg.periods), generator=g) * math.pi / n_orient  # (P,) per-period rotation
    theta = math.pi * (k % n_orient) / n_orient + offset[k // n_orient]  # (K,)
    period = torch.tensor(cfg.periods)[k // n_orient]  # (K,)
    colour = torch.randn(cfg.num_classes, cfg.shape[0], generator=g)  # (K, C)
    colour = cfg.colour * colour / colour.norm(dim=1, keepdim=True).clamp_min(1e-6)
    return theta, period, colour


def _check(cfg: SyntheticConfig) -> None:
    if cfg.split not in SPLITS:
        raise DataError(f"split must be one of {sorted(SPLITS)}, got {cfg.split!r}")
    if cfg.n < 1 or cfg.num_classes < 1:
        raise DataError(f"n and num_classes must be >= 1, got n={cfg.n}, num_classes={cfg.num_classes}")
    if len(cfg.shape) != 3 or min(cfg.shape) < 1:
        raise DataError(f"shape must be (C, H, W) with positive sizes, got {cfg.shape}")


def generate(cfg: SyntheticConfig) -> TensorData:
    """Materialise the samples of ``cfg`` as a :class:`TensorData` (vectorised; ~0.1 s per 10k CIFAR-sized)."""
    _check(cfg)
    c, h, w = cfg.shape
    theta, period, colour = _class_params(cfg)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + SPLITS[cfg.split])
    y = torch.arange(cfg.n) % cfg.num_classes
    y = y[torch.randperm(cfg.n, generator=g)]  # (N,) balanced, shuffled

    def u(lo: float, hi: float) -> Tensor:
        return (lo + (hi - lo) * torch.rand(cfg.n, generator=g)).view(-1, 1, 1)  # (N, 1, 1)

    phase, amp = u(0.0, 2 * math.pi), cfg.contrast * u(0.6, 1.4)
    cy, cx, sigma = u(0.25, 0.75) * h, u(0.25, 0.75) * w, u(0.2, 0.4) * min(h, w)
    yy = torch.arange(h, dtype=torch.float32).view(1, h, 1)  # (1, H, 1)
    xx = torch.arange(w, dtype=torch.float32).view(1, 1, w)  # (1, 1, W)
    th, per = theta[y].view(-1, 1, 1), period[y].view(-1, 1, 1)
    wave = torch.sin(2 * math.pi * (xx * torch.cos(th) + yy * torch.sin(th)) / per + phase)  # (N, H, W)
    envelope = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))  # (N, H, W)
    tint = colour[y] + cfg.colour_jitter * torch.randn(cfg.n, c, generator=g)  # (N, C)
    x = (amp * envelope * wave).unsqueeze(1) + tint.view(cfg.n, c, 1, 1)  # (N, C, H, W)
    x = x + cfg.noise * torch.randn(x.shape, generator=g)
    logger.debug("synthetic %s: n=%d shape=%s seed=%d", cfg.split, cfg.n, cfg.shape, cfg.seed)
    return TensorData(x.float().contiguous(), y, num_classes=cfg.num_classes, name=f"synthetic-{cfg.split}")


def synthetic(n: int = 5000, num_classes: int = 10, shape: tuple[int, int, int] = (3, 32, 32), seed: int = 0,
              split: str = "train", **kw: Any) -> TensorData:
    """``n`` balanced samples of the synthetic task ``seed``; ``split`` in train/val/test picks disjoint samples.

    ``kw``: the difficulty knobs of :class:`SyntheticConfig` (``noise``, ``colour``, ...).
    """
    return generate(SyntheticConfig(n=n, num_classes=num_classes, shape=tuple(shape), seed=seed,  # type: ignore
                                    split=split, **kw))  # type: ignore[arg-type]
