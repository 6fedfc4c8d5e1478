"""Tests of the masked partial-gradient layers (pystage.layers).

What must hold (DESIGN.md, "Masked partial-gradient layers"):
* bookkeeping: growth appends units, freezes the previous trainable block, and refuses impossible requests
  with a GrowthError that carries the numbers;
* the block-triangular invariant: what a frozen sub-network computes never changes while newer units train;
* frozen units live in buffers, so no optimizer (weight decay, momentum) can move a frozen byte;
* round trips: state_dict across growth states, from_dense / to_dense.
"""
from __future__ import annotations

import io

import pytest
import copy

import torch
import torch.nn.functional as F
from torch import nn

from pystage.layers import GrowthError, MaskedConv2d, MaskedLinear, grow_chain, LayerArgumentError


def _snapshot(layer):
    """state_dict copy; the growth steps (``_extra_state``) are a plain dict."""
    return {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in layer.state_dict().items()}


# ====================================================================================== bookkeeping

def _units(layer):
    return (layer.frozen_units, layer.trainable_units, layer.active_units, layer.in_split, layer.in_active)


def test_linear_grow_and_freeze_bookkeeping():
    m = MaskedLinear(6, 10, units=3, inputs=3, trainable_inputs=3)
    assert _units(m) == (0, 3, 3, 0, 3)
    assert m.weight.shape == (3, 3) and m.bias.shape == (3,)
    assert m.frozen_weight.shape == (0, 0) and m.frozen_bias.shape == (0,)

    w = m.grow(2, 2)
    assert w is m.weight
    assert _units(m) == (3, 2, 5, 3, 5)
    assert m.frozen_weight.shape == (3, 3) and m.weight.shape == (2, 5)
    assert m.frozen_bias.shape == (3,) and m.bias.shape == (2,)

    m.grow(4, 1)
    assert _units(m) == (5, 4, 9, 5, 6)
    assert m.frozen_weight.shape == (5, 5)
    # rule 2: the units of step 1 read inputs [0, 3) only; their weights from inputs [3, 5) are zero
    assert torch.equal(m.frozen_weight[:3, 3:], torch.zeros(3, 2))

    m.freeze_all()
    assert _units(m) == (9, 0, 9, 6, 6)
    assert m.weight.shape == (0, 6) and m.bias.shape == (0,)
    assert isinstance(m.frozen_weight, torch.Tensor) and not isinstance(m.frozen_weight, nn.Parameter)
    assert "frozen_weight" in dict(m.named_buffers()) and "frozen_weight" not in dict(m.named_parameters())

    m.grow(1)  # a fully frozen layer can grow again
    assert _units(m) == (9, 1, 10, 6, 6)


def test_conv_grow_and_freeze_bookkeeping():
    m = MaskedConv2d(5, 8, (3, 1), units=2, inputs=2, trainable_inputs=2)
    assert _units(m) == (0, 2, 2, 0, 2)
    assert m.weight.shape == (2, 2, 3, 1)
    m.grow(3, 2)
    assert _units(m) == (2, 3, 5, 2, 4)
    assert m.frozen_weight.shape == (2, 2, 3, 1) and m.weight.shape == (3, 4, 3, 1)
    m.freeze_all()
    assert _units(m) == (5, 0, 5, 4, 4)
    assert m.frozen_weight.shape == (5, 4, 3, 1)
    assert torch.equal(m.frozen_weight[:2, 2:], torch.zeros(2, 2, 3, 1))


@pytest.mark.parametrize("ctor,match", [
    (lambda: MaskedLinear(6, 8, units=0), r"units must be in \[1, 8\].*got 0"),
    (lambda: MaskedLinear(6, 8, units=9), r"units must be in \[1, 8\].*got 9"),
    (lambda: MaskedLinear(6, 8, inputs=7), r"inputs must be in \[1, 6\].*got 7"),
    (lambda: MaskedLinear(6, 8, inputs=3, trainable_inputs=4), r"trainable_inputs must be in \[0, 3\].*got 4"),
    (lambda: MaskedConv2d(3, 4, 3, units=5), r"units must be in \[1, 4\].*got 5"),
])
def test_constructor_growth_errors_carry_numbers(ctor, match):
    with pytest.raises(GrowthError, match=match):
        ctor()


def test_grow_errors_carry_numbers_and_leave_layer_unchanged():
    m = MaskedLinear(6, 10, units=3, inputs=4, trainable_inputs=4)
    m.grow(2, 1)
    before, units = _snapshot(m), _units(m)
    cases = [
        (lambda: m.grow(6), r"cannot grow by 6 units: 5 of 10 are active, 5 remain"),
        (lambda: m.grow(0), r"n_units must be a positive int, got 0"),
        (lambda: m.grow(1.5), r"n_units must be a positive int, got 1\.5"),
        (lambda: m.grow(1, 2), r"cannot read 2 more inputs: 5 of 6 are active"),
        (lambda: m.grow(1, -1), r"cannot read -1 more inputs"),
    ]
    for call, match in cases:
        with pytest.raises(GrowthError, match=match):
            call()
        assert _units(m) == units
        after = _snapshot(m)
        assert after.keys() == before.keys() and all(
            torch.equal(after[k], before[k]) if torch.is_tensor(before[k]) else after[k] == before[k] for k in before)
    assert issubclass(GrowthError, ValueError)


def test_grow_chain_wires_new_inputs_and_checks_lengths():
    layers = [MaskedLinear(4, 8, units=3), MaskedLinear(8, 6, units=2, inputs=3, trainable_inputs=3),
              MaskedLinear(6, 5, units=1, inputs=2, trainable_inputs=2)]
    params = grow_chain(layers, [2, 3, 1])
    assert [p is l.weight for p, l in zip(params, layers)] == [True] * 3
    assert [_units(l) for l in layers] == [(3, 2, 5, 4, 4), (2, 3, 5, 3, 5), (1, 1, 2, 2, 5)]
    with pytest.raises(GrowthError, match=r"n_units lists 2 counts for 3 layers"):
        grow_chain(layers, [1, 1])
    grow_chain(layers, 1)
    assert [l.trainable_units for l in layers] == [1, 1, 1]
    assert [l.in_active for l in layers] == [4, 6, 6]


def test_optimizer_after_grow_sees_only_new_params():
    m = MaskedLinear(5, 8, units=3)
    old_w, old_b = m.weight, m.bias
    new_w = m.grow(2)
    params = list(m.parameters())
    assert len(params) == 2 and params[0] is new_w and params[1] is m.bias
    assert all(p is not old_w and p is not old_b for p in params)
    assert [tuple(p.shape) for p in params] == [(2, 5), (2,)]
    assert all(p.requires_grad for p in params)
    # the frozen copy of the old block is not a Parameter and does not require grad
    assert not m.frozen_weight.requires_grad and torch.equal(m.frozen_weight, old_w.detach())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 2 * 5 + 2


# ====================================================================================== forward semantics

def test_linear_matches_dense_reference_with_chain_gradients():
    """A grown 2-layer chain vs its dense equivalent: same output; same grads for the trainable blocks."""
    l1 = MaskedLinear(5, 7, units=2, dtype=torch.float64)
    l2 = MaskedLinear(7, 4, units=1, inputs=2, trainable_inputs=2, dtype=torch.float64)
    grow_chain([l1, l2], [3, 2])
    d1, d2 = l1.to_dense(), l2.to_dense()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = l2(torch.tanh(l1(x)))
    yd = d2(torch.tanh(d1(x)))
    torch.testing.assert_close(y, yd, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    y.backward(gy)
    yd.backward(gy)
    for m, d in ((l1, d1), (l2, d2)):
        f, a = m.frozen_units, m.active_units
        torch.testing.assert_close(m.weight.grad, d.weight.grad[f:a, : m.in_active], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.bias.grad, d.bias.grad[f:a], rtol=1e-12, atol=1e-12)


def test_linear_on_3d_input():
    m = MaskedLinear(6, 5, units=3)
    m.grow(1)
    x = torch.randn(2, 4, 6, requires_grad=True)
    y = m(x)
    assert y.shape == (2, 4, 5)
    torch.testing.assert_close(y, m(x.reshape(8, 6)).reshape(2, 4, 5), rtol=0, atol=0)
    torch.testing.assert_close(y, m.to_dense()(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[..., 4:], torch.zeros(2, 4, 1))  # the inactive unit
    y.sum().backward()
    assert m.weight.grad.shape == (1, 6) and m.weight.grad.abs().sum() > 0


def test_conv_padding_same():
    m = MaskedConv2d(3, 6, (3, 5), padding="same", dilation=(2, 1), units=4)
    assert m.padding == (2, 2)
    x = torch.randn(2, 3, 7, 9)
    y = m(x)
    assert y.shape == (2, 6, 7, 9)
    ref = F.conv2d(x, m.dense_weight(), m.dense_bias(), 1, "same", (2, 1))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"padding='same' needs stride 1 and odd kernels.*kernel_size=\(2, 3\)"):
        MaskedConv2d(3, 4, (2, 3), padding="same")
    with pytest.raises(ValueError, match=r"padding='same'.*stride=\(2, 2\)"):
        MaskedConv2d(3, 4, 3, stride=2, padding="same")


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fully_frozen_forward(kind):
    if kind == "linear":
        m = MaskedLinear(6, 8, units=3, dtype=torch.float64)
        x = torch.randn(4, 6, dtype=torch.float64)
    else:
        m = MaskedConv2d(3, 5, 3, padding=1, units=2, dtype=torch.float64)
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    m.grow(2)
    y_before = m(x).detach()
    m.freeze_all()
    assert m.trainable_units == 0 and sum(p.numel() for p in m.parameters()) == 0
    y = m(x)
    torch.testing.assert_close(y, y_before, rtol=1e-12, atol=1e-12)
    assert torch.equal(y[:, 5:], torch.zeros_like(y[:, 5:]))
    assert not y.requires_grad  # nothing left to train


def test_to_float64():
    m = MaskedConv2d(3, 6, 3, padding=1, units=2)
    m.grow(2)
    x = torch.randn(2, 3, 5, 5)
    y32 = m(x)
    m.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in list(m.parameters()) + list(m.buffers()))
    y64 = m(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, rtol=1e-5, atol=1e-5)
    m.grow(1)  # growth keeps the layer's dtype
    assert m.weight.dtype == torch.float64 and m.frozen_weight.dtype == torch.float64
    with pytest.raises(RuntimeError, match=r"has dtype"):
        m(x)  # a float32 input into a float64 layer is named, not silently cast


def test_module_rejects_bad_input():
    lin = MaskedLinear(6, 4)
    with pytest.raises(ValueError, match=r"in_features=6.*\(3, 5\)"):
        lin(torch.randn(3, 5))
    conv = MaskedConv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"\(batch, 3, H, W\).*\(2, 4, 5, 5\)"):
        conv(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"\(batch, 3, H, W\).*\(3, 5, 5\)"):
        conv(torch.randn(3, 5, 5))
    with pytest.raises(ValueError, match=r"kernel_size must be an int or a pair of ints"):
        MaskedConv2d(3, 4, (3, 3, 3))
    with pytest.raises(ValueError, match=r"stride must be an int or a pair of ints"):
        MaskedConv2d(3, 4, 3, stride=(1, 2.0))


# ====================================================================================== round trips

def _grow_states(make, steps):
    """Yield (name, layer) for a fresh layer, after each growth step, and fully frozen."""
    m = make()
    yield "fresh", m
    for i, n in enumerate(steps):
        m.grow(*n)
        yield f"grown{i + 1}", m
    m.freeze_all()
    yield "frozen", m


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_state_dict_round_trip_across_growth_states(kind, bias):
    if kind == "linear":
        def make():
            return MaskedLinear(6, 9, bias, units=2, inputs=3, trainable_inputs=3)
        x = torch.randn(4, 6)
        steps = [(3, 2), (2, 1)]
    else:
        def make():
            return MaskedConv2d(4, 7, 3, 1, 1, bias=bias, units=2, inputs=2, trainable_inputs=2)
        x = torch.randn(2, 4, 5, 5)
        steps = [(2, 1), (3, 1)]
    for name, m in _grow_states(make, steps):
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        buf.seek(0)
        fresh = make()
        result = fresh.load_state_dict(torch.load(buf))
        assert not result.missing_keys and not result.unexpected_keys, name
        assert _units(fresh) == _units(m), name
        assert isinstance(fresh.weight, nn.Parameter) and "frozen_weight" in dict(fresh.named_buffers()), name
        assert torch.equal(fresh(x), m(x)), name
        # the loaded layer keeps growing like the original
        if m.active_units < m._n_out and m.in_active < m._n_in:
            fresh.grow(1, 1)
            assert fresh.frozen_units == m.active_units


def test_state_dict_loads_into_a_differently_grown_layer():
    src = MaskedLinear(5, 8, units=2)
    src.grow(3)
    dst = MaskedLinear(5, 8, units=1)
    dst.grow(1)
    dst.grow(1)
    dst.load_state_dict(src.state_dict())
    assert _units(dst) == _units(src)
    x = torch.randn(3, 5)
    assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize("trainable_units,trainable_inputs", [(None, 0), (2, 0), (3, 2)])
def test_linear_from_dense_and_back(trainable_units, trainable_inputs):
    dense = nn.Linear(6, 5)
    m = MaskedLinear.from_dense(dense, trainable_units, trainable_inputs)
    t = 5 if trainable_units is None else trainable_units
    assert _units(m) == (5 - t, t, 5, 6 - trainable_inputs, 6)
    x = torch.randn(4, 6)
    expected_w = dense.weight.detach().clone()
    expected_w[: 5 - t, 6 - trainable_inputs:] = 0  # rule 2: frozen units do not read the trainable inputs
    if trainable_inputs == 0:
        torch.testing.assert_close(m(x), dense(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m(x), F.linear(x, expected_w, dense.bias), rtol=1e-6, atol=1e-6)
    back = m.to_dense()
    assert isinstance(back, nn.Linear)
    assert torch.equal(back.weight, expected_w) and torch.equal(back.bias, dense.bias)
    # the copy does not share storage with the source layer
    with torch.no_grad():
        dense.weight.add_(1.0)
    assert torch.equal(m.to_dense().weight, expected_w)


def test_conv_from_dense_and_back():
    dense = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    m = MaskedConv2d.from_dense(dense, trainable_units=2)
    assert _units(m) == (4, 2, 6, 4, 4)
    x = torch.randn(2, 4, 7, 8)
    torch.testing.assert_close(m(x), dense(x), rtol=1e-5, atol=1e-5)
    back = m.to_dense()
    assert (back.stride, back.padding, back.dilation) == (dense.stride, dense.padding, dense.dilation)
    assert torch.equal(back.weight, dense.weight) and torch.equal(back.bias, dense.bias)
    with pytest.raises(TypeError, match=r"expects an nn.Conv2d, got Linear"):
        MaskedConv2d.from_dense(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"groups=2"):
        MaskedConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(GrowthError, match=r"trainable_units must be in \[1, 6\], got 0"):
        MaskedConv2d.from_dense(dense, trainable_units=0)


def test_to_dense_of_grown_layer_computes_the_same_function():
    m = MaskedLinear(6, 9, units=2, inputs=3, trainable_inputs=3)
    m.grow(3, 2)
    d = m.to_dense()
    x = torch.randn(5, 6)
    torch.testing.assert_close(m(x), d(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(d.weight[m.active_units:], torch.zeros(9 - m.active_units, 6))
    assert torch.equal(d.weight[:2, 3:], torch.zeros(2, 3))  # rule 2
    assert torch.equal(d.weight[:, 5:], torch.zeros(9, 1))    # the inactive input


# ====================================================================================== block-triangular invariant

def _train(layers, x, steps, opt, act=torch.tanh):
    for _ in range(steps):
        opt.zero_grad()
        _chain(layers, x, act)[-1].pow(2).mean().backward()
        opt.step()


def _chain(layers, x, act=torch.tanh):
    outs, h = [], x
    for i, layer in enumerate(layers):
        h = layer(h)
        outs.append(h)
        if i < len(layers) - 1:
            h = act(h)
    return outs


def _params(layers):
    return [p for layer in layers for p in layer.parameters()]


def _frozen_outputs(layers, x, units):
    with torch.no_grad():
        return [o[:, :n].clone() for o, n in zip(_chain(layers, x), units)]


def _linear_chain():
    return [MaskedLinear(8, 12, units=4), MaskedLinear(12, 10, units=3, inputs=4, trainable_inputs=4),
            MaskedLinear(10, 6, units=2, inputs=3, trainable_inputs=3)], torch.randn(16, 8), [2, 2, 1]


def _conv_chain():
    return [MaskedConv2d(3, 8, 3, padding=1, units=3),
            MaskedConv2d(8, 6, 3, padding="same", units=2, inputs=3, trainable_inputs=3),
            MaskedConv2d(6, 4, 1, units=1, inputs=2, trainable_inputs=2)], torch.randn(4, 3, 8, 8), [2, 2, 1]


@pytest.mark.parametrize("make", [_linear_chain, _conv_chain], ids=["linear", "conv"])
def test_frozen_subnetwork_is_bit_identical_after_growth_and_training(make):
    layers, x, growth = make()
    _train(layers, x, 5, torch.optim.SGD(_params(layers), lr=0.05))
    units = [layer.active_units for layer in layers]
    # Stage 1 is computed by the trainable block here and by the frozen block after growth, with the same
    # GEMM / conv shapes (F_new = T_old rows, in_split_new = in_active_old inputs, same batch): bit identity.
    before = _frozen_outputs(layers, x, units)
    grow_chain(layers, growth)
    fresh = [o.detach().clone() for o in _chain(layers, x)]
    for opt in (torch.optim.SGD(_params(layers), lr=0.05, momentum=0.9),
                torch.optim.AdamW(_params(layers), lr=0.05, weight_decay=0.1)):
        _train(layers, x, 10, opt)
        trained = [o.detach() for o in _chain(layers, x)]
        for b, a, n in zip(before, trained, units):
            assert torch.equal(b, a[:, :n])
    # the new units did train (their outputs moved), so the check above is not vacuous
    for f, a, n, layer in zip(fresh, trained, units, layers):
        assert not torch.equal(f[:, n:layer.active_units], a[:, n:layer.active_units])


@pytest.mark.parametrize("make", [_linear_chain, _conv_chain], ids=["linear", "conv"])
def test_frozen_subnetwork_survives_repeated_growth(make):
    """Two growth steps, training in between: every frozen stage keeps its outputs, bit for bit.

    The frozen block runs one GEMM / conv per growth step (``frozen_steps``), with the shapes the step had
    while it trained, so later growth never changes how an older unit's output is rounded.
    """
    layers, x, growth = make()
    _train(layers, x, 3, torch.optim.SGD(_params(layers), lr=0.05))
    stage1_units = [layer.active_units for layer in layers]
    stage1 = _frozen_outputs(layers, x, stage1_units)
    for step in range(2):
        grow_chain(layers, growth)
        units = [layer.frozen_units for layer in layers]
        frozen_now = _frozen_outputs(layers, x, units)
        for b, a in zip(stage1, frozen_now):
            assert torch.equal(a[:, : b.shape[1]], b)
        _train(layers, x, 8, torch.optim.AdamW(_params(layers), lr=0.05, weight_decay=0.1))
        for b, a in zip(frozen_now, _frozen_outputs(layers, x, units)):
            assert torch.equal(a, b)


# ====================================================================================== frozen bytes never move

OPTIMIZERS = {
    "adamw-wd": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, weight_decay=0.1),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("make", [_linear_chain, _conv_chain], ids=["linear", "conv"])
def test_frozen_bytes_never_move(make, opt_name):
    layers, x, growth = make()
    # train stage 1 so the optimizers' state (momentum, Adam moments) is non-zero when growth happens
    opt = OPTIMIZERS[opt_name](_params(layers))
    _train(layers, x, 3, opt)
    grow_chain(layers, growth)
    frozen = [(l.frozen_weight.clone(), l.frozen_bias.clone()) for l in layers]
    train0 = [(l.weight.detach().clone(), l.bias.detach().clone()) for l in layers]
    opt = OPTIMIZERS[opt_name](_params(layers))
    _train(layers, x, 25, opt)
    for layer, (fw, fb), (tw, tb) in zip(layers, frozen, train0):
        assert torch.equal(layer.frozen_weight, fw) and torch.equal(layer.frozen_bias, fb)
        assert not layer.frozen_weight.requires_grad
        assert not torch.equal(layer.weight, tw) and not torch.equal(layer.bias, tb)


def test_grad_hook_workaround_moves_frozen_weights_under_weight_decay():
    """Why frozen units live in buffers: zeroing their gradient with a hook (the usual trick) is not enough.

    AdamW's decoupled weight decay (and momentum carried over from before the freeze) updates a weight whose
    gradient is zero (pytorch/pytorch#38581). This test documents that the hook approach DOES move them.
    """
    frozen_rows = 3
    layer = nn.Linear(6, 5)
    layer.weight.register_hook(lambda g: torch.cat([torch.zeros_like(g[:frozen_rows]), g[frozen_rows:]]))
    layer.bias.register_hook(lambda g: torch.cat([torch.zeros_like(g[:frozen_rows]), g[frozen_rows:]]))
    before = layer.weight.detach()[:frozen_rows].clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05, weight_decay=0.1)
    x = torch.randn(8, 6)
    for _ in range(5):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        assert torch.equal(layer.weight.grad[:frozen_rows], torch.zeros(frozen_rows, 6))  # the hook did its job
        opt.step()
    assert not torch.equal(layer.weight.detach()[:frozen_rows], before)

    # the masked layer with the same optimizer keeps them
    m = MaskedLinear.from_dense(nn.Linear(6, 5), trainable_units=2)
    fw = m.frozen_weight.clone()
    opt = torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    assert torch.equal(m.frozen_weight, fw)


# ====================================================================================== backward skips frozen work

def test_backward_computes_grads_only_for_trainable_inputs():
    """dX reaches only the inputs trainable in the layer below: frozen inputs get exactly zero."""
    m = MaskedLinear(8, 6, units=2, inputs=5, trainable_inputs=5)
    m.grow(2, 2)  # frozen units read [0, 5); trainable read [0, 7)
    x = torch.randn(3, 8, requires_grad=True)
    m(x).sum().backward()
    assert torch.equal(x.grad[:, :5], torch.zeros(3, 5))
    assert torch.equal(x.grad[:, 7:], torch.zeros(3, 1))
    assert (x.grad[:, 5:7] != 0).all()


def test_from_dense_rejects_bad_trainable_inputs_with_numbers():
    for bad in (7, -1):
        with pytest.raises(GrowthError, match=rf"trainable_inputs must be in \[0, 6\].*got {bad}"):
            MaskedLinear.from_dense(nn.Linear(6, 5), 2, bad)


def test_conv_from_dense_with_string_padding():
    x = torch.randn(2, 3, 6, 6)
    for padding in ("valid", "same"):
        dense = nn.Conv2d(3, 4, 3, padding=padding)
        m = MaskedConv2d.from_dense(dense, trainable_units=1)
        assert m.padding == ((0, 0) if padding == "valid" else (1, 1))
        torch.testing.assert_close(m(x), dense(x), rtol=1e-5, atol=1e-5)


# ====================================================================================== argument checks (issue 14)

@pytest.mark.parametrize("ctor,name,got,expected", [
    (lambda: MaskedLinear(4, 6, units=2.5), "units", 2.5, r"in \[1, 6\] \(the layer's width, an int\)"),
    (lambda: MaskedLinear(4, 6, inputs="4"), "inputs", "4", r"in \[1, 4\]"),
    (lambda: MaskedLinear(4, 6, trainable_inputs=True), "trainable_inputs", True, r"in \[0, 4\]"),
    (lambda: MaskedLinear(0, 6), "in_features", 0, r"an int >= 1"),
    (lambda: MaskedLinear(4, 6.0), "out_features", 6.0, r"an int >= 1"),
    (lambda: MaskedLinear(4, 6, bias=1), "bias", 1, r"True or False"),
    (lambda: MaskedConv2d(3, 6, -1), "kernel_size", -1, r"an int or a pair of ints, each >= 1"),
    (lambda: MaskedConv2d(3, 6, (3, 0)), "kernel_size", (3, 0), r"each >= 1"),
    (lambda: MaskedConv2d(3, 6, 3, stride=0), "stride", 0, r"each >= 1"),
    (lambda: MaskedConv2d(3, 6, 3, padding=-1), "padding", -1, r"each >= 0"),
    (lambda: MaskedConv2d(3, 6, 3, padding="full"), "padding", "full", r"an int or a pair of ints"),
    (lambda: MaskedConv2d(3, 6, 3, dilation=(1, 0)), "dilation", (1, 0), r"each >= 1"),
    (lambda: MaskedConv2d(3, 0, 3), "out_channels", 0, r"an int >= 1"),
    (lambda: MaskedConv2d(3, 6, 3, units=0), "units", 0, r"in \[1, 6\]"),
])
def test_constructor_arguments_are_checked_before_anything_is_built(ctor, name, got, expected):
    with pytest.raises(LayerArgumentError, match=expected) as info:
        ctor()
    e = info.value
    assert isinstance(e, GrowthError) and isinstance(e, ValueError)
    assert (e.name, e.got) == (name, got) and e.layer in ("MaskedLinear", "MaskedConv2d")
    assert f"{name} must be" in str(e) and f"got {got!r}" in str(e)


def test_integer_like_arguments_are_accepted():
    m = MaskedLinear(4, 6, units=torch.tensor(3))
    assert m.trainable_units == 3 and isinstance(m.out_features, int)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_empty_batch_through_backward(kind):
    """A batch of zero samples: empty output and dX, zero weight/bias grads (an empty sum), no error."""
    if kind == "linear":
        m = MaskedLinear(5, 6, units=3)
        x = torch.randn(0, 5, requires_grad=True)
    else:
        m = MaskedConv2d(3, 6, 3, padding=1, units=3)
        x = torch.randn(0, 3, 5, 5, requires_grad=True)
    m.grow(2)
    y = m(x)
    assert y.shape[0] == 0
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.count_nonzero(m.weight.grad) == 0 and torch.count_nonzero(m.bias.grad) == 0
