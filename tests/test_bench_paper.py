"""``pystage-bench paper`` on tiny settings: the paper's table, the JSON, and shared prefixes trained once."""
from __future__ import annotations

import argparse
import json

import pytest

from pystage.errors import UsageError
from pystage.bench import paper

TINY = dict(draws=1, width=4, seed=0)


@pytest.fixture(scope="module")
def tiny_data():
    return paper.load_data("synthetic", None, n=200, n_val=50, seed=0)


def test_shared_sweep_trains_identical_prefixes_once(tiny_data, tmp_path) -> None:
    train, val = tiny_data
    sweeps = paper.experiment(train, val, paper.Settings(**TINY), names=("cnn1", "cnn6"), root=str(tmp_path),
                              warm=False)
    shared, indep = sweeps["shared"], sweeps["independent"]
    assert shared.reports["cnn1"].method == "total" and shared.reports["cnn6"].method == "partial"
    assert [s.cached for s in shared.reports["cnn1"].stages] == [False]
    assert [s.cached for s in shared.reports["cnn6"].stages] == [True, False]  # stage 1 = CNN1's only stage
    assert not any(s.cached for r in indep.reports.values() for s in r.stages)
    for name in ("cnn1", "cnn6"):  # sharing changes the time, not the result
        assert paper.same_result(shared.reports[name], indep.reports[name])
    assert shared.wall_s > 0 and indep.wall_s > 0
    assert list(tmp_path.iterdir()) == []  # temporary caches and stores are removed

    lines = paper.paper_table(shared, indep.model_s).splitlines()
    assert lines[0].split() == ["Result", "CNN", "1", "CNN", "6"]
    assert len(lines) == 2 + len(paper.ROWS)
    assert all(line.strip().startswith(row) for line, row in zip(lines[2:], paper.ROWS))
    lr_row = lines[2]
    assert lr_row.split()[-1].count("/") == 1  # CNN6: one value per stage, "a/b"
    assert "yes/no" in paper.sharing_table(sweeps)


def test_run_prints_tables_and_writes_json(tiny_data, tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    paper.add_arguments(parser)
    out = tmp_path / "paper.json"
    args = parser.parse_args(["--data", "synthetic", "--n", "200", "--n-val", "50", "--draws", "1", "--width", "4",
                              "--models", "cnn5,cnn7", "--tmp", str(tmp_path), "--json", str(out)])
    assert paper.run(args) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("device: cpu")
    for row in paper.ROWS:
        assert row in text
    assert "CNN 5" in text and "CNN 7" in text and "ratio shared/independent" in text

    d = json.loads(out.read_text())
    for key in ("shared_s", "independent_s", "ratio", "epochs", "draws", "data", "n_train", "environment", "models"):
        assert key in d, key
    assert d["epochs"] == 1 and d["draws"] == 1 and d["data"] == "synthetic" and d["n_train"] == 200
    assert d["ratio"] == pytest.approx(d["shared_s"] / d["independent_s"])
    by_name = {m["name"]: m for m in d["models"]}
    assert [s["cached"] for s in by_name["cnn5"]["stages"]] == [False, False]
    assert [s["cached"] for s in by_name["cnn7"]["stages"]] == [True, True, False]  # CNN5's two stages
    for m in d["models"]:
        assert m["same_result_both_sweeps"]
        for s in m["stages"]:
            assert {"lr", "weight_decay", "time_s", "train_acc", "val_acc", "cached"} <= set(s)
    assert sorted(d["cached_stages"]) == ["cnn7:1", "cnn7:2"]
    assert [p.name for p in tmp_path.iterdir()] == ["paper.json"]


def test_cifar10_needs_a_path() -> None:
    with pytest.raises(UsageError, match="--path"):
        paper.load_data("cifar10", None, None, None, 0)


def test_interleaved_schedule_alternates_which_sweep_goes_first() -> None:
    modes = ("shared", "independent")
    assert paper.schedule(["a", "b"], modes, interleave=True) == [
        ("a", "shared"), ("a", "independent"), ("b", "independent"), ("b", "shared")]
    assert paper.schedule(["a", "b"], modes, interleave=False) == [
        ("a", "shared"), ("b", "shared"), ("a", "independent"), ("b", "independent")]


def test_stage_macs_match_the_architectures() -> None:
    cnn1, cnn6 = paper.stage_macs("cnn1", (3, 32, 32), 10, 32), paper.stage_macs("cnn6", (3, 32, 32), 10, 32)
    assert cnn6[0] == cnn1[0] == 32 * 32 * 32 * (3 * 9 + 32 * 9) + 32 * 16 * 16 * 10
    assert len(paper.stage_macs("cnn8", (3, 32, 32), 10, 32)) == 3


def test_search_and_halving_options_run_every_combination(tiny_data, tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    paper.add_arguments(parser)
    assert paper.runs_of(parser.parse_args([])) == [("2", "population", True)]
    assert paper.runs_of(parser.parse_args(["--no-halving", "--search", "sequential"])) == [("2", "sequential", False)]
    assert paper.runs_of(parser.parse_args(["--table", "both", "--search", "both", "--halving", "both"])) == [
        (t, s, h) for t in ("2", "3") for s in ("population", "sequential") for h in (True, False)]
    out = tmp_path / "paper.json"
    args = parser.parse_args(["--n", "200", "--n-val", "50", "--draws", "3", "--width", "4", "--models", "cnn2",
                              "--sweeps", "shared", "--search", "both", "--halving", "both", "--tmp", str(tmp_path),
                              "--json", str(out)])
    assert paper.run(args) == 0
    text = capsys.readouterr().out
    assert "population search" in text and "sequential search" in text
    assert "Sweep times by table, search and halving" in text
    d = json.loads(out.read_text())
    times = d["search_times"]
    assert [(r["search"], r["halving"]) for r in times] == [("population", "on"), ("population", "off"),
                                                            ("sequential", "on"), ("sequential", "off")]
    assert all(r["shared_s"] > 0 for r in times)
    for run in d["tables"]:
        stages = run["models"][0]["stages"]
        assert all(s["trials"] == 4 for s in stages)
    by = {(r["search"], r["halving"]): r for r in d["tables"]}
    for halving in (True, False):  # both modes train the same draws and choose the same ones
        pop, seq = by[("population", halving)]["models"][0], by[("sequential", halving)]["models"][0]
        assert [(s["lr"], s["weight_decay"]) for s in pop["stages"]] == [(s["lr"], s["weight_decay"])
                                                                         for s in seq["stages"]]
        assert [s["stage_key"] for s in pop["stages"]] == [s["stage_key"] for s in seq["stages"]]
