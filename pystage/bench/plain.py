"""``plain``: the loop a competent PyTorch user writes for the same model, data and optimizer, as a baseline.

``pystage-bench train --methods plain,total,...`` runs it beside pystage's methods, in its own process like
them. How it is written (what a user who knows PyTorch does, nothing from pystage's engine):

* the model's layers and the classifier ``fit`` puts on the last stage (flatten, linear), as one
  ``nn.Sequential``; Adam with the same lr and L2 (``TrainConfig()``'s); cross-entropy; batch 50;
* the data as two tensors on the training device (a CIFAR-sized set fits any GPU; on the CPU it is where it
  is), a ``torch.randperm`` per epoch and tensor slicing: no DataLoader, whose per-row ``__getitem__`` and
  collation cost more than a small CNN's step;
* ``zero_grad(set_to_none=True)``; loss and correct counts summed on the device and read once per epoch
  (no ``.item()`` per step, which would wait for the GPU every step);
* one evaluation pass over the validation set at the end, under ``torch.no_grad()``.

``targets(runs)`` gives the ratios the training loop is held to: ``total``'s throughput (training rows per
second of wall time, evaluation included for both) against this loop's, and ``partial``'s wall time against
``total``'s.
"""
from __future__ import annotations

import resource
import time
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn


def train_plain(model: nn.Sequential, head: nn.Module, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor,
                y_val: torch.Tensor, epochs: int, batch_size: int, lr: float, weight_decay: float,
                seed: int) -> dict[str, float]:
    """Train ``model`` + ``head`` on ``(x, y)`` (tensors on the training device); returns accuracies and loss."""
    net = nn.Sequential(*model, head)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    gen, n = torch.Generator().manual_seed(seed), len(x)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(n, generator=gen).to(x.device)
        loss_sum, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device, dtype=torch.long)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = x[idx], y[idx]
            out = net(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            correct += (out.argmax(1) == yb).sum()
        train_loss, train_acc = loss_sum.item() / n, correct.item() / n  # once per epoch
    net.eval()
    with torch.no_grad():
        hits = sum((net(x_val[i:i + batch_size]).argmax(1) == y_val[i:i + batch_size]).sum()
                   for i in range(0, len(x_val), batch_size))
    return {"train_loss": train_loss, "train_acc": train_acc, "val_acc": float(hits) / max(len(x_val), 1)}


def run(spec: dict[str, Any], load_data: Any) -> dict[str, Any]:
    """The plain loop on ``spec``'s model and data (``pystage.bench.train_worker``'s spec); its figures."""
    import pystage
    from pystage.optim import TrainConfig
    from pystage.staged import feature_shapes, make_head
    from pystage.train.peak import PeakMeter

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    train, val = load_data(spec)
    torch.manual_seed(spec["seed"])
    model = pystage.models.get(spec["model"], in_channels=train.x.shape[1], num_classes=train.num_classes)
    device = torch.device(spec["device"])
    head = make_head(feature_shapes([model], tuple(train.x.shape[1:]))[-1], train.num_classes)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = TrainConfig()
    with PeakMeter(device) as meter:
        t0 = time.perf_counter()
        model.to(device), head.to(device)
        x, y = (t.to(device) for t in train.tensors)
        xv, yv = (t.to(device) for t in val.tensors)
        out = train_plain(model, head, x, y, xv, yv, spec["epochs"], spec["batch_size"], cfg.lr, cfg.weight_decay,
                          spec["seed"])
        wall = time.perf_counter() - t0
    # on a GPU the meter read max_memory_allocated (the training memory column); on the CPU it sampled the RSS, and
    # the live-tensor peak of a step is not measured here (a user's loop has no such accounting): "-" in the table
    cuda = device.type == "cuda"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if cuda else meter.peak_mib
    return {"method": "plain", "model": spec["model"], "epochs": spec["epochs"], "wall_s": wall, "train_s": wall,
            "measured_peak_mib": meter.peak_mib if cuda else None,
            "measured_peak_source": meter.source if cuda else None, "rss_peak_mib": rss,
            "process_rss_before_fit_mib": rss_before, "train_acc": out["train_acc"], "val_acc": out["val_acc"],
            "store_s": 0.0, "store_bytes": 0, "stages": [], "split_points": [], "rows": len(train)}


def targets(runs: list[dict[str, Any]], rows: int) -> dict[str, Optional[float]]:
    """``total_vs_plain_throughput`` (target >= 0.95) and ``partial_vs_total_wall`` (target <= 1.05), where the runs
    hold the methods; throughput is ``rows * epochs / wall_s``."""
    by = {r["method"]: r for r in runs if r.get("wall_s")}

    def throughput(m: str) -> Optional[float]:
        return rows * by[m]["epochs"] / by[m]["wall_s"] if m in by else None

    total, plain = throughput("total"), throughput("plain")
    return {"total_vs_plain_throughput": total / plain if total and plain else None,
            "partial_vs_total_wall": by["partial"]["wall_s"] / by["total"]["wall_s"]
            if "partial" in by and "total" in by else None}
