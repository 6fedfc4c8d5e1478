"""StagedNet: a chain of stages (body + head) cut from an nn.Sequential; an ordinary nn.Module after training."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pystage import models
from pystage.staged import Stage, StagedNet, StageError, feature_shapes, make_head


def tiny() -> nn.Sequential:
    """6 layers: conv-relu-pool | conv-relu | pool, inputs (3, 8, 8)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))


def test_bodies_are_the_models_own_modules_cut_at_split_points():
    model = tiny()
    net = StagedNet.from_sequential(model, [3, 5], input_shape=(3, 8, 8), num_classes=7)
    assert len(net) == 3
    assert [len(b) for b in net.bodies] == [3, 2, 1]
    flat = [m for b in net.bodies for m in b]
    assert len(flat) == len(model) and all(a is b for a, b in zip(flat, model))  # no copies
    # training the net trains the model: the parameters are the same tensors
    assert net.stages[0].body[0].weight is model[0].weight


def test_heads_score_each_stages_features():
    net = StagedNet.from_sequential(tiny(), [3, 5], input_shape=(3, 8, 8), num_classes=7)
    # stage outputs: (4, 4, 4), (5, 4, 4), (5, 2, 2)
    assert [s.head[-1].in_features for s in net.stages] == [64, 80, 20]
    assert all(s.head[-1].out_features == 7 for s in net.stages)
    pooled = StagedNet.from_sequential(tiny(), [3, 5], input_shape=(3, 8, 8), num_classes=7, head="pool-linear")
    assert [s.head[-1].in_features for s in pooled.stages] == [4, 5, 5]


def test_split_points_default_to_the_models_and_num_classes_to_its_attribute():
    model = models.get("cnn8", width=4, num_classes=3)  # three stages
    net = StagedNet.from_sequential(model, input_shape=(3, 16, 16))
    assert len(net) == 3
    assert net.stages[-1].head[-1].out_features == 3
    x = torch.randn(2, 3, 16, 16)
    assert net(x).shape == (2, 3)
    one = StagedNet.from_sequential(nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU()), input_shape=(3, 8, 8))
    assert len(one) == 1 and one.stages[0].head[-1].out_features == 10  # no split_points, no num_classes


def test_forward_is_every_body_then_the_last_head():
    net = StagedNet.from_sequential(tiny(), [3, 5], input_shape=(3, 8, 8), num_classes=7)
    x = torch.randn(5, 3, 8, 8)
    h = x
    for body in net.bodies:
        h = body(h)
    expected = net.stages[-1].head(h)
    out = net(x)
    assert out.shape == (5, 7)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(net.features(x, 2), net.bodies[1](net.bodies[0](x)), rtol=0, atol=0)
    torch.testing.assert_close(net.stages[0].logits(x), net.stages[0].head(net.bodies[0](x)), rtol=0, atol=0)
    torch.testing.assert_close(net.stages[0](x), net.bodies[0](x), rtol=0, atol=0)  # Stage() is its body


def test_drop_heads_keeps_only_the_last():
    net = StagedNet.from_sequential(tiny(), [3, 5], input_shape=(3, 8, 8), num_classes=7)
    x = torch.randn(2, 3, 8, 8)
    before = net(x)
    assert net.drop_heads() is net
    assert [s.head is None for s in net.stages] == [True, True, False]
    assert not any(k.startswith(("stages.0.head", "stages.1.head")) for k in net.state_dict())
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)
    with pytest.raises(StageError, match="dropped"):
        net.stages[0].logits(x)


def test_state_dict_round_trip():
    torch.manual_seed(1)
    a = StagedNet.from_sequential(tiny(), [3, 5], input_shape=(3, 8, 8), num_classes=7).drop_heads()
    torch.manual_seed(2)
    b = StagedNet.from_sequential(tiny(), [3, 5], input_shape=(3, 8, 8), num_classes=7).drop_heads()
    x = torch.randn(3, 3, 8, 8)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_to_float64_converts_every_stage():
    net = StagedNet.from_sequential(tiny(), [3, 5], input_shape=(3, 8, 8), num_classes=7)
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    assert net.to(torch.float64) is net
    assert all(p.dtype == torch.float64 for p in net.parameters())
    out = net(x.double())
    assert out.dtype == torch.float64 and out.shape == (2, 7)
    torch.testing.assert_close(out.float(), ref, rtol=1e-5, atol=1e-5)
    # a float64 model is staged with float64 probes
    double = StagedNet.from_sequential(tiny().double(), [3], input_shape=(3, 8, 8), num_classes=2)
    assert double(torch.randn(1, 3, 8, 8, dtype=torch.float64)).shape == (1, 2)


@pytest.mark.parametrize("points", [(0,), (6,), (7,), (-1,), (3, 3), (4, 2), (1, 2, 6)])
def test_bad_split_points_name_the_valid_range(points):
    with pytest.raises(StageError, match=r"split_points.*\[1, 5\]") as info:
        StagedNet.from_sequential(tiny(), points, input_shape=(3, 8, 8))
    assert str(points) in str(info.value)


def test_stage_error_is_a_value_error_and_other_misuse():
    assert issubclass(StageError, ValueError)
    with pytest.raises(StageError, match="at least one stage"):
        StagedNet([])
    with pytest.raises(StageError, match="head must be one of"):
        make_head((4, 2, 2), 3, kind="mlp")
    with pytest.raises(StageError, match="head must be one of"):
        StagedNet.from_sequential(tiny(), [3], input_shape=(3, 8, 8), head="mlp")


def test_feature_shapes_restores_training_mode_and_needs_no_grad():
    bodies = [nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2)), nn.Sequential(nn.Flatten())]
    bodies[0].train()
    bodies[1].eval()
    running = bodies[0][1].running_mean.clone()
    assert feature_shapes(bodies, (3, 6, 6)) == [(2, 4, 4), (32,)]
    assert bodies[0].training and not bodies[1].training
    assert torch.equal(bodies[0][1].running_mean, running)  # probed in eval mode: statistics untouched


def test_hand_built_stages():
    net = StagedNet([Stage(nn.Flatten(), nn.Linear(12, 2))])
    assert net(torch.randn(4, 3, 2, 2)).shape == (4, 2)
