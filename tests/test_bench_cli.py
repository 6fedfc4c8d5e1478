"""pystage-bench end to end on tiny settings: tables printed, JSON written with the documented keys."""
import json

import pytest

from pystage.bench.cli import JOBS, main


def test_layers_job_writes_results(tmp_path, capsys):
    out = tmp_path / "layers.json"
    assert main(["layers", "--cases", "2", "--fractions", "0.5", "--repeats", "1", "--forward-repeats", "1",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data["results"]
    for key in ("layer", "trainable_fraction", "dense_backward_ms", "masked_backward_ms", "hook_backward_ms",
                "composed_backward_ms", "speedup", "ideal_speedup", "forward_overhead"):
        assert key in row
    assert row["layer"] == "conv2d" and row["trainable_fraction"] == 0.5
    assert row["ideal_speedup"] == pytest.approx(2 / (0.5 + 0.25))
    assert "torch" in data["environment"] and "speedup" in capsys.readouterr().out


def test_train_job_runs_methods_in_processes(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["train", "--model", "cnn2", "--n", "120", "--val-n", "40", "--epochs", "1",
                 "--methods", "total,partial", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["method"] for r in runs] == ["total", "partial"]
    for r in runs:
        assert r["model"] == "cnn2" and r["epochs"] == 1 and r["wall_s"] > 0 and r["peak_mem_mib"] > 0
        assert 0.0 <= r["val_acc"] <= 1.0
    assert runs[1]["store_bytes"] > 0 and runs[0]["store_bytes"] == 0
    assert "partial" in capsys.readouterr().out


def test_train_job_under_a_budget_marks_total(tmp_path):
    out = tmp_path / "budget.json"
    # plain-12-16 at batch 20: end-to-end ~8.5 MiB predicted, smallest feasible stage ~7.5 MiB
    assert main(["train", "--model", "plain-12-16", "--n", "100", "--val-n", "20", "--epochs", "1",
                 "--batch-size", "20", "--methods", "total,partial", "--budget", "8MiB", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    total, partial = data["runs"]
    assert data["plan"]["total_predicted_mib"] > data["plan"]["budget_mib"] == 8.0
    assert len(data["plan"]["split_points"]) >= 1
    assert total["fits"] is False and total["wall_s"] is None
    assert partial["fits"] is True and partial["measured_peak_mib"] <= 8.0


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit, match="--methods"):
        main(["train", "--methods", "total,nope"])


def test_every_job_is_registered():
    assert {"train", "layers", "store", "plan", "paper"} <= set(JOBS)
