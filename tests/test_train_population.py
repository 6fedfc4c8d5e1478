"""Every search draw at once: the stacked optimizer equals torch.optim per member, a population's members equal
trials trained alone, and the population search equals the sequential one (winner, rungs, scores, failures)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import pystage
from pystage import FeatureStore, SearchConfig, TrainConfig
from pystage.data import synthetic
from pystage.optim import make_optimizer
from pystage.train.engine import CheckpointedChain, Cursor, Engine
from pystage.train.errors import FitArgumentError, NonFiniteError
from pystage.train.population import Population, population_members, population_peak
from pystage.train.search import resolve_mode, run_search
from pystage.train.sources import DatasetSource
from pystage.train.stacked_optim import StackedOptimizer

CPU = torch.device("cpu")
CLASSES = 4
OPTIMIZERS = [TrainConfig(optimizer="adam"), TrainConfig(optimizer="adamw"), TrainConfig(optimizer="sgd"),
              TrainConfig(optimizer="sgd", momentum=0.0)]
DRAWS = [(1e-3, 1e-4), (1e-2, 0.0), (3e-2, 1e-2)]  # (lr, weight_decay) per member; one member without L2


def configs(base: TrainConfig, draws=DRAWS) -> list[TrainConfig]:
    return [TrainConfig(optimizer=base.optimizer, momentum=base.momentum, lr=lr, weight_decay=wd)
            for lr, wd in draws]


def net(seed: int = 0) -> nn.Sequential:
    """Conv (no bias: BatchNorm follows) + BatchNorm + ReLU + pool + linear head: parameters and running stats."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, CLASSES))


def sources(n: int = 60, n_val: int = 40, batch: int = 10):
    shape = (3, 8, 8)
    train = synthetic(n=n, num_classes=CLASSES, shape=shape, seed=0, noise=0.3)
    val = synthetic(n=n_val, num_classes=CLASSES, shape=shape, seed=0, noise=0.3, split="val")
    return DatasetSource(train, batch, seed=3), DatasetSource(val, 20, shuffle=False)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


# -- the stacked optimizer -------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", OPTIMIZERS, ids=lambda c: f"{c.optimizer}-m{c.momentum}")
def test_stacked_optimizer_equals_torch_optim_per_member(base):
    cfgs = configs(base)
    torch.manual_seed(0)
    shapes = [(5, 3), (5,), (2, 3, 3, 3)]
    stacked = [torch.randn(len(cfgs), *s) for s in shapes]  # (n, ...) each
    singles = [[nn.Parameter(p[i].clone()) for p in stacked] for i in range(len(cfgs))]
    opt = StackedOptimizer(stacked, cfgs)
    torch_opts = [make_optimizer(ps, c) for ps, c in zip(singles, cfgs)]
    for _ in range(4):
        grads = [torch.randn_like(p) for p in stacked]
        grads[1] = None if _ == 2 else grads[1]  # a parameter without a gradient is skipped, as torch skips it
        opt.step(stacked, grads)
        for i, (ps, o) in enumerate(zip(singles, torch_opts)):
            for p, g in zip(ps, grads):
                p.grad = None if g is None else g[i].clone()
            o.step()
    for i, (ps, o) in enumerate(zip(singles, torch_opts)):
        for p, s in zip(ps, stacked):
            torch.testing.assert_close(s[i], p.detach(), rtol=1e-6, atol=1e-7)
        theirs, ours = o.state_dict()["state"], opt.member_state(i)
        assert sorted(theirs) == sorted(ours)
        for j in theirs:
            assert set(theirs[j]) == set(ours[j])
            for k, v in theirs[j].items():
                torch.testing.assert_close(ours[j][k].to(v.dtype), v, rtol=1e-6, atol=1e-7)


def test_stacked_optimizer_keeps_members_and_checks_configs():
    cfgs = configs(TrainConfig(optimizer="adam"))
    p = [torch.zeros(3, 2)]
    opt = StackedOptimizer(p, cfgs)
    opt.step(p, [torch.ones(3, 2)])
    opt.keep(torch.tensor([2, 0]))
    assert opt.members == 2 and opt.lr.tolist() == [3e-2, 1e-3] and opt.state[0]["exp_avg"].shape == (2, 2)
    with pytest.raises(ValueError, match="same optimizer and momentum"):
        StackedOptimizer(p, [TrainConfig(optimizer="adam"), TrainConfig(optimizer="sgd")])


# -- a population's members are trials trained alone -----------------------------------------------------------

@pytest.mark.parametrize("forward", ["loop", "vmap"])
@pytest.mark.parametrize("base", OPTIMIZERS[:3], ids=lambda c: c.optimizer)
def test_members_equal_trials_trained_alone(forward, base):
    src, val = sources()
    cfgs = configs(base)
    pop = Population(Engine(net(), cfgs[0], CPU), cfgs, forward=forward)
    cursor = Cursor()
    results = pop.run(src, 8, cursor)  # 6 batches per epoch: crosses into the second epoch
    accs = pop.evaluate(val)
    assert (cursor.epoch, cursor.steps, cursor.batch) == (1, 8, 2)
    for i, cfg in enumerate(cfgs):
        alone = net()
        engine = Engine(alone, cfg, CPU)
        stats = engine.run(src, 8, Cursor())
        for k, p in alone.named_parameters():
            close(pop.params[k][i], p.detach())
        for k, b in alone.named_buffers():
            close(pop.buffers[k][i], b)
        assert results[i].failed is None
        assert results[i].stats.seen == stats.seen == 80 and results[i].stats.correct == stats.correct
        assert results[i].stats.loss == pytest.approx(stats.loss, rel=1e-5)
        assert accs[i] == pytest.approx(engine.evaluate(val), abs=1e-9)


@pytest.mark.parametrize("forward", ["loop", "vmap"])
def test_regression_members_equal_trials_trained_alone(forward):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(60, 5, generator=gen), torch.randn(5, 2, generator=gen)
    data = torch.utils.data.TensorDataset(x, x @ w)
    src, val = DatasetSource(data, 10, seed=1), DatasetSource(data, 30, shuffle=False)
    cfgs = configs(TrainConfig(optimizer="sgd"))
    torch.manual_seed(0)
    start = nn.Linear(5, 2)
    pop = Population(Engine(copy.deepcopy(start), cfgs[0], CPU, loss="mse"), cfgs, forward=forward)
    results, errors = pop.run(src, 7, Cursor()), pop.evaluate(val)
    for i, cfg in enumerate(cfgs):
        alone = Engine(copy.deepcopy(start), cfg, CPU, loss="mse")
        stats = alone.run(src, 7, Cursor())
        close(pop.params["weight"][i], alone.module.weight.detach())
        assert results[i].stats.loss == pytest.approx(stats.loss, rel=1e-5) and results[i].stats.correct == 0
        assert errors[i] == pytest.approx(alone.evaluate(val), rel=1e-5)


def test_pruning_cuts_members_out_and_the_winner_goes_into_the_module():
    src, _ = sources()
    cfgs = configs(TrainConfig(optimizer="adam"))
    module = net()
    engine = Engine(module, cfgs[0], CPU)
    pop = Population(engine, cfgs, forward="loop")
    pop.run(src, 3, Cursor())
    before = {k: p[2].clone() for k, p in pop.params.items()}
    pop.keep([2, 0])
    assert pop.n == 2 and all(p.shape[0] == 2 for p in [*pop.params.values(), *pop.buffers.values()])
    assert all(torch.equal(pop.params[k][0], v) for k, v in before.items())
    pop.load_member(0, cfgs[2])
    for k, p in module.named_parameters():
        assert torch.equal(p.detach(), before[k])
    assert engine.config == cfgs[2] and engine.optimizer.param_groups[0]["lr"] == 3e-2
    state = engine.optimizer.state_dict()["state"]
    assert len(state) == len(before) and float(state[0]["step"]) == 3


def test_vmap_error_names_what_vmap_cannot_run():
    src, _ = sources()
    x, _ = next(iter(src.batches(0)))
    cfgs = configs(TrainConfig())
    assert Population(Engine(net(), cfgs[0], CPU), cfgs).vmap_error(x) is None
    random = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(3 * 8 * 8, CLASSES))
    why = Population(Engine(random, cfgs[0], CPU), cfgs).vmap_error(x)
    assert why is not None and "random" in why.lower()


def test_population_memory_multiplier():
    assert population_peak(state_bytes=100, activation_bytes=1000, batch_bytes=10, members=11) == 10 + 1100 + 11000
    assert population_peak(100, 1000, 10, 11, forward="loop") == 10 + 1100 + 1000
    assert population_members(10, "population") == population_members(10, "auto") == 11
    assert population_members(10, "sequential") == 1
    with pytest.raises(ValueError, match="forward"):
        population_peak(1, 1, 1, 2, forward="grouped")


@pytest.mark.parametrize("forward", ["loop", "vmap"])
def test_measured_population_step_matches_the_memory_multiplier(forward):
    src, _ = sources()
    cfgs = configs(TrainConfig()) * 3  # 9 members
    x, y = next(iter(src.batches(0)))
    one = Engine(net(), cfgs[0], CPU)
    one.run(src, 1, Cursor())  # optimizer state exists, as at the measured step
    *_, single = one.measured_step(x, y, len(y))
    state = 4 * sum(p.nbytes for p in one.module.parameters()) + sum(b.nbytes for b in one.module.buffers())
    batch = x.nbytes + y.nbytes  # params, grads, Adam's two moments; buffers
    pop = Population(Engine(net(), cfgs[0], CPU), cfgs, forward=forward)
    pop.run(src, 1, Cursor())
    *_, peak = pop.measured_step(x, y)
    predicted = population_peak(state, single - batch - state, batch, len(cfgs), forward)
    # vmap copies the first layer's output (its input is shared, its weights batched): on this tiny net that copy
    # is a larger share than on the zoo's stages (1.00-1.20x, docs/search.md)
    assert 0.8 < peak / predicted < (1.25 if forward == "loop" else 1.5), (peak, predicted)


# -- the population search equals the sequential one ------------------------------------------------------------

@pytest.mark.parametrize("forward", ["loop", "vmap"])
@pytest.mark.parametrize("halving", [True, False])
def test_population_search_equals_sequential_search(forward, halving):
    src, val = sources()
    cfgs = [TrainConfig(lr=lr, weight_decay=wd) for lr, wd in [(1e-3, 1e-4), (3e-2, 0.0), (1e-4, 1e-3), (1e-2, 1e-2),
                                                              (3e-3, 1e-4)]]
    runs = {}
    for mode in ("sequential", "population"):
        module = net()
        engine = Engine(module, cfgs[0], CPU)
        best, summary = run_search(engine, cfgs, src, val, epochs=2, halving=halving, eta=2, mode=mode,
                                   forward=forward)
        runs[mode] = (module, engine, best, summary)
    (m_s, e_s, b_s, s_s), (m_p, e_p, b_p, s_p) = runs["sequential"], runs["population"]
    assert [t["mode"] for t in s_s] == ["sequential"] * 5 and [t["mode"] for t in s_p] == ["population"] * 5
    assert [t["steps"] for t in s_p] == [t["steps"] for t in s_s]  # the same rungs and survivors
    for a, b in zip(s_s, s_p):
        assert (a["lr"], a["weight_decay"]) == (b["lr"], b["weight_decay"])
        assert b["val_acc"] == pytest.approx(a["val_acc"], abs=1e-9)
        assert b["train_acc"] == pytest.approx(a["train_acc"], abs=1e-9)
    assert b_p.config == b_s.config and b_p.cursor == b_s.cursor
    for (k, a), b in zip(m_s.state_dict().items(), m_p.state_dict().values()):  # the winner's weights and stats
        close(b, a)
    theirs, ours = e_s.optimizer.state_dict()["state"], e_p.optimizer.state_dict()["state"]
    for j in theirs:  # and its optimizer state, ready to continue
        for k in theirs[j]:
            close(ours[j][k], theirs[j][k])


def test_a_diverging_member_is_ranked_last_as_in_the_sequential_search():
    src, val = sources()
    sgd = dict(optimizer="sgd", momentum=0.0)
    cfgs = [TrainConfig(lr=lr, **sgd) for lr in (0.05, 1e30, 0.01, 0.1)]  # 1e30 overflows at its first steps
    out = {}
    for mode in ("sequential", "population"):
        best, summary = run_search(Engine(net(), cfgs[0], CPU), cfgs, src, val, epochs=2, halving=True, eta=2,
                                   mode=mode)
        out[mode] = best, summary
    (b_s, s_s), (b_p, s_p) = out["sequential"], out["population"]
    assert "error" in s_s[1] and s_s[1]["error"] == s_p[1]["error"] and s_p[1]["val_acc"] is None
    assert [t["steps"] for t in s_p] == [t["steps"] for t in s_s]
    assert b_p.config == b_s.config != cfgs[1]


def test_every_member_failing_stops_the_stage_with_the_first_failure():
    src, val = sources()
    cfgs = [TrainConfig(lr=lr, optimizer="sgd", momentum=0.0) for lr in (1e30, 1e31)]
    errors = {}
    for mode in ("sequential", "population"):
        with pytest.raises(NonFiniteError) as info:
            run_search(Engine(net(), cfgs[0], CPU, stage="2"), cfgs, src, val, 1, True, 2, mode=mode)
        errors[mode] = info.value
    assert str(errors["population"]) == str(errors["sequential"])
    assert errors["population"].stage == "2" and errors["population"].step >= 1


# -- which mode runs ---------------------------------------------------------------------------------------------

def test_auto_falls_back_to_sequential_where_a_population_does_not_apply():
    cfgs = configs(TrainConfig())
    plain = Engine(net(), cfgs[0], CPU)
    assert resolve_mode("auto", plain, cfgs) == "population"
    assert resolve_mode("auto", plain, cfgs[:1]) == "sequential"  # one trial
    assert resolve_mode("auto", plain, cfgs, under_budget=True) == "sequential"  # planned for one trial
    assert resolve_mode("population", plain, cfgs, under_budget=True) == "population"
    assert resolve_mode("sequential", plain, cfgs) == "sequential"
    mixed = [cfgs[0], TrainConfig(optimizer="sgd")]
    assert resolve_mode("auto", plain, mixed) == "sequential"
    checkpointed = Engine(nn.Sequential(CheckpointedChain([net()])), cfgs[0], CPU)
    assert resolve_mode("auto", checkpointed, cfgs) == "sequential"
    with pytest.raises(FitArgumentError, match="SearchConfig.mode: got 'population'.*checkpoint"):
        resolve_mode("population", checkpointed, cfgs)
    ddp = Engine(net(), cfgs[0], CPU)
    ddp.ddp = True  # what a stage under DistributedDataParallel looks like to the search
    assert resolve_mode("auto", ddp, cfgs) == "sequential"
    with pytest.raises(FitArgumentError, match="DistributedDataParallel"):
        resolve_mode("population", ddp, cfgs)


def test_search_config_mode_is_checked():
    assert SearchConfig().mode == "auto"
    with pytest.raises(FitArgumentError, match="SearchConfig.mode: got 'batched'"):
        SearchConfig(mode="batched")


def fit(tmp_path, method: str, mode: str):
    shape = (3, 16, 16)
    train = synthetic(n=200, num_classes=CLASSES, shape=shape, seed=0, noise=0.3)
    val = synthetic(n=60, num_classes=CLASSES, shape=shape, seed=0, noise=0.3, split="val")
    torch.manual_seed(0)
    model = pystage.models.get("cnn2", num_classes=CLASSES, width=8)
    return pystage.fit(model, train, val, method=method, search=SearchConfig(draws=3, lr=3e-3, mode=mode), epochs=2,
                       store=FeatureStore(tmp_path / "store"), checkpoint_dir=tmp_path / "stages", progress=False)


def test_fit_population_and_sequential_pick_the_same_trials(tmp_path):
    pop, seq = fit(tmp_path / "p", "partial", "population"), fit(tmp_path / "s", "partial", "sequential")
    for a, b in zip(pop.report.stages, seq.report.stages):
        assert [t["mode"] for t in a.search] == ["population"] * 4 and [t["mode"] for t in b.search] == ["sequential"] * 4
        assert (a.lr, a.weight_decay) == (b.lr, b.weight_decay)
        assert [t["steps"] for t in a.search] == [t["steps"] for t in b.search]
        assert [t["val_acc"] for t in a.search] == pytest.approx([t["val_acc"] for t in b.search], abs=0.02)
    for (k, a), b in zip(pop.model.state_dict().items(), seq.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    again = fit(tmp_path / "s", "partial", "population")  # the mode is not part of a stage's key
    assert [s.cached for s in again.report.stages] == [True, True]


def test_fit_checkpoint_method_searches_sequentially(tmp_path):
    rep = fit(tmp_path, "checkpoint", "auto").report
    assert [t["mode"] for t in rep.stages[0].search] == ["sequential"] * 4
    with pytest.raises(FitArgumentError, match="SearchConfig.mode"):
        fit(tmp_path / "again", "checkpoint", "population")
    assert math.isfinite(rep.val_acc)
