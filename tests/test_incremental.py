"""Incremental training: the angle criterion, look-ahead through the feature store, the public API."""
from __future__ import annotations

import math

import pytest
import torch

import pystage
from pystage import models
from pystage.data import synthetic
from pystage.store import FeatureStore
from pystage.train import TrainConfig
from pystage.train.incremental import (AngleCriterion, GrowthConfigError, GrowthReport, IncrementalConfig,
                                       window_angle)

SHAPE, CLASSES = (3, 8, 8), 3


def task():
    kw = dict(num_classes=CLASSES, shape=SHAPE, seed=0, noise=0.3)
    return synthetic(n=150, **kw), synthetic(n=60, split="val", **kw)


def model():
    torch.manual_seed(0)
    return models.get("cnn2", num_classes=CLASSES, width=4)


def test_window_angle_of_lines():
    assert window_angle([0.1, 0.2, 0.3], scale=100) == pytest.approx(math.degrees(math.atan(10)))
    assert window_angle([0.5, 0.5, 0.5]) == 0.0
    assert window_angle([0.3, 0.2]) < 0
    with pytest.raises(GrowthConfigError, match="got 1"):
        window_angle([0.5])


def test_angle_criterion_fires_when_the_curve_flattens():
    crit = AngleCriterion(ws=3, gamma=0.5)
    rising = [0.10, 0.20, 0.30, 0.38, 0.46, 0.54]  # 10 then 8 points per epoch: 84.3 deg then 82.9 deg
    assert not any(crit.update(a) for a in rising)
    flat = [0.55, 0.555, 0.56]  # 0.5 points per epoch: 26.6 deg <= 0.5 * 82.9
    fired = [crit.update(a) for a in flat]
    assert fired == [False, False, True] and len(crit.angles) == 3


def test_angle_criterion_needs_two_windows_and_counts_falling_as_zero():
    crit = AngleCriterion(ws=2, gamma=0.5)
    assert not crit.update(0.5) and not crit.update(0.2)  # the first window alone never stops
    assert not crit.update(0.3) and not crit.update(0.5)  # rising after a fall: keep going
    crit2 = AngleCriterion(ws=2, gamma=0.5)
    for a in (0.5, 0.2):
        crit2.update(a)
    crit2.update(0.2)
    assert crit2.update(0.2)  # flat after falling: stop


def test_config_errors_carry_the_numbers():
    with pytest.raises(GrowthConfigError, match="ws=1"):
        IncrementalConfig(ws=1)
    with pytest.raises(GrowthConfigError, match="'warm'"):
        IncrementalConfig(init="warm")


def test_incremental_fit_grows_through_the_store(tmp_path):
    train, val = task()
    store = FeatureStore(tmp_path / "store")
    growth = IncrementalConfig(ws=2, gamma=0.5, lookahead_epochs=1, max_epochs_per_step=2)
    res = pystage.fit(model(), train, val, method="incremental", epochs=5, store=store, progress=False,
                      config=TrainConfig(lr=3e-3), growth=growth)
    rep = res.report
    assert isinstance(rep, GrowthReport) and rep.method == "incremental"
    assert [s.layers for s in rep.stages] == ["1", "1-2"]
    assert res.model(val.x[:5]).shape == (5, CLASSES) and res.model.stages[0].head is None
    # look-ahead: features of the frozen S1 for train and val were written to the store and read back
    keys = {e.key for e in store.ls()}
    assert len(keys) == 2 and rep.stages[1].store_key in keys and rep.stages[1].store_bytes > 0
    phases = [(h["step"], h["phase"]) for h in rep.history]
    assert phases == [(1, "joint")] * 2 + [(2, "lookahead")] + [(2, "joint")] * 2  # cap of 2 joint epochs
    assert rep.stages[0].store_key is None


def test_random_init_writes_no_features(tmp_path):
    train, val = task()
    store = FeatureStore(tmp_path / "store")
    res = pystage.fit(model(), train, val, method="incremental", epochs=2, store=store, progress=False,
                      growth=IncrementalConfig(init="random"))
    assert store.ls() == [] and all(h["phase"] == "joint" for h in res.report.history)


def test_wrong_growth_config_type():
    train, val = task()
    with pytest.raises(TypeError, match="IncrementalConfig"):
        pystage.fit(model(), train, val, method="incremental", growth=object(), progress=False)
