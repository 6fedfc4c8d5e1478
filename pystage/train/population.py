"""Every search draw at once: a stage's trials train as one population of stacked models that share each batch.

Member ``i`` of a ``Population`` is index ``i`` of every stacked tensor: its trainable parameters and its
buffers (``(n, ...)`` each), its optimizer state (``StackedOptimizer``: its own lr and L2). Each batch is read
and moved to the device once, and every member takes one step on it; a member's result is the one a trial
trained alone in the stage's module computes from the same start, up to float rounding. Frozen parameters
(``requires_grad=False``) are shared, not stacked.

Two ways to run the members' forward and backward, the same results:

* ``"vmap"``: ``torch.func.vmap`` of ``functional_call`` over the stacked tensors: one batched kernel per
  layer (a convolution becomes a grouped one), for GPUs, where one member's step leaves the device idle;
* ``"loop"``: member after member on views of the stacked tensors, each forward followed by its backward, so
  only one member's activations are alive at a time: on the CPU a grouped convolution is slower than the
  members' ordinary ones (bench/search), and it runs modules ``vmap`` cannot (custom ops, data-dependent
  Python, random layers).

``"auto"`` picks ``vmap`` on CUDA when a two-member trial step of the module works under ``vmap``, else
``loop``. The non-finite guard is the engine's, per member: a member whose loss or weights stop being finite
fails with the ``NonFiniteError`` the engine would raise for it alone, and the others train on.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from pystage.optim import TrainConfig
from pystage.train.engine import CheckpointedChain, Cursor, Engine, StepStats
from pystage.train.errors import NonFiniteError
from pystage.train.sources import BatchSource
from pystage.train.stacked_optim import StackedOptimizer

log = logging.getLogger(__name__)
FORWARDS = ("auto", "vmap", "loop")


@dataclass
class MemberResult:
    """One member's metrics over a ``Population.run``, or the error the engine would have raised for it."""

    stats: StepStats
    failed: Optional[NonFiniteError] = None


def unsupported(engine: Engine, configs: Sequence[TrainConfig]) -> Optional[str]:
    """Why ``configs`` cannot train as a population in ``engine`` (None: they can)."""
    if engine.ddp:
        return "the stage trains under DistributedDataParallel, which syncs one model's gradients"
    if any(isinstance(m, CheckpointedChain) for m in engine.module.modules()):
        return "the stage recomputes activations in backward (method 'checkpoint'), after functional_call returns"
    kinds = {(c.optimizer, c.momentum) for c in configs}
    if len(kinds) > 1:
        return f"the trials use different optimizers {sorted(kinds)}"
    return None


def population_peak(state_bytes: int, activation_bytes: int, batch_bytes: int, members: int,
                    forward: str = "vmap") -> int:
    """Predicted peak bytes of a population step, from one member's step: ``state_bytes`` (its parameters,
    gradients, optimizer state and buffers), ``activation_bytes`` (what else its step holds at the peak:
    activations, workspaces) and ``batch_bytes`` (the batch, read once and shared by every member).

    The state is held ``members`` times in both forwards; activations ``members`` times under ``vmap`` (each
    layer runs every member in one kernel), once under ``loop`` (one member's forward and backward at a
    time). Left out: transients, such as vmap's copy of a layer's output when only its weights are batched
    and the stacked optimizer's temporaries; measured on CPU for the stages of cnn1, cnn4 and cnn8 with 11
    members, the peak was 1.00-1.20x this prediction (docs/search.md). ``population_members`` gives
    ``members``."""
    if forward not in ("vmap", "loop"):
        raise ValueError(f"forward must be 'vmap' or 'loop', got {forward!r}")
    return batch_bytes + members * state_bytes + (members if forward == "vmap" else 1) * activation_bytes


def population_members(draws: int, mode: str) -> int:
    """Members on the device at once for a search of ``draws`` draws (plus the start point) in ``mode``
    ("population" or "auto": all of them, at the first rung; "sequential": one)."""
    return 1 if mode == "sequential" else draws + 1


class Population:
    """``len(configs)`` copies of ``engine.module`` (as it is now), trained together; ``engine`` gives the device,
    the batch feed, the loss, the stage's name and progress bars."""

    def __init__(self, engine: Engine, configs: Sequence[TrainConfig], forward: str = "auto") -> None:
        if forward not in FORWARDS:
            raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
        why = unsupported(engine, configs)
        if why is not None:
            raise ValueError(f"configs: these trials cannot train as a population: {why}")
        self.engine, self.module, self.n = engine, engine.module, len(configs)
        n = self.n
        self.params = {k: p.detach().unsqueeze(0).repeat(n, *[1] * p.dim()).requires_grad_()
                       for k, p in self.module.named_parameters() if p.requires_grad}  # (n, ...) each
        self.buffers = {k: b.detach().unsqueeze(0).repeat(n, *[1] * b.dim()) for k, b in self.module.named_buffers()}
        self.optimizer = StackedOptimizer(list(self.params.values()), configs)
        self.forward_mode = forward if forward != "auto" or engine.device.type == "cuda" else "loop"

    # -- one step of every member --------------------------------------------------------------------------
    def _call(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.module, {**params, **buffers}, (x,))

    def _vmapped(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return vmap(self._call, in_dims=(0, 0, None), randomness="error")(params, buffers, x)  # (n, B, ...)

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        """The engine's loss of one member's output (``Engine._loss`` outside DDP)."""
        return F.cross_entropy(out, y) if self.engine.loss == "ce" else F.mse_loss(out.reshape(y.shape), y)

    def vmap_error(self, x: Tensor) -> Optional[str]:
        """Why ``vmap`` cannot run this module (None: it can), from a training step of two members on copies of
        their tensors and a few rows of ``x`` (nothing of the population changes)."""
        k, rows = min(self.n, 2), min(len(x), 8)
        params = {name: p.detach()[:k].clone().requires_grad_() for name, p in self.params.items()}
        buffers = {name: b[:k].clone() for name, b in self.buffers.items()}
        try:
            torch.autograd.grad(self._vmapped(params, buffers, x[:rows]).float().sum(), list(params.values()))
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever vmap fails on, the members can run one by one
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None

    def _resolve(self, x: Tensor) -> None:
        """``auto`` (on CUDA): ``vmap`` if it can run the module, else ``loop``; decided at the first batch."""
        if self.forward_mode != "auto":
            return
        why = self.vmap_error(x)
        if why is not None:
            log.info("stage %s: the search's population runs member by member: vmap failed (%s)",
                     self.engine.stage, why)
        self.forward_mode = "loop" if why else "vmap"

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One optimizer step of every member on the batch ``(x, y)`` (on the device): (outputs (n, B, ...),
        losses (n,))."""
        self._resolve(x)
        out, losses, grads = self._vmap_grads(x, y) if self.forward_mode == "vmap" else self._loop_grads(x, y)
        self.optimizer.step(list(self.params.values()), grads)
        return out.detach(), losses.detach()

    def _vmap_grads(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Sequence[Optional[Tensor]]]:
        """Every member's forward in one batched call, one backward for all (their losses share nothing)."""
        out = self._vmapped(self.params, self.buffers, x)  # (n, B, classes)
        losses = vmap(lambda o: self._loss(o, y))(out)  # (n,)
        return out, losses, torch.autograd.grad(losses.sum(), list(self.params.values()), allow_unused=True)

    def _loop_grads(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Sequence[Optional[Tensor]]]:
        """Member after member: forward, then backward at once (one member's activations alive at a time)."""
        outs, losses = [], []
        grads = [torch.zeros_like(p) for p in self.params.values()]  # (n, ...) each, filled member by member
        used = [False] * len(grads)
        for i in range(self.n):
            leaves = [p.detach()[i].requires_grad_() for p in self.params.values()]  # views of member i
            o = self._call(dict(zip(self.params, leaves)), {k: b[i] for k, b in self.buffers.items()}, x)
            loss = self._loss(o, y)
            for j, g in enumerate(torch.autograd.grad(loss, leaves, allow_unused=True)):
                if g is not None:
                    grads[j][i].copy_(g)
                    used[j] = True
            outs.append(o.detach())
            losses.append(loss.detach())
        return torch.stack(outs), torch.stack(losses), [g if u else None for g, u in zip(grads, used)]

    def measured_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, int]:
        """``step`` under live-tensor accounting: also the peak bytes of every member's parameters, optimizer
        state and buffers, the batch, the activations and the gradients."""
        from pystage.memory import LiveBytes

        self._resolve(x)
        tracker = LiveBytes(x.device, 512 if x.device.type == "cuda" else 1)
        state = [v for st in self.optimizer.state for v in st.values()]
        tracker.track([*self.params.values(), *self.buffers.values(), *state, x, y])
        with tracker:
            out, losses = self.step(x, y)
        return out, losses, tracker.peak

    # -- many steps ------------------------------------------------------------------------------------------
    def run(self, source: BatchSource, n_steps: Optional[int], cursor: Cursor,
            measure_at: int = -1) -> list[MemberResult]:
        """Train every member ``n_steps`` batches (``None``: the rest of the epoch), as ``Engine.run`` trains one
        module: the same batches, the same cursor, metrics read from the device once, when the run ends."""
        self.module.train()
        losses, factors, correct, rows, peak = [], [], [], 0, None
        first_step = cursor.steps
        for step, _, x, y in self.engine.walk(source, n_steps, cursor):
            if step == measure_at:
                out, loss, peak = self.measured_step(x, y)
            else:
                out, loss = self.step(x, y)
            losses.append(loss)
            factors.append(float(len(y)))  # mean loss -> summed loss, as the engine counts it
            if self.engine.loss == "ce":
                correct.append((out.argmax(2) == y).flatten(1).sum(1))  # (n,)
            rows += len(y)
        return self._close(losses, factors, correct, rows, peak, first_step)

    def _close(self, losses: list[Tensor], factors: list[float], correct: list[Tensor], rows: int,
               peak: Optional[int], first_step: int) -> list[MemberResult]:
        """Per member: summed loss, correct count, first non-finite step, finite weights; one host sync."""
        n, dev = self.n, self.engine.device
        if losses:
            loss_t = torch.stack(losses).double()  # (steps, n)
            steps = torch.arange(len(losses), device=loss_t.device, dtype=torch.float64)[:, None]
            first_bad = torch.where(torch.isfinite(loss_t), math.inf, steps).amin(0)  # (n,)
            sums = (loss_t * torch.tensor(factors, dtype=torch.float64, device=loss_t.device)[:, None]).sum(0)
            n_correct = torch.stack(correct).sum(0).double() if correct else torch.zeros_like(first_bad)
        else:
            first_bad = torch.full((n,), math.inf, dtype=torch.float64, device=dev)
            sums = n_correct = torch.zeros(n, dtype=torch.float64, device=dev)
        ok = torch.ones(n, dtype=torch.bool, device=dev)
        for t in [*self.params.values(), *self.buffers.values()]:
            if t.is_floating_point():
                ok &= torch.isfinite(t.detach()).flatten(1).all(1)
        table = torch.stack([sums, n_correct, first_bad, ok.double()]).T.tolist()  # the one host sync
        return [self._result(*row, rows, peak, first_step, len(losses)) for row in table]

    def _result(self, loss_sum: float, n_correct: float, bad: float, ok: float, rows: int, peak: Optional[int],
                first_step: int, n_steps: int) -> MemberResult:
        stats = StepStats(loss=loss_sum / max(rows, 1), correct=int(n_correct) if self.engine.loss == "ce" else 0,
                          seen=rows, measured_peak=peak)
        if bad != math.inf:
            return MemberResult(stats, NonFiniteError(self.engine.stage, first_step + int(bad) + 1, "loss"))
        if not ok:
            return MemberResult(stats, NonFiniteError(self.engine.stage, first_step + n_steps,
                                                      "parameters or buffers"))
        return MemberResult(stats)

    # -- evaluation, pruning, the winner ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, source: Optional[BatchSource]) -> list[Optional[float]]:
        """Every member's accuracy (classes) or mean squared error (regression) on ``source``, as
        ``Engine.evaluate`` computes it for one module; Nones without a source."""
        if source is None or source.rows == 0:
            return [None] * self.n
        self.module.eval()
        total, per = torch.zeros(self.n, dtype=torch.float64, device=self.engine.device), 1
        for x, y in self.engine.eval_batches(source):
            out = self._outputs(x)  # (n, B, ...)
            if self.engine.loss == "ce":
                total += (out.argmax(2) == y).flatten(1).sum(1).double()
            else:
                per = max(1, y[0].numel()) if len(y) else per
                total += ((out.reshape(self.n, *y.shape) - y) ** 2).flatten(1).sum(1).double()
        return [v / (source.rows * per) for v in total.tolist()]

    def _outputs(self, x: Tensor) -> Tensor:
        if self.forward_mode == "vmap":
            return self._vmapped(self.params, self.buffers, x)
        return torch.stack([self._call({k: p[i] for k, p in self.params.items()},
                                       {k: b[i] for k, b in self.buffers.items()}, x) for i in range(self.n)])

    def keep(self, members: Sequence[int]) -> None:
        """Keep only ``members`` (indices of the current members, in the order given); the rest are freed."""
        index = torch.tensor(list(members), dtype=torch.long, device=self.engine.device)
        self.params = {k: p.detach()[index].requires_grad_() for k, p in self.params.items()}
        self.buffers = {k: b[index] for k, b in self.buffers.items()}
        self.optimizer.keep(index)
        self.n = len(members)

    @torch.no_grad()
    def load_member(self, i: int, config: TrainConfig) -> None:
        """Put member ``i``'s weights and buffers into the module and its optimizer state into the engine."""
        own = dict(self.module.named_parameters())
        for k, p in self.params.items():
            own[k].copy_(p[i])
        bufs = dict(self.module.named_buffers())
        for k, b in self.buffers.items():
            bufs[k].copy_(b[i])
        opt = self.engine.new_optimizer(config)
        opt.load_state_dict({"state": self.optimizer.member_state(i), "param_groups": opt.state_dict()["param_groups"]})
