"""Dynamic capacity: schedule, plateau detection, frozen units stay bit-identical, the public API."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import pystage
from pystage.layers import MaskedConv2d, MaskedLinear
from pystage.train import TrainConfig
from pystage.train.capacity import (CapacityConfig, PlateauDetector, masked_chain, schedule, units_per_step)
from pystage.train.incremental import GrowthConfigError


def test_schedule_and_units():
    assert schedule(5) == (0.2, 0.4, 0.6, 0.8, 1.0)
    assert schedule((0.5, 1.0)) == (0.5, 1.0)
    assert units_per_step(500, schedule(5)) == [100] * 5
    assert units_per_step(10, schedule(10)) == [1] * 10
    with pytest.raises(GrowthConfigError, match=r"\[0, 1\]|\[1, 0"):
        units_per_step(1, (0.4, 1.0))
    with pytest.raises(GrowthConfigError, match="end at 1.0"):
        schedule((0.2, 0.5))


def test_plateau_on_hand_made_curves():
    det = PlateauDetector(window=3, patience=4, tolerance=0.01)
    falling = [1.0 / (1 + i) for i in range(20)]
    assert not any(det.update(v) for v in falling)  # still improving: never a plateau
    det.reset()
    flat = [1.0, 0.9, 0.8, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    fired = [det.update(v) for v in flat]
    # averages: 0.9, 0.733, 0.6, 0.5, 0.5 (new best at index 5), then no improvement at 6, 7, 8, 9
    assert fired.index(True) == 9 and not any(fired[:9])
    det.reset()
    noisy_flat = [0.5, 0.51, 0.49, 0.5, 0.505, 0.495, 0.5, 0.5, 0.5]  # within tolerance: plateau
    assert any(det.update(v) for v in noisy_flat)


def test_thesis_rule_compares_the_average_with_its_value_patience_batches_earlier():
    det = PlateauDetector(window=2, patience=3, tolerance=0.0, rule="thesis")
    falling = [1.0 / (1 + i) for i in range(20)]
    assert not any(det.update(v) for v in falling)  # every average below the one 3 updates earlier
    det.reset()
    # averages from the 2nd loss on: 1.0, 0.75, 0.5, 0.5, 0.5, 0.5, 0.7; the 6th (0.5) is the first not below
    # the average 3 updates before it (0.5): it fires at the 7th loss, and again at the 8th (0.7 >= 0.5)
    fired = [det.update(v) for v in [1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.9]]
    assert fired == [False] * 6 + [True, True]
    det.reset()
    assert not any(det.update(v) for v in [0.5] * 4)  # needs window + patience losses before it can fire
    assert det.update(0.5)  # flat: the 5th loss (4th average) is not below the 1st average


def test_growth_options_are_checked():
    with pytest.raises(GrowthConfigError, match="rule must be one of"):
        CapacityConfig(rule="loose")
    with pytest.raises(GrowthConfigError, match="sample_every=-1"):
        CapacityConfig(sample_every=-1)
    with pytest.raises(GrowthConfigError, match="rule"):
        PlateauDetector(10, 10, 0.0, rule="x")
    with pytest.raises(GrowthConfigError, match="min_batches must be >= 1, got 0"):
        CapacityConfig(rule="every")


def test_rule_every_grows_on_a_fixed_schedule():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 20), nn.ReLU(), nn.Linear(20, 1))
    res = pystage.fit(net, _sine(), None, method="capacity", epochs=2, batch_size=20, progress=False,
                      growth=CapacityConfig(fractions=4, rule="every", min_batches=6))
    assert [h["batch"] for h in res.report.history if h["event"] == "grow"] == [6, 12, 18]


def test_masked_chain_converts_all_but_the_output_layer():
    net = nn.Sequential(nn.Linear(1, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 1))
    out, chain = masked_chain(net, schedule(5))
    assert [type(m) for m in chain] == [MaskedLinear, MaskedLinear] and type(out[4]) is nn.Linear
    assert [m.active_units for m in chain] == [2, 2] and chain[1].in_active == 2
    with pytest.raises(GrowthConfigError, match="BatchNorm"):
        masked_chain(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)), schedule(2))


def _sine(n=200):
    x = torch.linspace(-3, 3, n).unsqueeze(1)
    return TensorDataset(x, torch.sin(x))


def test_growth_keeps_frozen_outputs_bit_identical():
    torch.manual_seed(0)
    net, chain = masked_chain(nn.Sequential(nn.Conv2d(2, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 10, 3, padding=1),
                                            nn.ReLU(), nn.Flatten(), nn.Linear(10 * 16, 3)), schedule(5))
    x = torch.randn(4, 2, 4, 4)
    from pystage.layers import grow_chain

    grow_chain(chain, 2)  # units 0-1 frozen in both convs, 2-3 trainable
    before = [net[:2](x)[:, :2].clone(), net[:4](x)[:, :2].clone()]
    w_before = chain[1].weight.detach().clone()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        net(x).square().sum().backward()
        opt.step()
    after = [net[:2](x)[:, :2], net[:4](x)[:, :2]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.equal(chain[1].weight, w_before)  # while the new units did train
    assert isinstance(chain[0], MaskedConv2d) and chain[1].frozen_units == 2 and chain[1].in_split == 2


def test_fit_capacity_grows_in_steps_on_plateaus():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 20), nn.ReLU(), nn.Linear(20, 1))
    growth = CapacityConfig(fractions=4, window=2, patience=2, tolerance=0.5)  # eager: plateaus come fast
    res = pystage.fit(net, _sine(), _sine(50), method="capacity", epochs=3, batch_size=20, progress=False,
                      config=TrainConfig(lr=1e-2), growth=growth)
    grows = [h for h in res.report.history if h["event"] == "grow"]
    assert [g["fraction"] for g in grows] == [0.5, 0.75, 1.0]
    assert res.model[0].frozen_units == 15 and res.model[0].trainable_units == 5
    end = res.report.history[-1]
    assert end["event"] == "end" and end["val_mse"] >= 0 and res.report.stages[0].val_acc is None


def test_samples_are_every_nth_batch_loss_and_the_thesis_rule_grows():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 20), nn.ReLU(), nn.Linear(20, 1))
    growth = CapacityConfig(fractions=4, window=2, patience=2, tolerance=0.0, rule="thesis", sample_every=3)
    res = pystage.fit(net, _sine(), None, method="capacity", epochs=2, batch_size=20, progress=False,
                      config=TrainConfig(lr=1e-2), growth=growth)  # 10 batches an epoch: 20 in all
    samples = [h for h in res.report.history if h["event"] == "sample"]
    assert [s["batch"] for s in samples] == [3, 6, 9, 12, 15, 18]
    assert [s["epoch"] for s in samples] == [0, 0, 0, 1, 1, 1]
    assert all(s["train_loss"] >= 0 for s in samples)
    grows = [h["batch"] for h in res.report.history if h["event"] == "grow"]
    assert grows and all(b - a >= 4 for a, b in zip([0, *grows], grows))  # window + patience after each growth
    from pystage.bench.repro.sine import final_samples

    mean, std, n = final_samples(res.report.history, n=4)
    last = [s["train_loss"] for s in samples[-4:]]
    assert n == 4 and mean == pytest.approx(sum(last) / 4)
    assert std == pytest.approx(torch.tensor(last).std(unbiased=False).item(), rel=1e-5)


def test_fit_capacity_classifier_on_a_zoo_body(tmp_path):
    data = pystage.data.synthetic(n=60, num_classes=3, shape=(3, 8, 8))
    res = pystage.fit(pystage.models.get("cnn2", num_classes=3, width=5), data, data, method="capacity", epochs=1,
                      progress=False, growth=CapacityConfig(fractions=5))
    assert res.model(data.x[:2]).shape == (2, 3) and 0 <= res.report.val_acc <= 1
    assert isinstance(res.model[2], MaskedConv2d) and res.model[0].active_units == 1
