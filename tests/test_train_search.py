"""Per-stage hyper-parameter search: draws, successive-halving budgets, the chosen trial, and the step loop that
stops and continues trials."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pystage
from pystage import FeatureStore, SearchConfig, TrainConfig, models
from pystage.data import synthetic
from pystage.train.engine import Cursor, Engine
from pystage.train.errors import FitArgumentError
from pystage.train.search import draw_configs, rung_budgets, run_search
from pystage.train.sources import DatasetSource

SGD = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0)


def engine(net: nn.Module, config: TrainConfig = SGD) -> Engine:
    return Engine(net, config, torch.device("cpu"))

SHAPE = (3, 16, 16)
CLASSES = 4


def task(n: int = 300, n_val: int = 100):
    kw = dict(num_classes=CLASSES, shape=SHAPE, seed=0, noise=0.3)
    return synthetic(n=n, **kw), synthetic(n=n_val, split="val", **kw)


def model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return models.get("cnn2", num_classes=CLASSES, width=8)


def fit(train, val, tmp_path, **kw):
    return pystage.fit(model(), train, val, store=FeatureStore(tmp_path / "store"), checkpoint_dir=tmp_path / "stages",
                       progress=False, **kw)


# -- draws -------------------------------------------------------------------------------------------------------

def test_draw_configs_start_point_first_then_deterministic_draws():
    base = TrainConfig(lr=0.5, weight_decay=0.25, optimizer="sgd", momentum=0.8)
    search = SearchConfig(draws=5, lr=2e-3, weight_decay=3e-4, sigma=1.0, seed=7)
    configs = draw_configs(search, base, salt="k")
    assert len(configs) == 6
    assert configs[0] == TrainConfig(lr=2e-3, weight_decay=3e-4, optimizer="sgd", momentum=0.8)
    assert all(c.optimizer == "sgd" and c.momentum == 0.8 for c in configs)  # only lr and L2 are searched
    assert len({(c.lr, c.weight_decay) for c in configs}) == 6
    assert all(c.lr > 0 and c.weight_decay > 0 for c in configs)
    assert draw_configs(search, base, salt="k") == configs
    assert draw_configs(search, base, salt="other")[1:] != configs[1:]
    assert draw_configs(SearchConfig(draws=5, lr=2e-3, weight_decay=3e-4, seed=8), base, salt="k")[1:] != configs[1:]
    # sigma scales the base-10 exponent: sigma=0 draws the start point again
    flat = draw_configs(SearchConfig(draws=3, lr=2e-3, weight_decay=3e-4, sigma=0.0), base)
    assert all((c.lr, c.weight_decay) == (2e-3, 3e-4) for c in flat)
    assert draw_configs(SearchConfig(draws=0), base) == [TrainConfig(lr=1e-3, weight_decay=1e-4, optimizer="sgd",
                                                                     momentum=0.8)]


def test_draws_spread_on_a_log_scale():
    configs = draw_configs(SearchConfig(draws=400, lr=1e-3, sigma=1.0), TrainConfig())[1:]
    z = torch.tensor([math.log10(c.lr / 1e-3) for c in configs])
    assert abs(z.mean().item()) < 0.2 and 0.8 < z.std().item() < 1.2


@pytest.mark.parametrize("kw", [{"draws": -1}, {"eta": 1}, {"sigma": -0.5}, {"draws": 2.5}, {"draws": True},
                                {"eta": 2.0}, {"lr": 0}, {"lr": float("nan")}, {"weight_decay": -1e-4},
                                {"halving": "yes"}, {"seed": "0"}])
def test_search_config_checks_its_values(kw):
    name, value = next(iter(kw.items()))
    with pytest.raises(FitArgumentError, match=f"SearchConfig.{name}: got {value!r}, expected") as info:
        SearchConfig(**kw)
    assert info.value.name == f"SearchConfig.{name}" and isinstance(info.value, ValueError)


# -- successive halving budgets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n, total, eta, expected", [
    (1, 100, 2, [(100, 1)]),
    (2, 100, 2, [(100, 1)]),
    (3, 100, 2, [(50, 2), (100, 1)]),
    (4, 100, 2, [(50, 2), (100, 1)]),
    (5, 80, 2, [(20, 3), (40, 2), (80, 1)]),
    (11, 80, 2, [(10, 6), (20, 3), (40, 2), (80, 1)]),
    (9, 90, 3, [(30, 3), (90, 1)]),
    (27, 270, 3, [(30, 9), (90, 3), (270, 1)]),
    (125, 1000, 5, [(40, 25), (200, 5), (1000, 1)]),  # log(125, 5) is 3.0000000000000004 in floats
    (8, 3, 2, [(1, 4), (2, 2), (3, 1)]),  # fewer steps than rungs: every rung still trains >= 1 step
])
def test_rung_budgets(n, total, eta, expected):
    rungs = rung_budgets(n, total, eta)
    assert rungs == expected
    assert rungs[-1] == (total, 1)  # the winner trains every step
    reach = [r for r, _ in rungs]
    keep = [k for _, k in rungs]
    assert reach == sorted(reach) and keep == sorted(keep, reverse=True)
    assert len(rungs) == 1 or eta ** (len(rungs) - 1) < n <= eta ** len(rungs)  # ceil(log_eta(n)) rungs


# -- the step loop stops and continues ---------------------------------------------------------------------------

class Spy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3 * 4 * 4, CLASSES)
        self.rows: list[torch.Tensor] = []

    def forward(self, x):
        self.rows.append(x[:, 0, 0, 0].clone())
        return self.lin(x.flatten(1))


def test_engine_run_continues_a_stopped_epoch_where_it_stopped():
    data = synthetic(n=100, num_classes=CLASSES, shape=(3, 4, 4))
    src = DatasetSource(data, 10, seed=3)  # 10 batches per epoch
    torch.manual_seed(0)
    whole = Spy()
    parts = Spy()
    parts.load_state_dict(whole.state_dict())
    c_whole, c_parts = Cursor(), Cursor()
    e_whole, e_parts = engine(whole), engine(parts)
    e_whole.run(src, 25, c_whole)
    for n in (3, 7, 4, 11):  # halving-style budgets that end mid-epoch
        e_parts.run(src, n, c_parts)
    assert c_parts.steps == c_whole.steps == 25
    assert (c_parts.epoch, c_parts.batch) == (c_whole.epoch, c_whole.batch) == (2, 5)
    seen_w, seen_p = torch.cat(whole.rows), torch.cat(parts.rows)
    assert torch.equal(seen_p, seen_w)  # the same samples in the same order
    assert len(torch.unique(seen_w[:100])) == 100  # the first epoch saw every sample once
    for a, b in zip(whole.parameters(), parts.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_engine_run_whole_epochs():
    data = synthetic(n=45, num_classes=CLASSES, shape=(3, 4, 4))
    net = Spy()
    cursor = Cursor()
    stats = engine(net).run(DatasetSource(data, 10), None, cursor)
    assert (cursor.epoch, cursor.steps, cursor.batch) == (1, 5, 0)
    assert stats.seen == 45 and 0 <= stats.accuracy <= 1 and stats.loss > 0
    engine(net).run(DatasetSource(data, 10), 12, cursor)
    assert (cursor.epoch, cursor.steps, cursor.batch) == (3, 17, 2)


def test_run_search_trains_survivors_to_the_full_budget():
    data = synthetic(n=60, num_classes=CLASSES, shape=(3, 4, 4))
    val = synthetic(n=40, num_classes=CLASSES, shape=(3, 4, 4), split="val")
    src, val_src = DatasetSource(data, 10), DatasetSource(val, 20, shuffle=False)
    configs = [TrainConfig(lr=lr) for lr in (1e-3, 1e-2, 1e-1, 1e-4, 3e-2)]
    torch.manual_seed(0)
    start = Spy()

    def make():
        net = Spy()
        net.load_state_dict(start.state_dict())
        return net

    searched = make()
    best, summary = run_search(engine(searched), configs, src, val_src, epochs=2, halving=True, eta=2)
    assert [s["lr"] for s in summary] == [c.lr for c in configs]
    # rungs (3, 3), (6, 2), (12, 1): 5 trials train 3 steps, 3 go on to 6, 2 to 12, the better of those wins
    assert sorted(s["steps"] for s in summary) == [3, 3, 6, 12, 12]
    finalists = [s for s in summary if s["steps"] == 12]
    assert best.cursor.steps == 12 and best.val_acc == max(s["val_acc"] for s in finalists)
    assert best.config.lr in [s["lr"] for s in finalists]
    # the winner equals an uninterrupted run of its configuration over the same 12 steps
    ref = make()
    engine(ref, best.config).run(src, 12, Cursor())
    for a, b in zip(ref.lin.parameters(), searched.lin.parameters()):  # the module holds the winner's weights
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    plain, plain_summary = run_search(engine(make()), configs, src, val_src, 2, halving=False, eta=2)
    assert [s["steps"] for s in plain_summary] == [12] * 5
    assert plain.val_acc == max(s["val_acc"] for s in plain_summary)


# -- search inside fit ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["partial", "total"])
def test_fit_with_search_reports_every_trial_and_keeps_the_best(method, tmp_path):
    train, val = task()
    search = SearchConfig(draws=3, halving=True, lr=3e-3, seed=1)
    rep = fit(train, val, tmp_path, method=method, search=search, epochs=2).report
    assert len(rep.stages) == (2 if method == "partial" else 1)
    for s in rep.stages:
        assert s.trials == 4 == len(s.search)
        expected = draw_configs(search, TrainConfig(), salt=s.stage_key)
        assert [(t["lr"], t["weight_decay"]) for t in s.search] == [(c.lr, c.weight_decay) for c in expected]
        total = 2 * math.ceil(len(train) / 50)
        # 4 trials: rungs (total/2, keep 2), (total, keep 1)
        assert sorted(t["steps"] for t in s.search) == [total // 2] * 2 + [total] * 2
        finalists = [t for t in s.search if t["steps"] == total]
        assert s.val_acc == max(t["val_acc"] for t in finalists)
        assert {"lr": s.lr, "weight_decay": s.weight_decay, "val_acc": s.val_acc} in [
            {k: t[k] for k in ("lr", "weight_decay", "val_acc")} for t in finalists]
        pruned = [t for t in s.search if t["steps"] == total // 2]
        assert all(0 <= t["val_acc"] <= 1 for t in s.search) and len(pruned) == 2
    assert rep.val_acc > 0.4  # chance is 25%


@pytest.mark.parametrize("halving", [True, False])
def test_a_searched_stage_reports_the_memory_its_search_step_took(tmp_path, halving):
    """The measured step (the population's, or the first trial's one at a time) is the stage's training memory,
    whichever trial wins and however many rungs the search ran."""
    train, val = task()
    peaks = {}
    for mode in ("population", "sequential"):
        search = SearchConfig(draws=3, halving=halving, lr=3e-3, seed=1, mode=mode)
        rep = fit(train, val, tmp_path / mode, method="partial", search=search, epochs=1).report
        peaks[mode] = [s.measured_peak_mib for s in rep.stages]
        assert all(p is not None and p > 0 for p in peaks[mode]), peaks
    assert all(p > q for p, q in zip(peaks["population"], peaks["sequential"]))  # 4 members' state at once


def test_search_is_deterministic_and_its_winner_is_cached(tmp_path):
    train, val = task(n=200)
    search = SearchConfig(draws=3, halving=True, lr=3e-3)
    a = fit(train, val, tmp_path / "a", method="partial", search=search)
    b = fit(train, val, tmp_path / "b", method="partial", search=search)
    assert [s.search for s in a.report.stages] == [s.search for s in b.report.stages]
    for k, v in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k
    c = fit(train, val, tmp_path / "a", method="partial", search=search)
    assert [s.cached for s in c.report.stages] == [True, True]
    assert [s.search for s in c.report.stages] == [s.search for s in a.report.stages]
    other = fit(train, val, tmp_path / "a", method="partial", search=SearchConfig(draws=3, lr=3e-3, seed=5))
    assert not other.report.stages[0].cached  # the search is part of the key
    assert other.report.stages[0].search != a.report.stages[0].search


def test_search_without_val_splits_the_training_set(tmp_path):
    train, _ = task(n=200)
    rep = fit(train, None, tmp_path, method="partial", search=SearchConfig(draws=1, lr=3e-3)).report
    assert all(s.val_acc is not None and 0 <= s.val_acc <= 1 for s in rep.stages)
    assert all(s.trials == 2 for s in rep.stages)
    entries = FeatureStore(tmp_path / "store").ls()
    assert sorted(e.num_rows for e in entries) == [20, 180]  # 10% held out for validation


def test_search_keeps_only_live_trials(monkeypatch):
    """Every trial trains in the engine's one module (nothing is deep-copied); a paused trial's weights and optimizer
    wait in host memory and a pruned trial's are dropped at once."""
    import copy
    import gc
    import weakref

    from pystage.train import search

    data = synthetic(n=60, num_classes=CLASSES, shape=(3, 4, 4))
    src = DatasetSource(data, 10)
    net = Spy()
    params = [id(p) for p in net.parameters()]
    saved: list[weakref.ref] = []
    live_at_train: list[int] = []

    class State(dict):  # a dict that can be watched
        pass

    real_save, real_train = search._save, search._train
    monkeypatch.setattr(search, "_save", lambda engine: saved.append(weakref.ref(s := State(real_save(engine)))) or s)

    def train(*a, **kw):
        gc.collect()
        live_at_train.append(sum(r() is not None for r in saved))
        return real_train(*a, **kw)

    monkeypatch.setattr(search, "_train", train)
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **kw: pytest.fail("the search deep-copied something"))
    configs = [TrainConfig(lr=lr) for lr in (1e-3, 1e-2, 1e-1, 1e-4, 3e-2)]
    best, summary = run_search(engine(net, configs[0]), configs, src, None, epochs=2, halving=True, eta=2)
    # rungs (3 steps, keep 3), (6, keep 2), (12, keep 1): 5 + 3 + 2 trainings
    assert len(live_at_train) == 10
    assert max(live_at_train[5:8]) <= 3 and max(live_at_train[8:]) <= 2  # pruned trials hold nothing
    gc.collect()
    assert all(r() is None for r in saved) and best.state is None  # the winner lives in the module only
    assert [id(p) for p in net.parameters()] == params
