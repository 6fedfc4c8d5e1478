"""The one training loop: a stage's module, its optimizer, loss, metrics on the device, DDP and the non-finite guard.

Every method trains through an ``Engine``: ``fit``'s stages, each search trial, the growing methods.
Inside ``run`` nothing waits on the device: each step's loss and correct count stay device tensors, and
they are read once, when ``run`` returns (end of an epoch or of a search rung), together with the guard's
verdict. Under DDP a rank's loss is its summed loss times ``size / rows of the global batch``, a number
every rank knows from the source (no collective per step); the epoch's metrics take one all-reduce.

Guard: a step whose loss is NaN/inf, or parameters/buffers that are not finite when ``run`` returns, stop
the stage with ``NonFiniteError`` naming the stage and the first bad step; the caller has saved nothing
of that stage yet (progress is saved only after ``run`` returns).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pystage import distributed
from pystage.optim import TrainConfig, make_optimizer
from pystage.train.errors import NonFiniteError
from pystage.train.feed import Feed, model_dtype
from pystage.train.progress import Progress
from pystage.train.sources import BatchSource, global_rows

LOSSES = ("ce", "mse")


@dataclass
class Cursor:
    """Where a trial is in its data: completed epochs, steps, and batches done of the current epoch.

    Successive halving stops trials mid-epoch; ``batch`` lets the next call continue that epoch where it
    stopped instead of starting it again.
    """

    epoch: int = 0
    steps: int = 0
    batch: int = 0


@dataclass
class StepStats:
    loss: float = 0.0
    correct: int = 0
    seen: int = 0
    measured_peak: Optional[int] = None  # bytes of live tensors during the measured step

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen if self.seen else float("nan")


class Engine:
    """Trains ``net`` (the trainable module: a stage + head, or a whole net) with ``config``'s optimizer.

    ``stage``: the name errors use ("2", "1-3", "2 trial 3/5"). ``loss``: "ce" (classes; accuracy is
    counted) or "mse" (regression). In a process group ``net`` trains under DistributedDataParallel.
    """

    def __init__(self, net: nn.Module, config: TrainConfig, device: torch.device, *, stage: str = "1",
                 loss: str = "ce", progress: Optional[Progress] = None, desc: str = "") -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.module, self.config, self.device, self.stage, self.loss = net, config, torch.device(device), stage, loss
        self.progress, self.desc = progress or Progress(False), desc
        self.feed = Feed(self.device, model_dtype(net))
        self.net = distributed.wrap(net, self.device)
        self.ddp = distributed.is_ddp(self.net)
        self.optimizer = self.new_optimizer()

    def new_optimizer(self, config: Optional[TrainConfig] = None, state: Optional[dict] = None) -> torch.optim.Optimizer:
        """A fresh optimizer over the module's trainable parameters (``state``: an optimizer state to continue)."""
        self.config = config or self.config
        self.optimizer = None  # type: ignore[assignment]  # the old state is freed before the new one is loaded
        self.optimizer = make_optimizer([p for p in self.module.parameters() if p.requires_grad], self.config)
        if state is not None:
            self.optimizer.load_state_dict(state)
        return self.optimizer

    # -- one step --------------------------------------------------------------------------------------------
    def _loss(self, out: Tensor, y: Tensor, rows: int) -> tuple[Tensor, float]:
        """(the loss to backpropagate, the host factor turning it into this rank's summed loss)."""
        if not self.ddp:
            loss = F.cross_entropy(out, y) if self.loss == "ce" else F.mse_loss(out.reshape(y.shape), y)
            return loss, float(len(y))
        per_row = 1 if self.loss == "ce" else max(1, y[0].numel() if len(y) else 1)
        weight = distributed.world().size / max(rows * per_row, 1)  # DDP averages: the global batch's mean
        summed = F.cross_entropy(out, y, reduction="sum") if self.loss == "ce" else \
            F.mse_loss(out.reshape(y.shape), y, reduction="sum")
        return summed * weight, 1.0 / (weight * per_row)

    def step(self, x: Tensor, y: Tensor, rows: int) -> tuple[Tensor, Tensor, float]:
        """One optimizer step on a batch already on the device: (output, loss, host factor of the loss)."""
        out = self.net(x)  # (B, num_classes) or the regression target's shape
        loss, factor = self._loss(out, y, rows)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out.detach(), loss.detach(), factor

    def measured_step(self, x: Tensor, y: Tensor, rows: int) -> tuple[Tensor, Tensor, float, int]:
        """``step`` under live-tensor accounting: also the peak bytes of parameters, optimizer state, batch,
        activations and gradients (what the planner predicts)."""
        from pystage.memory import LiveBytes

        tracker = LiveBytes(x.device, 512 if x.device.type == "cuda" else 1)
        state = [v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        tracker.track([*self.module.parameters(), *self.module.buffers(), *state, x, y])
        # eagerly, on the compiled net's original module (the same parameters): a compiled graph (a CUDA graph
        # replay) would hide its ops from the accounting
        compiled_net, self.net = self.net, getattr(self.net, "_orig_mod", self.net)
        try:
            with tracker:
                out, loss, factor = self.step(x, y, rows)
        finally:
            self.net = compiled_net
        return out, loss, factor, tracker.peak

    # -- many steps --------------------------------------------------------------------------------------------
    def run(self, source: BatchSource, n_steps: Optional[int], cursor: Cursor, measure_at: int = -1,
            on_step: Optional[Callable[[Tensor, Cursor], None]] = None) -> StepStats:
        """Train ``n_steps`` batches (``None``: the rest of the current epoch), crossing epochs as needed.

        ``measure_at``: the (global) step measured by live-tensor accounting (-1: none). ``on_step(loss,
        cursor)`` runs after every step (the capacity method's plateau watch; it may replace the optimizer).
        """
        self.net.train()
        stats, losses, factors, correct = StepStats(), [], [], []
        first_step = cursor.steps
        for step, rows, x, y in self.walk(source, n_steps, cursor):
            if step == measure_at:
                out, loss, factor, stats.measured_peak = self.measured_step(x, y, rows)
            else:
                out, loss, factor = self.step(x, y, rows)
            losses.append(loss)
            factors.append(factor)
            if self.loss == "ce":
                correct.append((out.argmax(1) == y).sum())
            stats.seen += rows
            if on_step is not None:
                on_step(loss, cursor)
        return self._close(stats, losses, factors, correct, first_step)

    def walk(self, source: BatchSource, n_steps: Optional[int],
             cursor: Cursor) -> Iterator[tuple[int, int, Tensor, Tensor]]:
        """The batches of ``n_steps`` steps (``None``: the rest of the current epoch) from where ``cursor`` stands,
        crossing epochs as needed, fed to the device one ahead: ``(step, rows, x, y)`` per batch, ``step`` its
        global index and ``rows`` the global batch's rows (under DDP each rank holds part of it). The cursor is
        advanced before the batch is handed out, so a caller that stops after any step leaves it right. Every
        loop over a source (``run``, the population's) walks it here."""
        remaining = n_steps
        while remaining is None or remaining > 0:
            batches = itertools.islice(source.batches(cursor.epoch), cursor.batch, None)  # continue a stopped epoch
            for x, y in self.progress.wrap(self._fed(batches, source), desc=f"{self.desc} epoch {cursor.epoch + 1}"):
                rows = global_rows(source, cursor.batch) if source.split_by_rank else len(y)
                step = cursor.steps
                cursor.steps, cursor.batch = cursor.steps + 1, cursor.batch + 1
                if remaining is not None:
                    remaining -= 1
                yield step, rows, x, y
                if remaining == 0:
                    return
            cursor.epoch, cursor.batch = cursor.epoch + 1, 0
            if remaining is None:
                return

    def _close(self, stats: StepStats, losses: list[Tensor], factors: list[float], correct: list[Tensor],
               first_step: int) -> StepStats:
        """Read the run's metrics and the guard's verdict from the device, once."""
        dev = self.device
        if losses:
            loss_t = torch.stack(losses).double()  # (steps,)
            finite = torch.isfinite(loss_t)
            steps = torch.arange(len(losses), device=loss_t.device, dtype=torch.float64)
            first_bad = torch.where(finite, torch.full_like(steps, math.inf), steps).min()
            sums = torch.stack([(loss_t * torch.tensor(factors, dtype=torch.float64, device=loss_t.device)).sum(),
                                torch.stack(correct).sum().double() if correct else loss_t.new_zeros(())])
        else:
            first_bad = torch.tensor(math.inf, dtype=torch.float64, device=dev)
            sums = torch.zeros(2, dtype=torch.float64, device=dev)
        mins = torch.stack([first_bad.to(dev), finite_tensors(self.module.parameters(), self.module.buffers()).to(dev)])
        if self.ddp:
            sums, mins = distributed.all_reduce_(sums.to(dev)), distributed.all_reduce_(mins, "min")
        loss_sum, n_correct, bad, params_ok = torch.cat([sums.to(dev), mins]).tolist()  # the one host sync
        if bad != math.inf:
            raise NonFiniteError(self.stage, first_step + int(bad) + 1, "loss")
        if not params_ok:
            raise NonFiniteError(self.stage, first_step + len(losses), "parameters or buffers")
        stats.correct = int(n_correct) if self.loss == "ce" else 0
        stats.loss = loss_sum / max(stats.seen, 1)
        return stats

    def eval_batches(self, source: BatchSource) -> Iterable[tuple[Tensor, Tensor]]:
        """Every batch of ``source`` on the device, fed one ahead, in epoch 0's order (order does not matter)."""
        return self._fed(source.batches(0), source)

    def _fed(self, batches: Iterable[Any], source: BatchSource) -> Iterable[tuple[Tensor, Tensor]]:
        """``batches`` on the device, fed one ahead (through a thread for a CPU source that reads row by row)."""
        return self.feed.batches(batches, threaded=getattr(source, "prefetch", False) and self.device.type == "cpu")

    # -- evaluation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, source: Optional[BatchSource]) -> Optional[float]:
        """Accuracy (classes) or mean squared error (regression) on every batch of ``source``; None without one."""
        if source is None or source.rows == 0:
            return None
        self.module.eval()
        parts, per = [], 1
        for x, y in self.eval_batches(source):
            out = self.module(x)
            per = max(1, y[0].numel()) if self.loss == "mse" and len(y) else per
            parts.append((out.argmax(1) == y).sum().double() if self.loss == "ce"
                         else F.mse_loss(out.reshape(y.shape), y, reduction="sum").double())
        total = torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64, device=self.device)
        if source.split_by_rank:  # each rank evaluated its part of every batch
            total = distributed.all_reduce_(total.reshape(1).to(self.device))[0]
        return float(total) / (source.rows * per)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: Optional[str]) -> None:
    """FitArgumentError unless ``mode`` is None or one of ``COMPILE_MODES``."""
    if mode is not None and mode not in COMPILE_MODES:
        from pystage.train.errors import FitArgumentError

        raise FitArgumentError("compile_mode", mode, f"None (eager) or one of {', '.join(COMPILE_MODES)}")


def compiled(net: nn.Module, mode: Optional[str]) -> nn.Module:
    """``net`` under ``torch.compile(mode=mode)`` (its forward, and so its backward: "reduce-overhead" replays them
    as CUDA graphs on a GPU); ``net`` itself for None. Shapes are static: the last, smaller batch of an epoch and
    evaluation compile once more. The compiled module shares ``net``'s parameters."""
    return net if mode is None else torch.compile(net, mode=mode, dynamic=False)  # type: ignore[return-value]


def finite_tensors(*groups: Iterable[Tensor]) -> Tensor:
    """A 0-d device tensor: 1.0 when every floating tensor of ``groups`` is finite, else 0.0 (no host sync)."""
    flags = [torch.isfinite(t).all() for g in groups for t in g if t is not None and t.is_floating_point()]
    return torch.stack(flags).all().double() if flags else torch.ones((), dtype=torch.float64)


class CheckpointedChain(nn.Module):
    """Runs layers in about sqrt(n) segments, each under ``torch.utils.checkpoint``.

    Only each segment's input is kept for backward; a segment's activations are recomputed when its
    backward runs. The recomputation runs with BatchNorm's running statistics frozen, so a checkpointed
    step updates them once, exactly as an ordinary step does (``total`` and ``checkpoint`` compute the same).
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        super().__init__()
        layers = [m for mod in modules for m in (mod if isinstance(mod, nn.Sequential) else [mod])]
        n_seg = max(1, round(math.sqrt(len(layers))))
        size = -(-len(layers) // n_seg)
        self.parts = nn.ModuleList(nn.Sequential(*layers[i:i + size]) for i in range(0, len(layers), size))

    def forward(self, x: Tensor) -> Tensor:
        for part in self.parts:
            if torch.is_grad_enabled():
                x = checkpoint(part, x, use_reentrant=False, context_fn=_frozen_bn_recompute(part))
            else:
                x = part(x)
        return x


def _frozen_bn_recompute(part: nn.Module) -> Callable[[], tuple[Any, Any]]:
    """checkpoint's ``context_fn``: nothing around the forward; around the recomputation, BatchNorm updates its
    running statistics with momentum 0 (they stay exactly as they are) and its batch count is put back."""
    import contextlib

    norms = [m for m in part.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    @contextlib.contextmanager
    def frozen() -> Any:
        saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                 for m in norms]
        for m in norms:  # train mode normalises with the batch's statistics either way; only the update changes
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, (momentum, count) in zip(norms, saved):
                m.momentum = momentum
                if count is not None:
                    m.num_batches_tracked.copy_(count)

    return lambda: (contextlib.nullcontext(), frozen())
