"""Incremental training with look-ahead vs random init vs end-to-end (Istrate et al., Table 2).

A small VGG-like net (three sub-networks of two conv3-16 + pool each) on the synthetic task, or on
CIFAR-10 with ``--path``. Variants: ``end-to-end`` (fit method "total"), ``lookahead`` and ``random``
(fit method "incremental" with that init; angle criterion ws=2, gamma=0.5, a per-step epoch cap).
Metric: test accuracy at the end.
"""
from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch

from pystage import data, models
from pystage.bench.repro.common import row
from pystage.store import FeatureStore
from pystage.train import TrainConfig, fit
from pystage.train.incremental import IncrementalConfig

SHAPE, CLASSES, N_TRAIN, N_VAL, N_TEST = (3, 16, 16), 10, 1500, 500, 1000
CAP, LOOKAHEAD, BASELINE_EPOCHS = 4, 1, 8
VGG = (("c3", "c3", "p"),) * 3


def datasets(path: str | None, seed: int):
    if path:
        train, val = data.train_val_split(data.cifar10(path, "train"), val_fraction=0.1, seed=seed)
        return train, val, data.cifar10(path, "test")
    kw = dict(num_classes=CLASSES, shape=SHAPE, seed=0)
    return (data.synthetic(n=N_TRAIN, **kw), data.synthetic(n=N_VAL, split="val", **kw),
            data.synthetic(n=N_TEST, split="test", **kw))


def _accuracy(net: torch.nn.Module, test) -> float:
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 500):
            x, y = test.tensors[0][i:i + 500], test.tensors[1][i:i + 500]
            correct += int((net(x).argmax(1) == y).sum())
    return correct / len(test)


def train_variant(variant: str, seed: int, sets, cap: int, root: str) -> tuple[float, dict[str, Any]]:
    train, val, test = sets
    torch.manual_seed(seed)
    model = models.cnn_from_table(VGG, in_channels=3, width=16)
    model.num_classes = CLASSES  # type: ignore[assignment]
    common = dict(batch_size=50, seed=seed, device="cpu", progress=False, config=TrainConfig(lr=1e-3),
                  store=FeatureStore(root), checkpoint_dir=f"{root}/stages", share_prefixes=False)
    if variant == "end-to-end":
        res = fit(model, train, val, method="total", epochs=BASELINE_EPOCHS, **common)
        epochs = BASELINE_EPOCHS
    else:
        growth = IncrementalConfig(ws=2, gamma=0.5, lookahead_epochs=LOOKAHEAD, init=variant,
                                   max_epochs_per_step=cap)
        res = fit(model, train, val, method="incremental", epochs=cap, growth=growth, **common)
        epochs = sum(1 for h in res.report.history if h["phase"] == "joint")
    return _accuracy(res.model, test), {"joint_epochs": epochs, "wall_s": res.report.wall_s}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> dict[str, Any]:
    cap = args.epochs or CAP
    rows, details = [], {}
    with tempfile.TemporaryDirectory(prefix="pystage-repro-") as root:
        for variant in ("end-to-end", "lookahead", "random"):
            runs = [train_variant(variant, seed, datasets(args.path, seed), cap, root) for seed in range(args.seeds)]
            extra = {f"mean_{k}": sum(r[1][k] for r in runs) / len(runs) for k in ("joint_epochs", "wall_s")}
            rows.append(row(variant, "test_acc", [r[0] for r in runs], **extra))
            details[variant] = [r[1] for r in runs]
    name = "CIFAR-10" if args.path else f"synthetic {SHAPE}, {N_TRAIN} train"
    return {"title": f"Incremental training, look-ahead vs random vs end-to-end ({name}): test accuracy",
            "rows": rows, "details": details,
            "columns": ["variant", "metric", "mean", "std", "seeds", "mean_joint_epochs", "mean_wall_s"],
            "notes": [f"VGG-like 3 x (conv3-16, conv3-16, pool); Adam lr 1e-3, batch 50; end-to-end: "
                      f"{BASELINE_EPOCHS} epochs; incremental: ws=2, gamma=0.5, <= {cap} joint epochs per step, "
                      f"{LOOKAHEAD} look-ahead epoch(s) on stored features."]}
