"""pystage.plan: split points under a memory budget (dynamic programming) and the largest batch that fits."""
from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from pystage.memory import profile
from pystage.plan import (Plan, PlanError, boundaries, choose_splits, max_batch_size, min_feasible_budget, plan,
                          plan_profile)
from pystage.units import format_bytes


def net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # 0-2
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),                     # 3-4
        nn.MaxPool2d(2),                                              # 5
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),                    # 6-7
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),                   # 8-9
        nn.MaxPool2d(2),                                              # 10
    )


SHAPE, BATCH = (3, 8, 8), 4


@pytest.fixture(scope="module")
def prof():
    return profile(net(), SHAPE, BATCH)


def brute_force(nodes, cost, budget, disk=None, disk_budget=None):
    """Every split set over ``nodes``: the best (stages, peak, disk) key, or None."""
    disk = disk or (lambda b: 0)
    best = None
    inner = nodes[1:-1]
    for r in range(len(inner) + 1):
        for splits in itertools.combinations(inner, r):
            bounds = (nodes[0], *splits, nodes[-1])
            costs = [cost(a, b) for a, b in zip(bounds, bounds[1:])]
            d = sum(disk(s) for s in splits)
            if max(costs) > budget or (disk_budget is not None and d > disk_budget):
                continue
            key = (len(costs), max(costs), d)
            best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize("seed", range(40))
def test_choose_splits_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    nodes = sorted(rng.sample(range(1, 12), rng.randint(0, 7)))
    nodes = [0, *nodes, 12]
    table = {(a, b): rng.randint(1, 100) + 8 * (b - a) for a in nodes for b in nodes if a < b}
    row = {n: rng.randint(1, 50) for n in nodes}
    budget = rng.randint(20, 120)
    disk_budget = rng.choice([None, rng.randint(0, 150)])
    found = choose_splits(nodes, lambda a, b: table[a, b], budget, row.__getitem__, disk_budget)
    expected = brute_force(nodes, lambda a, b: table[a, b], budget, row.__getitem__, disk_budget)
    if expected is None:
        assert found is None
        return
    splits, peak, d = found
    bounds = (0, *splits, 12)
    assert set(splits) <= set(nodes) and list(splits) == sorted(splits)
    assert peak == max(table[a, b] for a, b in zip(bounds, bounds[1:])) and d == sum(row[s] for s in splits)
    assert (len(splits) + 1, peak, d) == expected


@pytest.mark.parametrize("seed", range(20))
def test_min_feasible_budget_against_brute_force(seed):
    rng = random.Random(100 + seed)
    nodes = [0, *sorted(rng.sample(range(1, 10), rng.randint(0, 6))), 10]
    table = {(a, b): rng.randint(1, 100) for a in nodes for b in nodes if a < b}
    need, (a, b) = min_feasible_budget(nodes, lambda a, b: table[a, b])
    best = min(max(table[x, y] for x, y in zip(bounds, bounds[1:]))
               for r in range(len(nodes) - 1) for s in itertools.combinations(nodes[1:-1], r)
               for bounds in [(0, *s, 10)])
    assert need == best and table[a, b] == need
    assert choose_splits(nodes, lambda a, b: table[a, b], need) is not None
    assert choose_splits(nodes, lambda a, b: table[a, b], need - 1) is None


@pytest.mark.parametrize("seed", range(40))
def test_lower_bounds_change_which_stages_run_not_the_answer(seed):
    rng = random.Random(200 + seed)
    nodes = [0, *sorted(rng.sample(range(1, 12), rng.randint(0, 7))), 12]
    table = {(a, b): rng.randint(1, 100) + 8 * (b - a) for a in nodes for b in nodes if a < b}
    lower = {k: int(v * rng.random()) for k, v in table.items()}
    row = {n: rng.randint(1, 50) for n in nodes}
    budget, disk_budget = rng.randint(20, 120), rng.choice([None, rng.randint(0, 150)])
    ran: list[tuple[int, int]] = []

    def cost(a, b):
        ran.append((a, b))
        return table[a, b]

    found = choose_splits(nodes, cost, budget, row.__getitem__, disk_budget, lambda a, b: lower[a, b])
    assert found == choose_splits(nodes, lambda a, b: table[a, b], budget, row.__getitem__, disk_budget)
    assert all(lower[k] <= budget for k in ran) and len(set(ran)) == len(ran)
    need = min_feasible_budget(nodes, lambda a, b: table[a, b])
    assert min_feasible_budget(nodes, lambda a, b: table[a, b], lambda a, b: lower[a, b])[0] == need[0]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_profile_lower_bound_is_below_every_stage_peak(device):
    prof = profile(net(), SHAPE, BATCH, device=device)
    nodes = boundaries(prof.model)
    for a, b in itertools.combinations(nodes, 2):
        lb = prof.lower_bound(a, b)
        assert 0 < lb <= prof.stage_peak(a, b), (a, b)
        assert all(lb <= prof.lower_bound(a, c) for c in nodes if c > b)  # grows with the stage


def test_planner_runs_only_the_stages_that_may_fit():
    models = pytest.importorskip("pystage.models")
    model = models.get("plain-8-8", input_size=16)
    prof = profile(model, (3, 16, 16), 8)
    nodes = boundaries(model)
    table = {(a, b): prof.stage_peak(a, b) for a, b in itertools.combinations(nodes, 2)}
    full = lambda a, b: table[a, b]  # noqa: E731
    budget = min_feasible_budget(nodes, full)[0] + (1 << 20)
    fresh = profile(model, (3, 16, 16), 8)
    p = plan_profile(fresh, budget)
    assert (len(p.stages), p.max_peak) == brute_force(nodes, full, budget)[:2]
    assert list(p.split_points) == list(choose_splits(nodes, full, budget)[0])  # the same plan
    assert len(fresh._cache) < len(table) // 3  # most candidate stages never ran


def test_boundaries_follow_the_split_rule():
    assert boundaries(net()) == [0, 3, 5, 6, 8, 10, 11]  # after ReLU / pool; never after a conv or BatchNorm
    assert boundaries(net(), lambda layer: isinstance(layer, nn.MaxPool2d)) == [0, 6, 11]


def test_plan_fits_budget_with_fewest_stages(prof):
    total = prof.total().peak
    nodes = boundaries(prof.model)
    need, _ = min_feasible_budget(nodes, prof.stage_peak)
    assert need < total  # splitting helps on this net
    for budget in (total, (need + total) // 2, need):
        p = plan_profile(prof, budget)
        assert isinstance(p, Plan) and p.budget == budget and p.total_predicted_bytes == total
        assert all(s.peak <= budget for s in p.stages) and set(p.split_points) <= set(nodes)
        assert [s.start for s in p.stages] == [0, *p.split_points]
        assert p.stages[-1].stop == len(prof.model)
        assert all(s.peak == prof.stage_peak(s.start, s.stop) for s in p.stages)
        best = brute_force(nodes, prof.stage_peak, budget)
        assert (len(p.stages), p.max_peak) == best[:2]
    assert plan_profile(prof, total).split_points == ()


def test_plan_entry_point_and_table():
    p = plan(net(), SHAPE, BATCH, "64MiB", optimizer="sgd", num_classes=5)
    assert p.split_points == () and p.batch_size == BATCH and p.budget == 64 << 20
    text = str(p)
    assert "split_points=[]" in text and format_bytes(p.stages[0].peak) in text and "MaxPool2d" in text


def test_plan_error_names_smallest_budget_and_layer(prof):
    need, (a, b) = min_feasible_budget(boundaries(prof.model), prof.stage_peak)
    with pytest.raises(PlanError) as err:
        plan_profile(prof, need - 1)
    e = err.value
    assert isinstance(e, ValueError)
    assert e.budget == need - 1 and e.min_feasible == need and e.stage == (a, b) and a <= e.layer < b
    assert format_bytes(need) in str(e) and str(need) in str(e)
    assert f"{e.layer}: {prof.layers[e.layer].name}" in str(e)
    plan_profile(prof, need)  # the budget it names is enough


def test_disk_budget(prof):
    rows, total = 1000, prof.total().peak
    budget = min_feasible_budget(boundaries(prof.model), prof.stage_peak)[0]
    free = plan_profile(prof, budget, dataset_rows=rows)
    assert free.store_bytes == sum(rows * r for r in free.store_row_bytes) > 0
    assert [s.store_bytes for s in free.stages][-1] is None
    capped = plan_profile(prof, budget, dataset_rows=rows, disk_budget=free.store_bytes)
    assert capped.store_bytes <= free.store_bytes
    with pytest.raises(PlanError) as err:
        plan_profile(prof, budget, dataset_rows=rows, disk_budget=1)
    assert err.value.min_disk is not None and err.value.min_disk > 1 and err.value.disk_budget == 1
    assert plan_profile(prof, total, dataset_rows=rows, disk_budget=0).split_points == ()
    with pytest.raises(ValueError):
        plan_profile(prof, total, disk_budget="1GiB")  # no dataset_rows


def test_max_batch_size_is_the_largest_that_fits():
    model, budget = net(), 3 << 20
    kw = dict(optimizer="sgd", split_after=lambda layer: isinstance(layer, nn.MaxPool2d))  # 3 candidate stages
    n = max_batch_size(model, SHAPE, budget, **kw)
    assert n > 1
    plan(model, SHAPE, n, budget, **kw)
    with pytest.raises(PlanError):
        plan(model, SHAPE, n + 1, budget, **kw)
    assert plan(model, SHAPE, "max", budget, **kw).batch_size == n
    assert max_batch_size(model, SHAPE, budget, limit=5, **kw) == min(5, n)
    with pytest.raises(PlanError):
        max_batch_size(model, SHAPE, 1024, **kw)


def test_bad_arguments(prof):
    with pytest.raises(ValueError):
        plan_profile(prof, "lots")
    with pytest.raises(ValueError):
        plan(net(), SHAPE, "some", "1GiB")
    with pytest.raises(ValueError):
        plan(net(), SHAPE, 4, "1GiB", optimizer="lbfgs")


def test_plan_for_model_zoo():
    models = pytest.importorskip("pystage.models")
    model = models.get("cnn4")
    p = plan(model, (3, 16, 16), 8, "64MiB", dtype=torch.float32)
    assert all(s.peak <= p.budget for s in p.stages)
