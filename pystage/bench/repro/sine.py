"""Sine regression with dynamic capacity (Princeton thesis, section 5.1, Table 5.2).

One hidden layer (ReLU) of up to 500 units fits sin(x) on [-2pi, 2pi]. Variants, all with the same
optimiser, batches and epochs: a fixed 100-unit net, a fixed 500-unit net, and the adaptive net (500
units in fifths: starts with 100, grows by a fifth on a plateau of the moving-average training loss and
freezes what it had). Two measures: test MSE on a dense grid at the end, and the thesis's own (Table
5.2): mean and std of the training loss over the final 10 samples, a sample being the loss of every
100th batch (the thesis "sample[s] training accuracy every 100 steps", section 5.3). Each is reported
as its mean over seeds with the standard error of that mean.

A *reading* fixes what the thesis leaves open: points per epoch, Adam's learning rate, and the growth
rule (``READINGS``). Also measured, in the same run: the backward time of a grown layer at trainable
fraction 0.2 vs the full (dense) backward of that layer.
"""
from __future__ import annotations

import argparse
import math
import statistics
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

from pystage.bench.repro.common import markdown
from pystage.bench.timing import median_ms
from pystage.layers import MaskedConv2d, MaskedLinear, grow_chain
from pystage.train import TrainConfig, fit
from pystage.train.capacity import CapacityConfig

EPOCHS, N_TEST, BATCH, SAMPLE_EVERY, FINAL = 40, 1000, 50, 100, 10
VARIANTS = {"fixed-100": (100, 1), "fixed-500": (500, 1), "adaptive": (500, 5)}  # width, parts
# name -> points per epoch, Adam lr, plateau options. "thesis": Adam's default lr (TensorFlow's 1e-3, which the
# thesis says it kept), the growth rule read literally, and epochs long enough that the final 10 samples
# are the last 5 of 40 epochs. "every-8-epochs": no plateau watch, growth on a fixed schedule spread over the run
# (as in the thesis's CIFAR-100 run, section 5.3). "small": the first repro (8 samples in all: "final 10" is all 8).
READINGS: dict[str, dict[str, Any]] = {
    "thesis": dict(points=10000, lr=1e-3, rule="thesis", window=10, patience=10, tolerance=0.0, min_batches=0),
    "best": dict(points=10000, lr=1e-3, rule="best", window=10, patience=10, tolerance=0.0, min_batches=150),
    "thesis-lr1e-2": dict(points=10000, lr=1e-2, rule="thesis", window=10, patience=10, tolerance=0.0,
                          min_batches=0),
    "every-8-epochs": dict(points=10000, lr=1e-3, rule="every", window=10, patience=10, tolerance=0.0,
                           min_batches=8 * 10000 // BATCH),
    "every-8-epochs-lr1e-2": dict(points=10000, lr=1e-2, rule="every", window=10, patience=10, tolerance=0.0,
                                  min_batches=8 * 10000 // BATCH),
    "small": dict(points=1000, lr=1e-2, rule="best", window=10, patience=10, tolerance=0.0, min_batches=150),
    "small-thesis": dict(points=1000, lr=1e-2, rule="thesis", window=10, patience=10, tolerance=0.0,
                         min_batches=0),
}
DEFAULT_READING = "thesis"
COLUMNS = ["reading", "variant", "test MSE", "final-10 mean", "final-10 std", "samples", "seeds", "growths at batch"]


def sine_data(n: int, seed: int, grid: bool = False) -> TensorDataset:
    """``(x, sin x)`` with x uniform on [-2pi, 2pi] (or an even grid); x: (N, 1), y: (N, 1)."""
    if grid:
        x = torch.linspace(-2 * math.pi, 2 * math.pi, n).unsqueeze(1)
    else:
        x = (torch.rand(n, 1, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * 2 * math.pi
    return TensorDataset(x, torch.sin(x))


def _net(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, 1))


def _test_mse(model: nn.Module, test: TensorDataset) -> float:
    with torch.no_grad():
        x, y = test.tensors
        return float(((model(x) - y) ** 2).mean())


def final_samples(history: Sequence[dict[str, Any]], n: int = FINAL) -> tuple[float, float, int]:
    """The thesis's measure: (mean, population std) of the last ``n`` sampled training losses, and how many
    there were (fewer than ``n`` when the run had fewer samples: then all of them)."""
    losses = [h["train_loss"] for h in history if h.get("event") == "sample"][-n:]
    if not losses:
        return float("nan"), float("nan"), 0
    return statistics.fmean(losses), statistics.pstdev(losses), len(losses)


def train_variant(variant: str, seed: int, epochs: int, reading: str = DEFAULT_READING) -> dict[str, Any]:
    """One run: test MSE, the final-10 measure and the batches at which the net grew."""
    opts = dict(READINGS[reading])
    points, lr = opts.pop("points"), opts.pop("lr")
    width, parts = VARIANTS[variant]
    torch.manual_seed(seed)
    res = fit(_net(width), sine_data(points, seed), None, method="capacity", epochs=epochs, batch_size=BATCH,
              seed=seed, device="cpu", progress=False, config=TrainConfig(lr=lr, weight_decay=0.0),
              growth=CapacityConfig(fractions=parts, sample_every=SAMPLE_EVERY, **opts))
    mean, std, count = final_samples(res.report.history)
    grows = [h["batch"] for h in res.report.history if h.get("event") == "grow"]
    return {"test_mse": _test_mse(res.model, sine_data(N_TEST, 0, grid=True)), "final_mean": mean,
            "final_std": std, "samples": count, "growth_batches": grows}


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean over seeds and its standard error (sample std / sqrt(n); 0 for one seed)."""
    vals = [float(v) for v in values]
    if any(math.isnan(v) for v in vals):  # a run without samples (shorter than one sample interval)
        return float("nan"), float("nan")
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else 0.0
    return statistics.fmean(vals), se


def _cell(mean: float, se: float) -> str:
    return f"{mean:.3g} ± {se:.2g}"


def summarise(reading: str, variant: str, runs: Sequence[dict[str, Any]], epochs: int) -> dict[str, Any]:
    """One table row: each measure's mean over seeds ± its standard error (numbers kept for the JSON)."""
    row: dict[str, Any] = {"reading": reading, "variant": variant, "metric": "test_mse", "seeds": len(runs),
                           "epochs": epochs, "samples": min(r["samples"] for r in runs)}
    for key, label in MEASURES:
        mean, se = _mean_se([r[key] for r in runs])
        row[f"{key}_mean"], row[f"{key}_se"], row[label] = mean, se, _cell(mean, se)
        row[f"{key}_values"] = [r[key] for r in runs]
    row["mean"], row["std"] = row["test_mse_mean"], statistics.stdev(row["test_mse_values"]) if len(runs) > 1 else 0.0
    grows = [r["growth_batches"] for r in runs]
    row["growths at batch"] = "-" if not any(grows) else \
        "/".join(str(round(statistics.fmean(g[i] for g in grows if len(g) > i)))
                 for i in range(max(len(g) for g in grows)))
    return row


MEASURES = (("test_mse", "test MSE"), ("final_mean", "final-10 mean"), ("final_std", "final-10 std"))
PAIRED_COLUMNS = ["reading", "measure", "adaptive - fixed-100", "adaptive - fixed-500"]


def paired(reading: str, runs: dict[str, Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Adaptive minus each fixed net, seed by seed (same data, same batches): mean ± standard error of the
    difference, and on how many seeds the adaptive net was lower."""
    rows = []
    for key, label in MEASURES:
        row: dict[str, Any] = {"reading": reading, "measure": label}
        for other in ("fixed-100", "fixed-500"):
            diffs = [a[key] - b[key] for a, b in zip(runs["adaptive"], runs[other])]
            mean, se = _mean_se(diffs)
            row[f"adaptive - {other}"] = f"{mean:+.2g} ± {se:.2g} ({sum(d < 0 for d in diffs)}/{len(diffs)} lower)"
        rows.append(row)
    return rows


def _chain(kind: str, width: int) -> list[nn.Module]:
    """Two masked layers grown in fifths to the last fifth: the second has 80% frozen, 20% trainable units."""
    step = width // 5
    if kind == "linear":
        layers = [MaskedLinear(width, width, units=step), MaskedLinear(width, width, units=step, inputs=step,
                                                                       trainable_inputs=step)]
    else:
        layers = [MaskedConv2d(width, width, 3, padding=1, units=step),
                  MaskedConv2d(width, width, 3, padding=1, units=step, inputs=step, trainable_inputs=step)]
    for _ in range(4):
        grow_chain(layers, step)
    return layers


def backward_ratio(kind: str, width: int, batch: int, spatial: int = 0) -> dict[str, Any]:
    """Median backward ms of the grown layer (fraction 0.2 trainable, dX for the 0.2 trainable inputs) vs dense."""
    grown = _chain(kind, width)[1]
    dense = grown.to_dense()
    shape = (batch, width) if kind == "linear" else (batch, width, spatial, spatial)
    x = torch.randn(shape, requires_grad=True)
    state: dict[str, Any] = {}

    def timer(layer: nn.Module) -> float:
        def setup() -> None:
            x.grad = None
            layer.zero_grad(set_to_none=True)
            state["y"] = layer(x)
            state["g"] = torch.ones_like(state["y"])

        return median_ms(lambda: state["y"].backward(state["g"]), setup=setup, warmup=2, repeats=7)

    rounds = [(timer(grown), timer(dense)) for _ in range(5)]  # interleaved: load spikes hit both alike
    times = {"grown_ms": statistics.median(r[0] for r in rounds), "full_ms": statistics.median(r[1] for r in rounds)}
    name = f"linear {width}->{width} b{batch}" if kind == "linear" else \
        f"conv3x3 {width}->{width} {spatial}x{spatial} b{batch}"
    frac = grown.trainable_units / grown.active_units
    return {"layer": name, "trainable_fraction": frac, **times,
            "ratio": statistics.median(g / f for g, f in rounds)}  # median of the per-round ratios


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reading", default=DEFAULT_READING,
                        help=f"sine: comma-separated readings of the thesis, or 'all' (each reuses the fixed nets "
                             f"of an earlier one with the same data and lr); one of {sorted(READINGS)} "
                             f"(default {DEFAULT_READING})")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"sine: comma-separated variants to train (default all: {','.join(VARIANTS)})")


def _names(arg: str, known: Sequence[str], option: str) -> list[str]:
    names = list(known) if arg == "all" else [a.strip() for a in arg.split(",") if a.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"{option}: unknown name(s) {unknown or [arg]}; expected 'all' or some of {sorted(known)}")
    return names


def run(args: argparse.Namespace) -> dict[str, Any]:
    epochs = args.epochs or EPOCHS
    readings = _names(getattr(args, "reading", DEFAULT_READING), list(READINGS), "--reading")
    variants = _names(getattr(args, "variants", "all"), list(VARIANTS), "--variants")
    rows, pairs, details, done = [], [], {}, {}
    for reading in readings:
        setting = (READINGS[reading]["points"], READINGS[reading]["lr"])
        runs = {}
        for variant in variants:
            key = (variant, *setting) if variant != "adaptive" else (variant, reading)
            if key not in done:  # a fixed net does not depend on the growth rule: trained once per data and lr
                done[key] = [train_variant(variant, seed, epochs, reading) for seed in range(args.seeds)]
            runs[variant] = details[f"{reading}/{variant}"] = done[key]
            rows.append(summarise(reading, variant, runs[variant], epochs))
        if len(runs) == len(VARIANTS) and args.seeds > 1:
            pairs += paired(reading, runs)
    backward = [backward_ratio("linear", 1000, 512), backward_ratio("conv", 80, 32, 32)]
    cols = ["layer", "trainable_fraction", "grown_ms", "full_ms", "ratio"]
    used = "; ".join(f"{r}: {READINGS[r]['points']} points/epoch, lr {READINGS[r]['lr']}, rule {READINGS[r]['rule']}"
                     f", min_batches {READINGS[r]['min_batches']}" for r in readings)
    notes = [f"{epochs} epochs, batch {BATCH}, Adam; cells: mean over seeds ± standard error. test MSE on a "
             f"{N_TEST}-point grid; final-10: mean / population std of the training loss over the final {FINAL} "
             f"samples (a sample: the loss of every {SAMPLE_EVERY}th batch). Plateau window 10, patience 10, "
             f"tolerance 0. Readings: {used}."]
    if pairs:
        notes += ["Paired by seed (adaptive minus fixed; negative: adaptive lower):", markdown(pairs, PAIRED_COLUMNS)]
    notes += ["Backward of a grown layer at trainable fraction 0.2 vs its full backward (same run, median ms):",
              markdown(backward, cols)]
    return {"title": "Sine regression, dynamic capacity (thesis Table 5.2): test MSE and final-10 training loss",
            "rows": rows, "columns": COLUMNS, "paired": pairs, "details": details, "backward": backward,
            "readings": {r: READINGS[r] for r in readings}, "notes": notes}
