"""Sine regression with dynamic capacity (Princeton thesis, section 5.1, Table 5.2).

One hidden layer (ReLU) of up to 500 units fits sin(x) on [-2pi, 2pi]. Variants, all with the same
optimiser, batches and epochs: a fixed 100-unit net, a fixed 500-unit net, and the adaptive net (500
units in fifths: starts with 100, grows by a fifth on a plateau of the moving-average training loss and
freezes what it had). Metric: test MSE on a dense grid at the end. Also measured, in the same run: the
backward time of a grown layer at trainable fraction 0.2 vs the full (dense) backward of that layer.
"""
from __future__ import annotations

import argparse
import math
import statistics
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from pystage.bench.repro.common import markdown, row
from pystage.bench.timing import median_ms
from pystage.layers import MaskedConv2d, MaskedLinear, grow_chain
from pystage.train import TrainConfig, fit
from pystage.train.capacity import CapacityConfig

EPOCHS, N_TRAIN, N_TEST, BATCH = 40, 1000, 1000, 50
LR = 1e-2
PLATEAU = dict(window=10, patience=10, tolerance=0.0, min_batches=150)  # thesis: "fails to improve in 10 batches"


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


def train_variant(variant: str, seed: int, epochs: int) -> tuple[float, dict[str, Any]]:
    width, parts = {"fixed-100": (100, 1), "fixed-500": (500, 1), "adaptive": (500, 5)}[variant]
    torch.manual_seed(seed)
    res = fit(_net(width), sine_data(N_TRAIN, seed), None, method="capacity", epochs=epochs, batch_size=BATCH,
              seed=seed, device="cpu", progress=False, config=TrainConfig(lr=LR, weight_decay=0.0),
              growth=CapacityConfig(fractions=parts, **PLATEAU))
    grows = [h for h in res.report.history if h.get("event") == "grow"]
    return _test_mse(res.model, sine_data(N_TEST, 0, grid=True)), {"growth_batches": [g["batch"] for g in grows]}


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


def add_arguments(parser: argparse.ArgumentParser) -> None:  # options are the shared ones of repro
    pass


def run(args: argparse.Namespace) -> dict[str, Any]:
    epochs = args.epochs or EPOCHS
    rows, details = [], {}
    for variant in ("fixed-100", "fixed-500", "adaptive"):
        runs = [train_variant(variant, seed, epochs) for seed in range(args.seeds)]
        rows.append(row(variant, "test_mse", [r[0] for r in runs], epochs=epochs))
        details[variant] = [r[1] for r in runs]
    backward = [backward_ratio("linear", 1000, 512), backward_ratio("conv", 80, 32, 32)]
    cols = ["layer", "trainable_fraction", "grown_ms", "full_ms", "ratio"]
    return {"title": "Sine regression, dynamic capacity (thesis Table 5.2): test MSE", "rows": rows,
            "details": details, "backward": backward,
            "notes": [f"{epochs} epochs of {N_TRAIN} samples, batch {BATCH}, Adam lr {LR}; plateau: {PLATEAU}.",
                      "Backward of a grown layer at trainable fraction 0.2 vs its full backward (same run, median ms):",
                      markdown(backward, cols)]}
