"""Skip pathways on a deep plain CNN (Gil, Table 1): concat / sum vs the plain baseline.

``plain-<depth>-<width>`` without BatchNorm on the synthetic task (CIFAR-10 with ``--path``), SGD as in
the paper, the same epochs for every variant. Metric: test accuracy at the end.
"""
from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch

from pystage import models
from pystage.bench.repro.common import row
from pystage.bench.repro.lookahead import _accuracy, datasets
from pystage.pathways import as_staged
from pystage.store import FeatureStore
from pystage.train import TrainConfig, fit

DEPTH, WIDTH, EPOCHS, LR = 24, 8, 4, 0.01
SHAPE = (3, 16, 16)


def train_variant(variant: str, seed: int, sets, epochs: int, root: str) -> float:
    train, val, test = sets
    shape = tuple(train[0][0].shape)
    torch.manual_seed(seed)
    mode = None if variant == "baseline" else variant
    model = models.get(f"plain-{DEPTH}-{WIDTH}", num_classes=10, pathways=mode, input_size=shape[1])
    net = model if mode is None else as_staged(model, shape, 10)
    res = fit(net, train, val, method="total", epochs=epochs, batch_size=50, seed=seed, device="cpu", progress=False,
              config=TrainConfig(optimizer="sgd", lr=LR, momentum=0.9, weight_decay=0.0), store=FeatureStore(root),
              checkpoint_dir=f"{root}/stages", share_prefixes=False)
    return _accuracy(res.model, test)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> dict[str, Any]:
    epochs = args.epochs or EPOCHS
    rows = []
    with tempfile.TemporaryDirectory(prefix="pystage-repro-") as root:
        for variant in ("baseline", "concat", "sum"):
            accs = [train_variant(variant, seed, datasets(args.path, seed), epochs, root) for seed in range(args.seeds)]
            rows.append(row(variant, "test_acc", accs, model=f"plain-{DEPTH}-{WIDTH}", epochs=epochs))
    name = "CIFAR-10" if args.path else f"synthetic {SHAPE}"
    return {"title": f"Skip pathways on plain-{DEPTH}-{WIDTH} ({name}): test accuracy", "rows": rows,
            "columns": ["variant", "metric", "mean", "std", "seeds", "model", "epochs"],
            "notes": [f"No BatchNorm, Kaiming init; SGD lr {LR}, momentum 0.9, batch 50, {epochs} epochs; "
                      "pathways: every conv output max-pooled to the final map size."]}
