"""torch.optim's Adam, AdamW and SGD on stacked tensors: member ``i`` of every ``(n, ...)`` tensor is one model,
stepped with its own learning rate and L2 (the search's draws), all members in one set of elementwise ops.

Each update is the one torch.optim's single-tensor implementation computes (``foreach=False``, no amsgrad,
no nesterov, no dampening; betas, eps as ``make_optimizer`` leaves them), with the per-member ``lr`` and
``weight_decay`` broadcast over each member's slice: member ``i``'s result equals a torch optimizer's over
that member alone, up to float rounding (the scalar factors are applied in another order). A parameter
whose gradient is ``None`` is skipped, as torch.optim does. ``member_state(i)`` gives member ``i``'s state in
torch.optim's format, so the winner of a search continues with a plain torch optimizer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from pystage.optim import TrainConfig

BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which make_optimizer keeps
EPS = 1e-8


class StackedOptimizer:
    """One optimizer for ``n`` members: ``configs[i]`` gives member ``i``'s lr and weight decay; the algorithm
    and momentum must be the same for every member (the search varies only lr and L2)."""

    def __init__(self, params: Sequence[Tensor], configs: Sequence[TrainConfig]) -> None:
        if not params or not configs:
            raise ValueError(f"params and configs: got {len(params)} parameters and {len(configs)} configs, "
                             "expected at least one of each (as torch.optim needs a parameter to optimize)")
        first = configs[0]
        other = next((c for c in configs if (c.optimizer, c.momentum) != (first.optimizer, first.momentum)), None)
        if other is not None:
            raise ValueError(f"configs: every member needs the same optimizer and momentum, got "
                             f"{(first.optimizer, first.momentum)} and {(other.optimizer, other.momentum)}")
        self.kind, self.momentum = first.optimizer, first.momentum
        dev = params[0].device
        self.lr = torch.tensor([c.lr for c in configs], dtype=torch.float64, device=dev)  # (n,)
        self.wd = torch.tensor([c.weight_decay for c in configs], dtype=torch.float64, device=dev)  # (n,)
        self.dtype = params[0].dtype
        self.steps = [0 for _ in params]  # per parameter, as torch.optim counts (the members train in lockstep)
        self.state: list[dict[str, Tensor]] = [{} for _ in params]
        self.decay = any(c.weight_decay != 0 for c in configs)

    @property
    def members(self) -> int:
        return len(self.lr)

    @torch.no_grad()
    def step(self, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]]) -> None:
        """Update ``params`` (each ``(n, ...)``) in place from ``grads`` (same shapes; ``None``: skip)."""
        factors: dict[int, dict[str, Tensor]] = {}  # per step count (a parameter skipped once lags behind)
        for j, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                continue
            self.steps[j] += 1
            f = factors.get(self.steps[j]) or factors.setdefault(self.steps[j], self._factors(self.steps[j]))
            shaped = {k: v.view(-1, *([1] * (p.dim() - 1))) for k, v in f.items()}  # broadcast over (n, ...)
            if self.kind == "sgd":
                self._sgd(p, g, self.state[j], shaped)
            else:
                self._adam(p, g, self.state[j], shaped, self.steps[j])

    def _factors(self, step: int) -> dict[str, Tensor]:
        """Per-member factors of a step, (n,) each, computed in float64 (torch computes them in Python floats)."""
        if self.kind == "sgd":  # param - lr * (grad + wd * param), momentum applied to the bracket
            f = {"wd": self.wd, "lr": -self.lr}
        else:  # Adam: param - lr / (1 - beta1^t) * m / denom; AdamW first scales param by (1 - lr * wd)
            f = {"wd": self.wd, "lr": -self.lr / (1 - BETAS[0] ** step), "decay": 1 - self.lr * self.wd}
        return {k: v.to(self.dtype) for k, v in f.items()}

    def _sgd(self, p: Tensor, g: Tensor, st: dict[str, Tensor], f: dict[str, Tensor]) -> None:
        if self.decay:
            g = g.addcmul(p, f["wd"])
        if self.momentum != 0:
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = g.detach().clone()
            else:
                buf.mul_(self.momentum).add_(g)
            g = buf
        p.addcmul_(g, f["lr"])

    def _adam(self, p: Tensor, g: Tensor, st: dict[str, Tensor], f: dict[str, Tensor], step: int) -> None:
        beta1, beta2 = BETAS
        if not st:
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self.decay and self.kind == "adamw":
            p.mul_(f["decay"])
        elif self.decay:
            g = g.addcmul(p, f["wd"])
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2 ** step) ** 0.5).add_(EPS)
        p.addcdiv_(m * f["lr"], denom)

    def keep(self, index: Tensor) -> None:
        """Keep only the members ``index`` (a 1-d index tensor on the parameters' device), in that order."""
        self.lr, self.wd = self.lr[index], self.wd[index]
        self.state = [{k: v[index] for k, v in st.items()} for st in self.state]

    def member_state(self, i: int) -> dict[int, dict[str, Tensor]]:
        """Member ``i``'s state as torch.optim keeps it (``state_dict()["state"]``; parameter order as given)."""
        out: dict[int, dict[str, Tensor]] = {}
        for j, st in enumerate(self.state):
            if not st:
                continue
            entry = {k: v[i].clone() for k, v in st.items()}
            if self.kind != "sgd":
                entry["step"] = torch.tensor(float(self.steps[j]))
            out[j] = entry
        return out
