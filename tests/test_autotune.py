"""The backward path autotuner (pystage.autotune): choice, cache, switch, and that every path trains the same.

Timing never decides a test here: a fake timer says which path is "faster" and records what it ran.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pystage import autotune as A
from pystage.layers import MaskedConv2d, MaskedLinear


@pytest.fixture(autouse=True)
def _fresh_tuner():
    enabled = A.autotune_enabled()
    A.clear_cache()
    yield
    A.set_timer(None)
    A.set_autotune(enabled)


class FakeTimer:
    """Runs each path once (so a broken path still fails the test) and reports the times it was given."""

    def __init__(self, **ms: float) -> None:
        self.ms = ms
        self.calls: list[str] = []

    def __call__(self, name, fn, device) -> float:
        self.calls.append(name)
        fn()
        return self.ms.get(name, 10.0)


def _conv(t_out=2, t_in=3, dtype=torch.float64):
    torch.manual_seed(0)
    dense = nn.Conv2d(5, 6, 3, padding=1, dtype=dtype)
    return MaskedConv2d.from_dense(dense, trainable_units=t_out, trainable_inputs=t_in)


def _linear(t_out=3, t_in=2, dtype=torch.float64):
    torch.manual_seed(0)
    return MaskedLinear.from_dense(nn.Linear(7, 8, dtype=dtype), trainable_units=t_out, trainable_inputs=t_in)


def _x(layer, batch=3):
    g = torch.Generator().manual_seed(1)
    shape = (batch, layer.in_channels, 6, 6) if isinstance(layer, MaskedConv2d) else (batch, layer.in_features)
    return torch.randn(shape, generator=g, dtype=layer.weight.dtype, requires_grad=True)


def _backward(layer, x):
    layer.zero_grad(set_to_none=True)
    x.grad = None
    y = layer(x)
    y.backward(torch.ones_like(y))


@pytest.mark.parametrize("make", [_conv, _linear], ids=["conv", "linear"])
@pytest.mark.parametrize("faster", ["masked", "dense"])
def test_the_faster_path_is_picked(make, faster):
    timer = FakeTimer(**{faster: 1.0})
    layer = make()
    with A.using_timer(timer):
        _backward(layer, _x(layer))
        (d,) = A.decisions()
    assert sorted(timer.calls) == ["dense", "masked"]  # CPU: both candidates measured, nothing else
    assert d.path == faster and d.measured
    assert d.times_ms == {"masked": 1.0 if faster == "masked" else 10.0, "dense": 1.0 if faster == "dense" else 10.0}


def test_ties_go_to_masked():
    layer = _conv()
    with A.using_timer(FakeTimer(masked=3.0, dense=3.0)):
        _backward(layer, _x(layer))
        assert A.decisions()[0].path == "masked"


def test_each_shape_is_measured_once():
    timer = FakeTimer(dense=1.0)
    layer = _conv()
    with A.using_timer(timer):
        for _ in range(3):
            _backward(layer, _x(layer))
        assert len(timer.calls) == 2  # first call only
        _backward(layer, _x(layer, batch=5))  # a new batch size is a new shape
        assert len(timer.calls) == 4
        x = _x(layer).detach()  # no dX wanted: another output mask, another shape
        layer(x).sum().backward()
        assert len(timer.calls) == 6
        assert [d.output_mask for d in A.decisions()] == [(True, True, True), (True, True, True), (False, True, True)]


def test_clear_cache_measures_again():
    timer = FakeTimer()
    layer = _linear()
    with A.using_timer(timer):
        _backward(layer, _x(layer))
        A.clear_cache()
        assert A.decisions() == []
        _backward(layer, _x(layer))
    assert len(timer.calls) == 4


def test_autotune_off_uses_the_heuristic_and_never_measures():
    def refuse(name, fn, device):
        raise AssertionError("measured with autotune off")

    A.set_autotune(False)
    A.set_timer(refuse)
    layer = _conv()
    _backward(layer, _x(layer))
    (d,) = A.decisions()
    assert not d.measured and d.times_ms == {}
    assert d.path == "masked"  # the CPU heuristic


def test_deterministic_mode_does_not_measure():
    """Measured choices can differ between runs: deterministic algorithms get the heuristic's fixed choice."""
    def refuse(name, fn, device):
        raise AssertionError("measured in deterministic mode")

    layer = _conv()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with A.using_timer(refuse):
            _backward(layer, _x(layer))
            (d,) = A.decisions()
    finally:
        torch.use_deterministic_algorithms(before)
    assert not d.measured and d.path == "masked"


def test_switching_autotune_forgets_picked_paths():
    layer = _linear()
    with A.using_timer(FakeTimer(dense=1.0)):
        _backward(layer, _x(layer))
        A.set_autotune(False)
        _backward(layer, _x(layer))
        assert [d.path for d in A.decisions()] == ["masked"]  # re-decided by the heuristic, not the cached "dense"


def test_env_var_turns_measuring_off(monkeypatch):
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv("PYSTAGE_AUTOTUNE", off)
        assert not A._env_enabled()
    monkeypatch.setenv("PYSTAGE_AUTOTUNE", "1")
    assert A._env_enabled()
    monkeypatch.delenv("PYSTAGE_AUTOTUNE")
    assert A._env_enabled()


def test_set_autotune_wants_a_bool():
    with pytest.raises(TypeError, match="bool"):
        A.set_autotune("no")  # type: ignore[arg-type]


def test_a_path_out_of_memory_is_not_picked():
    def timer(name, fn, device):
        if name == "dense":
            raise torch.OutOfMemoryError("fake")
        return 5.0

    layer = _conv()
    with A.using_timer(timer):
        _backward(layer, _x(layer))
        d = A.decisions()[0]
    assert d.path == "masked" and d.times_ms["dense"] == float("inf")


def test_a_failing_alternative_is_not_picked_but_a_failing_masked_path_raises():
    def dense_fails(name, fn, device):
        if name == "dense":
            raise RuntimeError("cuDNN: no algorithm")
        return 5.0

    layer = _linear()
    with A.using_timer(dense_fails):
        _backward(layer, _x(layer))
        assert A.decisions()[0].path == "masked"

    def masked_fails(name, fn, device):
        if name == "masked":
            raise RuntimeError("broken kernel")
        return 5.0

    with A.using_timer(masked_fails), pytest.raises(RuntimeError, match="broken kernel"):
        _backward(layer, _x(layer))


def test_no_measuring_under_a_dispatch_mode():
    """Under FakeTensorMode-like tracing or FlopCounterMode, ops cannot be timed: masked path, nothing cached."""
    from torch.utils.flop_counter import FlopCounterMode

    timer = FakeTimer(dense=1.0)
    layer = _linear()
    with A.using_timer(timer):
        x = _x(layer)
        y = layer(x)
        with FlopCounterMode(display=False):
            y.sum().backward()
        assert timer.calls == [] and A.decisions() == []


def test_heuristic():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    big_conv = dict(grad_shape=(64, 128, 56, 56), x_shape=(64, 128, 56, 56), output_mask=(True, True, True))
    # CPU: always masked
    assert A.heuristic("masked_conv2d", cpu, w_shape=(128, 128, 3, 3), in_split=0, **big_conv) == A.MASKED
    # CUDA, big layer: masked when it skips at least half the work
    assert A.heuristic("masked_conv2d", cuda, w_shape=(32, 128, 3, 3), in_split=96, **big_conv) == A.MASKED
    assert A.heuristic("masked_conv2d", cuda, w_shape=(96, 128, 3, 3), in_split=32, **big_conv) == A.DENSE
    # CUDA, small (launch-bound) layer: dense
    small = dict(grad_shape=(8, 32, 8, 8), x_shape=(8, 32, 8, 8), output_mask=(True, True, True))
    assert A.heuristic("masked_conv2d", cuda, w_shape=(4, 32, 3, 3), in_split=28, **small) == A.DENSE
    lin = dict(grad_shape=(4096, 8192), x_shape=(4096, 8192), output_mask=(True, True, True))
    assert A.heuristic("masked_linear", cuda, w_shape=(2048, 8192), in_split=6144, **lin) == A.MASKED


def test_fused_bias_is_a_candidate_only_for_cuda_linear_with_bias():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert A.candidates("masked_linear", cuda, (True, True, True)) == [A.MASKED, A.FUSED_BIAS, A.DENSE]
    assert A.candidates("masked_linear", cuda, (True, True, False)) == [A.MASKED, A.DENSE]
    assert A.candidates("masked_linear", cpu, (True, True, True)) == [A.MASKED, A.DENSE]
    assert A.candidates("masked_conv2d", cuda, (True, True, True)) == [A.MASKED, A.DENSE]


# ---------------------------------------------------------------------------------- both paths train alike

def _train(make, path: str, steps=3):
    """A few SGD steps (momentum, weight decay) on one path; returns the layer and the input gradients."""
    layer = make()
    frozen = (layer.frozen_weight.clone(), layer.frozen_bias.clone())
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    grads = []
    with A.using_timer(FakeTimer(**{path: 1.0})):
        for step in range(steps):
            x = _x(layer)
            opt.zero_grad()
            y = layer(x)
            (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
            opt.step()
            grads.append(x.grad)
        assert {d.path for d in A.decisions()} <= {path}  # at full width the layer is the dense call: no decision
    return layer, frozen, grads


@pytest.mark.parametrize("make", [_conv, _linear, lambda: _conv(t_out=6, t_in=5), lambda: _linear(t_out=8, t_in=0)],
                         ids=["conv", "linear", "conv-full-width", "linear-data-input"])
def test_masked_and_dense_paths_train_identically(make):
    masked, frozen_m, gx_m = _train(make, "masked")
    dense, frozen_d, gx_d = _train(make, "dense")
    for layer, (fw, fb) in ((masked, frozen_m), (dense, frozen_d)):  # frozen units untouched
        assert torch.equal(layer.frozen_weight, fw) and torch.equal(layer.frozen_bias, fb)
    torch.testing.assert_close(dense.weight, masked.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense.bias, masked.bias, rtol=1e-12, atol=1e-12)
    split = masked.in_split
    for a, b in zip(gx_m, gx_d):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        assert torch.count_nonzero(b[:, :split]) == 0  # no dX for the frozen inputs on either path
