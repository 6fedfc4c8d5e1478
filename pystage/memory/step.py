"""One training step of a candidate stage (layers [i, j) + head + optimizer), and the copies it runs on.

The step is the one the training code runs: forward through the stage and its
head, cross-entropy, backward, ``optimizer.step()`` with the optimizer's state
already allocated (steady state), the stage's input batch resident and not
requiring grad (stage inputs are data or stored features).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pystage import optim
from pystage.optim import OPTIMIZERS, TrainConfig

logger = logging.getLogger(__name__)

HeadFactory = Callable[[torch.Size, int], nn.Module]
"""``head(feature_shape, num_classes) -> nn.Module``; ``feature_shape`` is one sample's (C, H, W) or (F,)."""


def linear_head(feature_shape: torch.Size, num_classes: int) -> nn.Module:
    """Flatten -> Linear(prod(feature_shape), num_classes): the training code's default head."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.Size(feature_shape).numel()), num_classes))


def pooled_head(feature_shape: torch.Size, num_classes: int) -> nn.Module:
    """Global average pool -> Linear(C, num_classes), for large feature maps; plain linear head for (F,)."""
    if len(feature_shape) < 2:
        return linear_head(feature_shape, num_classes)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(int(feature_shape[0]), num_classes))


PLANNER_OPTIMIZERS = {"sgd-nomomentum": TrainConfig(optimizer="sgd", momentum=0.0)}
"""Names the planner accepts besides ``pystage.optim.OPTIMIZERS`` (each with torch's defaults otherwise)."""


def optimizer_config(optimizer: "str | TrainConfig") -> TrainConfig:
    """The ``TrainConfig`` a planner ``optimizer`` argument stands for: a config as is, or a name."""
    if isinstance(optimizer, TrainConfig):
        return optimizer
    if optimizer in PLANNER_OPTIMIZERS:
        return PLANNER_OPTIMIZERS[optimizer]
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be a TrainConfig or one of {', '.join([*OPTIMIZERS, *PLANNER_OPTIMIZERS])}, "
                         f"got {optimizer!r}")
    return TrainConfig(optimizer=optimizer)


def target_config(optimizer: "str | TrainConfig", device: torch.device) -> TrainConfig:
    """``optimizer``'s config with ``foreach`` fixed to what torch picks on ``device`` (meta tensors would
    otherwise get the for-loop implementation whatever the target runs)."""
    cfg = optimizer_config(optimizer)
    return dataclasses.replace(cfg, foreach=cfg.uses_foreach(device))


def make_optimizer(optimizer: "str | TrainConfig", params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer training builds for ``optimizer`` (``pystage.optim.make_optimizer``), over ``params``."""
    return optim.make_optimizer(params, optimizer_config(optimizer))


def meta_copy(layers: Sequence[nn.Module], dtype: torch.dtype) -> list[nn.Module]:
    """Copies of ``layers`` whose parameters and buffers are meta tensors (nothing is allocated or copied)."""
    memo: dict[int, object] = {}
    for layer in layers:
        for p in layer.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta", dtype=_float(p, dtype)), p.requires_grad)
        for b in layer.buffers():
            memo[id(b)] = torch.empty_like(b, device="meta", dtype=_float(b, dtype))
    return [copy.deepcopy(layer, memo) for layer in layers]


def real_copy(layers: Sequence[nn.Module], device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
    """Copies of ``layers`` on ``device`` in ``dtype``, so that a measured step never changes the user's model."""
    return [copy.deepcopy(layer).to(device=device, dtype=dtype) for layer in layers]


def _float(t: Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if t.is_floating_point() else t.dtype


class _StandinFn(torch.autograd.Function):
    """Conservative memory of a layer whose ops have no meta kernel: saves its input and output; forward
    uses one output-sized temporary; backward holds an output-sized and an input-sized temporary (a
    gradient-of-input-sized buffer even when that gradient is not needed) next to the parameter gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, out_shape: tuple[int, ...], *params: Tensor) -> Tensor:  # type: ignore[override]
        y = x.new_empty(out_shape)
        tmp = x.new_empty(out_shape)  # workspace the real op may use
        del tmp
        ctx.save_for_backward(x, y, *params)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, _, *params = ctx.saved_tensors
        tmp_out, tmp_in = torch.empty_like(g), torch.empty_like(x)
        grads = [torch.empty_like(p) if p.requires_grad else None for p in params]
        del tmp_out
        return (tmp_in if ctx.needs_input_grad[0] else None, None, *grads)


class Standin(nn.Module):
    """Stands for ``layer`` in an estimate when its ops cannot run on meta tensors (see :class:`_StandinFn`)."""

    def __init__(self, layer: nn.Module, out_shape: torch.Size) -> None:
        super().__init__()
        self.layer, self.out_shape = layer, tuple(out_shape)  # out_shape: one sample's

    def forward(self, x: Tensor) -> Tensor:
        return _StandinFn.apply(x, (x.shape[0], *self.out_shape), *self.layer.parameters())


@dataclass
class Stage:
    """A stage ready to step: its layers, its head, optimizer with state allocated, input batch and labels."""

    body: nn.Sequential
    head: nn.Module
    optimizer: torch.optim.Optimizer
    x: Tensor  # (B, *in_shape), requires_grad False
    y: Tensor  # (B,) int64 labels

    def resident(self) -> list[Tensor]:
        """Tensors alive before the step starts: parameters, buffers, optimizer state, input batch, labels."""
        state = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
        mods = (self.body, self.head)
        return [*(p for m in mods for p in m.parameters()), *(b for m in mods for b in m.buffers()),
                *state, self.x, self.y]


def build_stage(layers: list[nn.Module], in_shape: torch.Size, out_shape: torch.Size, batch_size: int,
                device: torch.device, dtype: torch.dtype, optimizer: str, num_classes: int,
                head: HeadFactory, state_from: Optional[torch.optim.Optimizer] = None) -> Stage:
    """Assemble a stage on ``device`` (meta or real) from already-copied layers; allocates optimizer state.

    ``state_from``: an optimizer over (some of) the same parameters whose state is shared instead of being
    allocated by a warm-up step (the meta estimate builds one for the whole model, once).
    """
    body = nn.Sequential(*layers)
    with torch.device(device):
        h = head(out_shape, num_classes).to(dtype=dtype)
        x = torch.randn(batch_size, *in_shape, dtype=dtype) if device.type != "meta" else \
            torch.empty(batch_size, *in_shape, dtype=dtype)
        y = torch.randint(0, num_classes, (batch_size,)) if device.type != "meta" else \
            torch.empty(batch_size, dtype=torch.long)
    params = [p for m in (body, h) for p in m.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, params)
    shared = state_from.state if state_from is not None else {}
    fresh = [p for p in params if p not in shared]
    for p in params:
        if p in shared:
            opt.state[p] = shared[p]
    warm_up_state(fresh, opt)
    return Stage(body, h, opt, x, y)


def warm_up_state(params: list[nn.Parameter], opt: torch.optim.Optimizer) -> None:
    """Allocate ``opt``'s state for ``params`` by one step on zero gradients (steady state, as in training)."""
    if not params:
        return
    fresh, groups = set(params), [g["params"] for g in opt.param_groups]
    for g in opt.param_groups:  # step only the fresh parameters
        g["params"] = [p for p in g["params"] if p in fresh]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for g, ps in zip(opt.param_groups, groups):
        g["params"] = ps
    for p in params:
        p.grad = None


def training_step(stage: Stage, phase: Optional[Callable[[str], None]] = None) -> None:
    """Forward, cross-entropy, backward, optimizer step; ``phase(name)`` is told where each part starts."""
    mark = phase or (lambda name: None)
    mark("forward")
    logits = stage.head(stage.body(stage.x))  # (B, num_classes)
    loss = F.cross_entropy(logits, stage.y)
    mark("backward")
    loss.backward()
    mark("step")
    stage.optimizer.step()
    stage.optimizer.zero_grad(set_to_none=True)
