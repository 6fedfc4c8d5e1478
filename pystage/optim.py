"""The one optimizer factory: training, the search, the growth methods and the planner build the same optimizer.

A ``TrainConfig`` says everything that changes what an optimizer step computes or
allocates (algorithm, lr, L2, momentum, ``foreach``), so the memory the planner
predicts for a step is the memory training uses for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one stage's training (each stage may get its own from the search).

    ``foreach``: torch's multi-tensor optimizer implementation; ``None`` is torch's default (on for CUDA
    parameters, off elsewhere). It trades temporaries about the size of the parameters for fewer launches.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-4  # L2 regularisation, added to the gradient (coupled, as in the paper's L2 term)
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd only
    foreach: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def uses_foreach(self, device: torch.device) -> bool:
        """Whether the step on ``device`` runs torch's foreach implementation (what torch picks for ``None``)."""
        if self.foreach is not None:
            return self.foreach
        return torch.device(device).type in ("cuda", "xpu")


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg``'s optimizer over ``params``."""
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=cfg.foreach)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=cfg.momentum, **kw)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kw)
    return torch.optim.Adam(params, **kw)
