"""The plain PyTorch loop that ``pystage-bench train`` measures pystage against, and the ratios it reports."""
from __future__ import annotations

import json

import pytest
import torch

import pystage
from pystage.bench.plain import targets, train_plain
from pystage.data import synthetic
from pystage.staged import feature_shapes, make_head


def test_the_plain_loop_learns_an_easy_task():
    kw = dict(num_classes=4, shape=(3, 16, 16), seed=0, noise=0.3)
    train, val = synthetic(n=400, **kw), synthetic(n=200, split="val", **kw)
    torch.manual_seed(0)
    model = pystage.models.get("cnn2", num_classes=4, width=8)
    head = make_head(feature_shapes([model], (3, 16, 16))[-1], 4)
    out = train_plain(model, head, *train.tensors, *val.tensors, epochs=3, batch_size=50, lr=3e-3,
                      weight_decay=1e-4, seed=0)
    assert set(out) == {"train_loss", "train_acc", "val_acc"}
    assert out["val_acc"] > 0.6 and out["train_loss"] < 1.0  # chance: 25%


def test_targets_are_throughput_and_wall_time_ratios():
    runs = [{"method": "plain", "epochs": 2, "wall_s": 10.0}, {"method": "total", "epochs": 2, "wall_s": 12.5},
            {"method": "partial", "epochs": 2, "wall_s": 15.0}, {"method": "total-x", "wall_s": None}]
    got = targets(runs, rows=1000)
    assert got["total_vs_plain_throughput"] == pytest.approx(0.8)
    assert got["partial_vs_total_wall"] == pytest.approx(1.2)
    assert targets(runs[:1], rows=1000) == {"total_vs_plain_throughput": None, "partial_vs_total_wall": None}


def test_bench_train_runs_plain_beside_the_methods_and_reports_the_ratios(tmp_path):
    from pystage.bench.cli import main

    out = tmp_path / "train.json"
    assert main(["train", "--model", "cnn2", "--n", "120", "--val-n", "40", "--epochs", "1", "--threads", "1",
                 "--methods", "plain,total,partial", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["runs"]] == ["plain", "total", "partial"]
    plain = data["runs"][0]
    assert plain["wall_s"] > 0 and 0.0 <= plain["val_acc"] <= 1.0 and plain["store_bytes"] == 0
    assert data["total_vs_plain_throughput"] > 0 and data["partial_vs_total_wall"] > 0
    assert plain["measured_peak_mib"] is None and plain["rss_peak_mib"] > 0  # CPU: no live-tensor accounting


def test_bench_train_hands_compile_mode_to_fit(monkeypatch, capsys):
    from pystage.bench import train as bench_train
    from pystage.bench.cli import main

    specs = []
    monkeypatch.setattr(bench_train, "run_method", lambda spec, *a: specs.append(spec) or {"method": spec["method"]})
    assert main(["train", "--model", "cnn2", "--n", "60", "--val-n", "20", "--methods", "total,partial",
                 "--compile-mode", "reduce-overhead"]) == 0
    assert [s["compile_mode"] for s in specs] == ["reduce-overhead", "reduce-overhead"]
    assert main(["train", "--model", "cnn2", "--n", "60", "--val-n", "20", "--methods", "total"]) == 0
    assert specs[-1]["compile_mode"] is None
