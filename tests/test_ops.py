"""Tests of the compiled masked ops (torch.ops.pystage.*, wrapped in pystage.ops).

Reference semantics (DESIGN.md, "Masked partial-gradient layers"): a dense
layer whose weight is assembled from the blocks (zeros where rule 2 or
inactivity put them); after a full dense backward the frozen gradients are
zeroed. The ops must match it on the forward values, on the gradients of the
trainable block, and on the input gradient of the columns/channels
``[in_split, in_active)`` (fast path) or ``in_index`` (general path); every
other input-gradient entry is exactly zero by contract.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from pystage import ops as O

from conftest import HAS_CUDA, requires_cuda

P = torch.ops.pystage

# float64 comparisons of two different but exact-in-math evaluation orders (blocked vs dense GEMM/conv).
F64 = dict(rtol=1e-10, atol=1e-12)


# ====================================================================================== cases

@dataclass(frozen=True)
class LinCase:
    batch: int
    n_in: int       # x.size(1)
    frozen: int     # F
    in_split: int
    trainable: int  # T
    in_active: int
    out: int        # out_features (>= F + T; larger means inactive units)

    def __str__(self) -> str:
        return (f"B{self.batch}-in{self.n_in}-F{self.frozen}-split{self.in_split}-T{self.trainable}"
                f"-act{self.in_active}-out{self.out}")


LIN_CASES = [
    LinCase(4, 6, 3, 4, 2, 6, 5),    # frozen + trainable, every unit and input active
    LinCase(3, 5, 0, 0, 3, 5, 3),    # frozen = 0, in_split = 0: a plain dense layer
    LinCase(4, 7, 2, 3, 2, 5, 6),    # inactive output units and inactive inputs
    LinCase(2, 4, 2, 0, 2, 4, 5),    # in_split = 0 with frozen units: they read nothing (bias only)
    LinCase(3, 5, 2, 4, 3, 4, 5),    # in_split = in_active: no input gets a gradient
    LinCase(2, 4, 0, 2, 2, 4, 4),    # frozen = 0 but in_split > 0
]


@dataclass(frozen=True)
class ConvCase:
    batch: int
    n_in: int
    frozen: int
    in_split: int
    trainable: int
    in_active: int
    out: int
    hw: tuple
    kernel: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)

    def __str__(self) -> str:
        return (f"B{self.batch}-C{self.n_in}-F{self.frozen}-split{self.in_split}-T{self.trainable}"
                f"-act{self.in_active}-out{self.out}-k{self.kernel}-s{self.stride}-p{self.padding}-d{self.dilation}")


CONV_CASES = [
    ConvCase(2, 4, 2, 3, 2, 4, 4, (5, 5), (3, 3)),
    ConvCase(2, 3, 0, 0, 2, 3, 2, (5, 4), (3, 3), padding=(1, 1)),                  # frozen = 0: one block
    ConvCase(2, 5, 2, 2, 2, 4, 6, (6, 5), (3, 2), stride=(2, 1), padding=(1, 0)),   # inactive units + inputs
    ConvCase(1, 3, 2, 0, 1, 3, 4, (5, 5), (3, 3), dilation=(2, 1), padding=(2, 1)),  # in_split = 0
    ConvCase(2, 4, 1, 3, 2, 3, 3, (4, 6), (1, 1), stride=(1, 2)),                   # in_split = in_active
    ConvCase(1, 4, 1, 2, 2, 4, 3, (7, 6), (2, 3), stride=(2, 2), padding=(1, 2), dilation=(2, 2)),
]


@dataclass(frozen=True)
class IdxCase:
    batch: int
    n_in: int
    out: int
    out_index: tuple
    in_index: tuple

    def __str__(self) -> str:
        return f"B{self.batch}-in{self.n_in}-out{self.out}-o{list(self.out_index)}-i{list(self.in_index)}"


IDX_CASES = [
    IdxCase(3, 5, 6, (4, 1), (0, 3)),           # unsorted trainable rows, scattered inputs
    IdxCase(2, 4, 3, (0, 1, 2), (0, 1, 2, 3)),  # everything trainable
    IdxCase(3, 5, 4, (2,), ()),                 # no input gradient wanted
    IdxCase(2, 6, 5, (0, 3, 4), (5, 1)),
]

CONV_IDX_CASES = [
    (IdxCase(2, 4, 5, (3, 0), (1, 2)), (3, 3), (1, 1), (1, 1), (1, 1)),
    (IdxCase(1, 3, 4, (1,), ()), (3, 2), (2, 1), (0, 1), (1, 1)),
    (IdxCase(2, 3, 3, (0, 1, 2), (2, 0, 1)), (2, 2), (1, 2), (1, 0), (2, 1)),
]


def _ids(cases):
    return [str(c) for c in cases]


# ====================================================================================== builders

def make_linear(c: LinCase, bias: bool, dtype=torch.float64, device="cpu", grad=True):
    kw = dict(dtype=dtype, device=device)
    x = torch.randn(c.batch, c.n_in, **kw)
    wf = torch.randn(c.frozen, c.in_split, **kw)
    wt = torch.randn(c.trainable, c.in_active, **kw)
    bf = torch.randn(c.frozen, **kw) if bias else None
    bt = torch.randn(c.trainable, **kw) if bias else None
    if grad:
        x.requires_grad_()
        wt.requires_grad_()
        if bt is not None:
            bt.requires_grad_()
    return x, wf, bf, wt, bt


def make_conv(c: ConvCase, bias: bool, dtype=torch.float64, device="cpu", grad=True):
    kw = dict(dtype=dtype, device=device)
    x = torch.randn(c.batch, c.n_in, *c.hw, **kw)
    wf = torch.randn(c.frozen, c.in_split, *c.kernel, **kw)
    wt = torch.randn(c.trainable, c.in_active, *c.kernel, **kw)
    bf = torch.randn(c.frozen, **kw) if bias else None
    bt = torch.randn(c.trainable, **kw) if bias else None
    if grad:
        x.requires_grad_()
        wt.requires_grad_()
        if bt is not None:
            bt.requires_grad_()
    return x, wf, bf, wt, bt


def make_indexed(c: IdxCase, bias: bool, kernel=(), dtype=torch.float64, device="cpu", grad=True):
    kw = dict(dtype=dtype, device=device)
    spatial = (5, 6) if kernel else ()
    x = torch.randn(c.batch, c.n_in, *spatial, **kw)
    weight = torch.randn(c.out, c.n_in, *kernel, **kw)
    weight[list(c.out_index)] = 1e3  # rows named by out_index must be ignored: make them loud
    wt = torch.randn(len(c.out_index), c.n_in, *kernel, **kw)
    b = torch.randn(c.out, **kw) if bias else None
    if b is not None:
        b[list(c.out_index)] = 1e3
    bt = torch.randn(len(c.out_index), **kw) if bias else None
    oi = torch.tensor(c.out_index, dtype=torch.long, device=device)
    ii = torch.tensor(c.in_index, dtype=torch.long, device=device)
    if grad:
        x.requires_grad_()
        wt.requires_grad_()
        if bt is not None:
            bt.requires_grad_()
    return x, weight, b, wt, bt, oi, ii


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(t.requires_grad)


# ====================================================================================== references

def _dense_blocks(shape_out_in, wf, bf, wt, bt, in_split, in_active, out):
    """The dense weight/bias of a fast-path layer: zeros where rule 2 or inactivity put them."""
    F_, T = wf.shape[0], wt.shape[0]
    W = wt.new_zeros(out, *shape_out_in)
    W[:F_, :in_split] = wf
    W[F_:F_ + T, :in_active] = wt.detach()
    b = None
    if bt is not None:
        b = wt.new_zeros(out)
        b[:F_] = bf
        b[F_:F_ + T] = bt.detach()
    return W, b


def reference_fast(kind, x, wf, bf, wt, bt, in_split, out, conv_args=None):
    """Dense forward + full dense backward of sum(y * gy); frozen grads zeroed afterwards.

    Returns y, and the grads (gx, gw_train, gb_train) that the op must reproduce.
    """
    in_active = wt.shape[1]
    W, b = _dense_blocks(x.shape[1:2] + wt.shape[2:], wf, bf, wt, bt, in_split, in_active, out)
    W.requires_grad_()
    if b is not None:
        b.requires_grad_()
    xr = x.detach().clone().requires_grad_()
    if kind == "linear":
        y = F.linear(xr, W, b)
    else:
        s, p, d = conv_args
        y = F.conv2d(xr, W, b, s, p, d)
    return y, W, b, xr


def _check_fast_grads(y_op, x, wt, bt, in_split, F_, y_ref, W, b, xr):
    T, in_active = wt.shape[0], wt.shape[1]
    torch.testing.assert_close(y_op, y_ref.detach(), **F64)
    gy = torch.randn_like(y_ref)
    y_op.backward(gy)
    y_ref.backward(gy)
    # "zero the frozen grads after a full backward": only the trainable block keeps its gradient
    gW = W.grad.clone()
    gW[:F_] = 0
    gW[F_ + T:] = 0
    torch.testing.assert_close(wt.grad, gW[F_:F_ + T, :in_active], **F64)
    if bt is not None:
        torch.testing.assert_close(bt.grad, b.grad[F_:F_ + T], **F64)
    torch.testing.assert_close(x.grad[:, in_split:in_active], xr.grad[:, in_split:in_active], **F64)
    # contract: no dX for frozen inputs [0, in_split) nor for inputs nobody reads [in_active, in)
    assert torch.equal(x.grad[:, :in_split], torch.zeros_like(x.grad[:, :in_split]))
    assert torch.equal(x.grad[:, in_active:], torch.zeros_like(x.grad[:, in_active:]))


# ====================================================================================== opcheck

# opcheck's test_aot_dispatch_dynamic traces the op (and its registered autograd) through AOTAutograd with
# dynamic shapes: ~0.5 s a call on this machine. It runs on a representative case of every op ("full");
# the cheap utilities (schema incl. mutation/aliasing, autograd registration, fake-tensor kernel against the
# real one) run on every case.
CHEAP = ("test_schema", "test_autograd_registration", "test_faketensor")
FULL = CHEAP + ("test_aot_dispatch_dynamic",)


def _opcheck(op, args, full: bool):
    opcheck(op, args, test_utils=FULL if full else CHEAP)


def _cases_with_bias(cases, full_at):
    """(case, bias, full) params: both bias settings for every case; the full opcheck where (index, bias) in full_at."""
    return [pytest.param(c, bias, (i, bias) in full_at, id=f"{c}-{'bias' if bias else 'nobias'}")
            for i, c in enumerate(cases) for bias in (True, False)]


@pytest.mark.parametrize("c,bias,full", _cases_with_bias(LIN_CASES, {(0, True), (3, False)}))
def test_opcheck_masked_linear(c, bias, full):
    x, wf, bf, wt, bt = make_linear(c, bias, dtype=torch.float32)
    _opcheck(P.masked_linear.default, (x, wf, bf, wt, bt, c.in_split, c.out), full)


@pytest.mark.parametrize("c,bias,full", _cases_with_bias(CONV_CASES, {(2, False), (5, True)}))
def test_opcheck_masked_conv2d(c, bias, full):
    x, wf, bf, wt, bt = make_conv(c, bias, dtype=torch.float32)
    _opcheck(P.masked_conv2d.default,
             (x, wf, bf, wt, bt, c.in_split, c.out, list(c.stride), list(c.padding), list(c.dilation)), full)


# Masks with several outputs off: each off output must be its own empty tensor (opcheck's schema test
# rejects aliased outputs).
MASKS = [[True, True, True], [False, True, True], [True, False, False], [False, False, True]]


@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("c", LIN_CASES, ids=_ids(LIN_CASES))
def test_opcheck_masked_linear_backward(c, mask):
    x, _, _, wt, _ = make_linear(c, False, dtype=torch.float32, grad=False)
    g = torch.randn(c.batch, c.out)
    _opcheck(P.masked_linear_backward.default, (g, x, wt, c.in_split, c.frozen, mask),
             full=c is LIN_CASES[0] and all(mask))


@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("c", CONV_CASES, ids=_ids(CONV_CASES))
def test_opcheck_masked_conv2d_backward(c, mask):
    x, _, _, wt, _ = make_conv(c, False, dtype=torch.float32, grad=False)
    y = O.masked_conv2d(x, torch.zeros(c.frozen, c.in_split, *c.kernel), None, wt, None, c.in_split, c.out,
                        c.stride, c.padding, c.dilation)
    g = torch.randn_like(y)
    _opcheck(P.masked_conv2d_backward.default,
             (g, x, wt, c.in_split, c.frozen, list(c.stride), list(c.padding), list(c.dilation), mask),
             full=c is CONV_CASES[2] and all(mask))


@pytest.mark.parametrize("c,bias,full", _cases_with_bias(IDX_CASES, {(0, True), (2, False)}))
def test_opcheck_masked_linear_indexed(c, bias, full):
    _opcheck(P.masked_linear_indexed.default, make_indexed(c, bias, dtype=torch.float32), full)


@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("c", IDX_CASES, ids=_ids(IDX_CASES))
def test_opcheck_masked_linear_indexed_backward(c, mask):
    x, weight, _, wt, _, oi, ii = make_indexed(c, False, dtype=torch.float32, grad=False)
    _opcheck(P.masked_linear_indexed_backward.default, (torch.randn(c.batch, c.out), x, weight, wt, oi, ii, mask),
             full=c is IDX_CASES[0] and all(mask))


_CONV_IDX_PARAMS = [pytest.param(*case, bias, (i, bias) in {(0, True), (1, False)},
                                 id=f"{case[0]}-{'bias' if bias else 'nobias'}")
                    for i, case in enumerate(CONV_IDX_CASES) for bias in (True, False)]


@pytest.mark.parametrize("c,kernel,stride,padding,dilation,bias,full", _CONV_IDX_PARAMS)
def test_opcheck_masked_conv2d_indexed(c, kernel, stride, padding, dilation, bias, full):
    args = make_indexed(c, bias, kernel=kernel, dtype=torch.float32)
    _opcheck(P.masked_conv2d_indexed.default, args + (list(stride), list(padding), list(dilation)), full)


@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("c,kernel,stride,padding,dilation", CONV_IDX_CASES,
                         ids=[str(c[0]) for c in CONV_IDX_CASES])
def test_opcheck_masked_conv2d_indexed_backward(c, kernel, stride, padding, dilation, mask):
    x, weight, _, wt, _, oi, ii = make_indexed(c, False, kernel=kernel, dtype=torch.float32, grad=False)
    g = torch.randn_like(F.conv2d(x, weight, None, stride, padding, dilation))
    conv = (list(stride), list(padding), list(dilation))
    _opcheck(P.masked_conv2d_indexed_backward.default, (g, x, weight, wt, oi, ii, *conv, mask),
             full=c is CONV_IDX_CASES[0][0] and all(mask))


@pytest.mark.parametrize("out_ends,in_ends,shape", [
    ([2, 5], [3, 6], (5, 6)),
    ([1, 3, 4], [2, 2, 5], (4, 5, 3, 3)),   # conv weight, a step that adds no inputs
    ([0, 4], [1, 3], (4, 3)),               # an empty first step
    ([4], [3], (4, 3)),                     # one step: nothing to mask
])
def test_opcheck_block_triangular_mask(out_ends, in_ends, shape):
    _opcheck(P.block_triangular_mask_.default, (torch.randn(shape), out_ends, in_ends), full=len(shape) == 4)


# ====================================================================================== block_triangular_mask_

@pytest.mark.parametrize("out_ends,in_ends,shape", [
    ([2, 5], [3, 6], (5, 6)),
    ([1, 3, 4], [2, 2, 5], (4, 5, 3, 3)),
    ([0, 4], [1, 3], (4, 3)),
    ([1, 2, 3], [1, 2, 3], (3, 3)),
])
def test_block_triangular_mask_matches_rule_2(out_ends, in_ends, shape):
    w = torch.randn(shape, dtype=torch.float64)
    expected = w.clone()
    o0 = 0
    for o1, i1 in zip(out_ends, in_ends):  # rows of step s keep only the columns of steps <= s
        expected[o0:o1, i1:] = 0
        o0 = o1
    ret = O.block_triangular_mask_(w, out_ends, in_ends)
    assert ret is w  # in place
    assert torch.equal(w, expected)
    # idempotent
    assert torch.equal(O.block_triangular_mask_(w.clone(), out_ends, in_ends), expected)


# ====================================================================================== reference semantics

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("c", LIN_CASES, ids=_ids(LIN_CASES))
def test_masked_linear_matches_dense_reference(c, bias, device):
    x, wf, bf, wt, bt = make_linear(c, bias, device=device)
    y = O.masked_linear(x, wf, bf, wt, bt, c.in_split, c.out)
    assert y.shape == (c.batch, c.out)
    assert torch.equal(y[:, c.frozen + c.trainable:], torch.zeros_like(y[:, c.frozen + c.trainable:]))
    y_ref, W, b, xr = reference_fast("linear", x, wf, bf, wt, bt, c.in_split, c.out)
    _check_fast_grads(y, x, wt, bt, c.in_split, c.frozen, y_ref, W, b, xr)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("c", CONV_CASES, ids=_ids(CONV_CASES))
def test_masked_conv2d_matches_dense_reference(c, bias, device):
    x, wf, bf, wt, bt = make_conv(c, bias, device=device)
    y = O.masked_conv2d(x, wf, bf, wt, bt, c.in_split, c.out, c.stride, c.padding, c.dilation)
    assert torch.equal(y[:, c.frozen + c.trainable:], torch.zeros_like(y[:, c.frozen + c.trainable:]))
    y_ref, W, b, xr = reference_fast("conv", x, wf, bf, wt, bt, c.in_split, c.out,
                                     (c.stride, c.padding, c.dilation))
    assert y.shape == y_ref.shape
    _check_fast_grads(y, x, wt, bt, c.in_split, c.frozen, y_ref, W, b, xr)


def _gradcheck_fast(fn, x, wt, bt, in_split, in_active):
    """gradcheck over the trainable-input columns of x (the rest is a constant) and the trainable block."""
    x = x.detach()
    old, tail = x[:, :in_split], x[:, in_active:]
    inputs = [wt.detach().clone().requires_grad_()]
    if bt is not None:
        inputs.append(bt.detach().clone().requires_grad_())
    has_x = in_active > in_split
    if has_x:
        inputs.insert(0, x[:, in_split:in_active].clone().requires_grad_())

    def f(*args):
        args = list(args)
        x_tr = args.pop(0) if has_x else x[:, in_split:in_active]
        w = args.pop(0)
        b = args.pop(0) if bt is not None else None
        return fn(torch.cat([old, x_tr, tail], dim=1), w, b)

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("c", LIN_CASES, ids=_ids(LIN_CASES))
def test_masked_linear_gradcheck(c, bias):
    x, wf, bf, wt, bt = make_linear(c, bias, grad=False)
    _gradcheck_fast(lambda xx, w, b: O.masked_linear(xx, wf, bf, w, b, c.in_split, c.out),
                    x, wt, bt, c.in_split, c.in_active)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("c", CONV_CASES, ids=_ids(CONV_CASES))
def test_masked_conv2d_gradcheck(c, bias):
    x, wf, bf, wt, bt = make_conv(c, bias, grad=False)
    _gradcheck_fast(lambda xx, w, b: O.masked_conv2d(xx, wf, bf, w, b, c.in_split, c.out,
                                                     c.stride, c.padding, c.dilation),
                    x, wt, bt, c.in_split, c.in_active)


def _check_indexed(y, x, weight, bias, wt, bt, oi, ii, dense):
    W = weight.clone()
    W[oi] = wt.detach()
    W.requires_grad_()
    b = None
    if bias is not None:
        b = bias.clone()
        b[oi] = bt.detach()
        b.requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y_ref = dense(xr, W, b)
    torch.testing.assert_close(y, y_ref.detach(), **F64)
    gy = torch.randn_like(y_ref)
    y.backward(gy)
    y_ref.backward(gy)
    torch.testing.assert_close(wt.grad, W.grad[oi], **F64)
    if bt is not None:
        torch.testing.assert_close(bt.grad, b.grad[oi], **F64)
    expected_gx = torch.zeros_like(xr.grad)
    expected_gx[:, ii] = xr.grad[:, ii]
    torch.testing.assert_close(x.grad, expected_gx, **F64)
    rest = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
    rest[ii] = False
    assert torch.equal(x.grad[:, rest], torch.zeros_like(x.grad[:, rest]))  # exactly zero, not just close


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("c", IDX_CASES, ids=_ids(IDX_CASES))
def test_masked_linear_indexed_matches_dense_reference(c, bias, device):
    x, weight, b, wt, bt, oi, ii = make_indexed(c, bias, device=device)
    y = O.masked_linear_indexed(x, weight, b, wt, bt, oi, ii)
    _check_indexed(y, x, weight, b, wt, bt, oi, ii, F.linear)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("c,kernel,stride,padding,dilation", CONV_IDX_CASES,
                         ids=[str(c[0]) for c in CONV_IDX_CASES])
def test_masked_conv2d_indexed_matches_dense_reference(c, kernel, stride, padding, dilation, bias, device):
    x, weight, b, wt, bt, oi, ii = make_indexed(c, bias, kernel=kernel, device=device)
    y = O.masked_conv2d_indexed(x, weight, b, wt, bt, oi, ii, stride, padding, dilation)
    _check_indexed(y, x, weight, b, wt, bt, oi, ii,
                   lambda xx, w, bb: F.conv2d(xx, w, bb, stride, padding, dilation))


def _gradcheck_indexed(fn, x, wt, bt, ii):
    x = x.detach()
    inputs = [wt.detach().clone().requires_grad_()]
    if bt is not None:
        inputs.append(bt.detach().clone().requires_grad_())
    has_x = ii.numel() > 0
    if has_x:
        inputs.insert(0, x.index_select(1, ii).clone().requires_grad_())

    def f(*args):
        args = list(args)
        xx = x.index_copy(1, ii, args.pop(0)) if has_x else x
        w = args.pop(0)
        b = args.pop(0) if bt is not None else None
        return fn(xx, w, b)

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("c", IDX_CASES, ids=_ids(IDX_CASES))
def test_masked_linear_indexed_gradcheck(c, bias):
    x, weight, b, wt, bt, oi, ii = make_indexed(c, bias, grad=False)
    weight.uniform_(-1, 1)  # keep the numerical derivative well conditioned (make_indexed puts 1e3 there)
    if b is not None:
        b.uniform_(-1, 1)
    _gradcheck_indexed(lambda xx, w, bb: O.masked_linear_indexed(xx, weight, b, w, bb, oi, ii), x, wt, bt, ii)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("c,kernel,stride,padding,dilation", CONV_IDX_CASES,
                         ids=[str(c[0]) for c in CONV_IDX_CASES])
def test_masked_conv2d_indexed_gradcheck(c, kernel, stride, padding, dilation, bias):
    x, weight, b, wt, bt, oi, ii = make_indexed(c, bias, kernel=kernel, grad=False)
    weight.uniform_(-1, 1)
    if b is not None:
        b.uniform_(-1, 1)
    _gradcheck_indexed(lambda xx, w, bb: O.masked_conv2d_indexed(xx, weight, b, w, bb, oi, ii,
                                                                 stride, padding, dilation), x, wt, bt, ii)


def test_fast_path_and_indexed_path_agree():
    """The contiguous newest block expressed as index sets gives the same values and grads."""
    c = LIN_CASES[2]
    x, wf, bf, wt, bt = make_linear(c, True)
    y = O.masked_linear(x, wf, bf, wt, bt, c.in_split, c.out)
    y.sum().backward()
    W, b = _dense_blocks((c.n_in,), wf, bf, wt, bt, c.in_split, c.in_active, c.out)
    # the indexed path has no in_active notion: trainable rows read every input, so pad w_train with zeros
    wt2 = torch.zeros(c.trainable, c.n_in, dtype=torch.float64)
    wt2[:, :c.in_active] = wt.detach()
    wt2.requires_grad_()
    bt2 = bt.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    oi = torch.arange(c.frozen, c.frozen + c.trainable)
    ii = torch.arange(c.in_split, c.in_active)
    y2 = O.masked_linear_indexed(x2, W, b, wt2, bt2, oi, ii)
    y2.sum().backward()
    torch.testing.assert_close(y, y2, **F64)
    torch.testing.assert_close(x.grad, x2.grad, **F64)
    torch.testing.assert_close(wt.grad, wt2.grad[:, :c.in_active], **F64)
    torch.testing.assert_close(bt.grad, bt2.grad, **F64)


def test_only_needed_grads_are_returned():
    """x without requires_grad: only the weight grads run; b_train None: no bias grad."""
    c = LIN_CASES[0]
    x, wf, bf, wt, bt = make_linear(c, False)
    x = x.detach()
    y = O.masked_linear(x, wf, bf, wt, bt, c.in_split, c.out)
    y.sum().backward()
    assert wt.grad is not None and x.grad is None
    # nothing requires grad: the output is not part of a graph
    y2 = O.masked_linear(x, wf, bf, wt.detach(), None, c.in_split, c.out)
    assert not y2.requires_grad


# ====================================================================================== backward paths

# path 0: masked (least work), 1: dense-then-discard, 2: masked with the bias fused into the weight GEMM (CUDA
# linear; elsewhere the same as 0). The autotuner picks one per shape; every one must give the reference grads.
PATHS = [0, 1, 2]


def _check_path_grads(grads, mask, W, b, xr, F_, T, in_split, in_active):
    gx, gw, gb = grads
    if mask[1]:
        torch.testing.assert_close(gw, W.grad[F_:F_ + T, :in_active], **F64)
    if mask[2]:
        torch.testing.assert_close(gb, b.grad[F_:F_ + T], **F64)
    if mask[0]:
        torch.testing.assert_close(gx[:, in_split:in_active], xr.grad[:, in_split:in_active], **F64)
        assert torch.count_nonzero(gx[:, :in_split]) == 0 and torch.count_nonzero(gx[:, in_active:]) == 0
    for want, g in zip(mask, grads):
        assert want or g.numel() == 0  # an output not asked for is empty


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]], ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("c", LIN_CASES, ids=_ids(LIN_CASES))
def test_masked_linear_backward_paths_match_reference(c, path, mask):
    x, wf, bf, wt, bt = make_linear(c, True, grad=False)
    y, W, b, xr = reference_fast("linear", x, wf, bf, wt, bt, c.in_split, c.out)
    gy = torch.randn_like(y)
    y.backward(gy)
    grads = P.masked_linear_backward(gy, x, wt, c.in_split, c.frozen, mask, path)
    _check_path_grads(grads, mask, W, b, xr, c.frozen, c.trainable, c.in_split, c.in_active)


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]], ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("c", CONV_CASES, ids=_ids(CONV_CASES))
def test_masked_conv2d_backward_paths_match_reference(c, path, mask):
    x, wf, bf, wt, bt = make_conv(c, True, grad=False)
    conv = (c.stride, c.padding, c.dilation)
    y, W, b, xr = reference_fast("conv", x, wf, bf, wt, bt, c.in_split, c.out, conv)
    gy = torch.randn_like(y)
    y.backward(gy)
    grads = P.masked_conv2d_backward(gy, x, wt, c.in_split, c.frozen, *map(list, conv), mask, path)
    _check_path_grads(grads, mask, W, b, xr, c.frozen, c.trainable, c.in_split, c.in_active)


@pytest.mark.parametrize("path", [1, 2])
def test_opcheck_backward_paths(path):
    c = LIN_CASES[0]
    x, _, _, wt, _ = make_linear(c, False, dtype=torch.float32, grad=False)
    _opcheck(P.masked_linear_backward.default, (torch.randn(c.batch, c.out), x, wt, c.in_split, c.frozen,
                                                [True, True, True], path), full=False)
    k = CONV_CASES[0]
    x, _, _, wt, _ = make_conv(k, False, dtype=torch.float32, grad=False)
    g = torch.randn(k.batch, k.out, 3, 3)
    _opcheck(P.masked_conv2d_backward.default, (g, x, wt, k.in_split, k.frozen, [1, 1], [0, 0], [1, 1],
                                                [True, True, True], path), full=False)


def test_backward_path_out_of_range():
    x, wt, g = torch.randn(3, 6), torch.randn(2, 6), torch.randn(3, 7)
    with pytest.raises(RuntimeError, match=r"path must be 0 \(masked\), 1 \(dense-then-discard\) or 2"):
        P.masked_linear_backward(g, x, wt, 4, 2, [True, True, True], 3)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_empty_batch_backward_is_zero(kind, path):
    """An empty batch: empty dX, zero dW and db (an empty sum), on every path."""
    if kind == "linear":
        x, wt, g = torch.randn(0, 6), torch.randn(2, 6), torch.randn(0, 7)
        gx, gw, gb = P.masked_linear_backward(g, x, wt, 4, 2, [True, True, True], path)
    else:
        x, wt, g = torch.randn(0, 4, 5, 5), torch.randn(2, 4, 3, 3), torch.randn(0, 5, 5, 5)
        gx, gw, gb = P.masked_conv2d_backward(g, x, wt, 3, 2, [1, 1], [1, 1], [1, 1], [True, True, True], path)
    assert gx.shape == x.shape and gw.shape == wt.shape and gb.shape == (2,)
    assert torch.count_nonzero(gw) == 0 and torch.count_nonzero(gb) == 0


# ====================================================================================== low precision

# fp16 / bf16 vs a float32 reference computed from the *same rounded inputs* (upcast), so only the op's
# own rounding is measured: the output rounding (fp16 eps 2^-10 ~ 1e-3, bf16 eps 2^-7 ~ 7.8e-3) plus
# accumulation over <= 3*3*4 = 36 products if a kernel accumulates in low precision (CPU kernels
# accumulate in fp32, but that is not a guarantee we want to test). Tolerances: ~10 eps relative to
# the output scale: fp16 1e-2, bf16 6e-2. A wrong block, a missing bias or a transposed weight is an
# O(1) error and still fails.
LOWP = {torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _assert_lowp_close(actual, expected, tol):
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", list(LOWP), ids=str)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_low_precision_matches_float32(kind, dtype):
    tol = LOWP[dtype]
    if kind == "linear":
        c = LIN_CASES[2]
        x, wf, bf, wt, bt = make_linear(c, True, dtype=dtype, grad=False)
        op = lambda *a: O.masked_linear(*a, c.in_split, c.out)  # noqa: E731
    else:
        c = CONV_CASES[2]
        x, wf, bf, wt, bt = make_conv(c, True, dtype=dtype, grad=False)
        op = lambda *a: O.masked_conv2d(*a, c.in_split, c.out, c.stride, c.padding, c.dilation)  # noqa: E731
    lo = [t.requires_grad_() if t is not None and i in (0, 3, 4) else t for i, t in enumerate((x, wf, bf, wt, bt))]
    hi = [None if t is None else t.detach().float().requires_grad_(t.requires_grad) for t in lo]
    y_lo, y_hi = op(*lo), op(*hi)
    assert y_lo.dtype == dtype
    _assert_lowp_close(y_lo, y_hi.detach(), tol)
    gy = torch.randn_like(y_hi)
    y_lo.backward(gy.to(dtype))
    y_hi.backward(gy.to(dtype).float())
    for i in (0, 3, 4):
        assert lo[i].grad.dtype == dtype
        _assert_lowp_close(lo[i].grad, hi[i].grad, tol)


@pytest.mark.parametrize("dtype", list(LOWP), ids=str)
def test_low_precision_indexed_matches_float32(dtype):
    tol = LOWP[dtype]
    c = IDX_CASES[0]
    x, weight, b, wt, bt, oi, ii = make_indexed(c, True, dtype=dtype, grad=False)
    weight.uniform_(-1, 1)
    b.uniform_(-1, 1)
    lo = [x.requires_grad_(), weight, b, wt.requires_grad_(), bt.requires_grad_()]
    hi = [t.detach().float().requires_grad_(t.requires_grad) for t in lo]
    y_lo = O.masked_linear_indexed(*lo, oi, ii)
    y_hi = O.masked_linear_indexed(*hi, oi, ii)
    _assert_lowp_close(y_lo, y_hi.detach(), tol)
    gy = torch.randn_like(y_hi).to(dtype)
    y_lo.backward(gy)
    y_hi.backward(gy.float())
    for i in (0, 3, 4):
        _assert_lowp_close(lo[i].grad, hi[i].grad, tol)


# ====================================================================================== backward skips frozen work

def test_backward_flops_scale_with_trainable_block():
    """If FlopCounterMode can see inside the custom op, backward must cost 2*B*T*(2*in_active - in_split)."""
    from torch.utils.flop_counter import FlopCounterMode

    B, n_in, Fz, T, out = 8, 32, 24, 4, 32
    x = torch.randn(B, n_in, requires_grad=True)
    wf = torch.randn(Fz, 28)
    wt = torch.randn(T, n_in, requires_grad=True)
    y = O.masked_linear(x, wf, None, wt, None, 28, out)
    g = torch.randn_like(y)
    with FlopCounterMode(display=False) as counter:
        y.backward(g)
    total = counter.get_total_flops()
    if total == 0:
        pytest.skip("FlopCounterMode does not see inside the compiled pystage ops (opaque custom op)")
    assert total == 2 * B * T * n_in + 2 * B * T * (n_in - 28)


# ====================================================================================== bad inputs

def _lin_base():
    c = LinCase(3, 6, 2, 4, 2, 6, 5)
    x, wf, bf, wt, bt = make_linear(c, True, dtype=torch.float32, grad=False)
    return dict(x=x, wf=wf, bf=bf, wt=wt, bt=bt, in_split=4, out=5)


def _lin_call(a):
    return O.masked_linear(a["x"], a["wf"], a["bf"], a["wt"], a["bt"], a["in_split"], a["out"])


LIN_ERRORS = {
    "x rank": (dict(x=torch.randn(3, 6, 1)), r"x must be a 2-D tensor"),
    "w_frozen rank": (dict(wf=torch.randn(2, 4, 1)), r"w_frozen must be a 2-D tensor"),
    "w_train rank": (dict(wt=torch.randn(2, 6, 1)), r"w_train must be a 2-D tensor"),
    "x int dtype": (dict(x=torch.ones(3, 6, dtype=torch.int32)), r"x must be float32"),
    "dtype mix w_train": (dict(wt=torch.randn(2, 6, dtype=torch.float64)), r"w_train has dtype .*Double"),
    "dtype mix w_frozen": (dict(wf=torch.randn(2, 4, dtype=torch.float16)), r"w_frozen has dtype"),
    "dtype mix bias": (dict(bt=torch.randn(2, dtype=torch.float64)), r"b_train has dtype"),
    "non-contiguous x": (dict(x=torch.randn(6, 3).t()), r"x must be contiguous"),
    "non-contiguous w_train": (dict(wt=torch.randn(6, 2).t()), r"w_train must be contiguous"),
    "in_split too big": (dict(in_split=7), r"in_split must be in \[0, 6\]"),
    "in_split negative": (dict(in_split=-1), r"in_split must be in"),
    "w_frozen width != in_split": (dict(wf=torch.randn(2, 3)), r"w_frozen\.size\(1\) must be 4"),
    "w_train wider than x": (dict(wt=torch.randn(2, 7)), r"w_train\.size\(1\).*must be in \[1, 6\]"),
    "empty trainable set": (dict(wt=torch.randn(0, 6), bt=torch.randn(0)), r"w_train has 0 rows"),
    "output width too small": (dict(out=3), r"active output units.*must be in \[1, 3\]"),
    "b_train shape": (dict(bt=torch.randn(3)), r"b_train\.size\(0\) must be 2"),
    "b_frozen shape": (dict(bf=torch.randn(5)), r"b_frozen\.size\(0\) must be 2"),
    "b_frozen rank": (dict(bf=torch.randn(2, 1)), r"b_frozen must be a 1-D tensor"),
    "bias only frozen": (dict(bt=None), r"b_frozen and b_train must both be given"),
    "bias only train": (dict(bf=None), r"b_frozen and b_train must both be given"),
}


@pytest.mark.parametrize("name", list(LIN_ERRORS))
def test_masked_linear_rejects_bad_input(name):
    change, match = LIN_ERRORS[name]
    a = _lin_base()
    a.update(change)
    with pytest.raises(RuntimeError, match=match):
        _lin_call(a)


def _conv_base():
    c = ConvCase(2, 4, 2, 3, 2, 4, 5, (6, 6), (3, 3))
    x, wf, bf, wt, bt = make_conv(c, True, dtype=torch.float32, grad=False)
    return dict(x=x, wf=wf, bf=bf, wt=wt, bt=bt, in_split=3, out=5, stride=(1, 1), padding=(1, 1), dilation=(1, 1))


def _conv_call(a):
    return O.masked_conv2d(a["x"], a["wf"], a["bf"], a["wt"], a["bt"], a["in_split"], a["out"],
                           a["stride"], a["padding"], a["dilation"])


CONV_ERRORS = {
    "x rank": (dict(x=torch.randn(2, 4, 6)), r"x must be a 4-D tensor"),
    "w_train rank": (dict(wt=torch.randn(2, 4, 3)), r"w_train must be a 4-D tensor"),
    "w_frozen rank": (dict(wf=torch.randn(2, 3, 3)), r"w_frozen must be a 4-D tensor"),
    "dtype mix": (dict(x=torch.randn(2, 4, 6, 6, dtype=torch.float64)), r"w_frozen has dtype"),
    "non-contiguous x": (dict(x=torch.randn(2, 6, 6, 4).permute(0, 3, 1, 2)), r"x must be contiguous"),
    "stride zero": (dict(stride=(0, 1)), r"stride must be >= 1"),
    "stride 3 entries": (dict(stride=(1, 1, 1)), r"stride must have 2 entries"),
    "padding negative": (dict(padding=(1, -1)), r"padding must be >= 0"),
    "dilation zero": (dict(dilation=(0, 1)), r"dilation must be >= 1"),
    "kernel mismatch": (dict(wf=torch.randn(2, 3, 1, 1)), r"w_frozen and w_train must share a kernel size"),
    "in_split out of range": (dict(in_split=5), r"in_split must be in \[0, 4\]"),
    "output width too small": (dict(out=3), r"active output units"),
    "b_train shape": (dict(bt=torch.randn(1)), r"b_train\.size\(0\) must be 2"),
    "empty trainable set": (dict(wt=torch.randn(0, 4, 3, 3), bt=torch.randn(0)), r"w_train has 0 rows"),
}


@pytest.mark.parametrize("name", list(CONV_ERRORS))
def test_masked_conv2d_rejects_bad_input(name):
    change, match = CONV_ERRORS[name]
    a = _conv_base()
    a.update(change)
    with pytest.raises(RuntimeError, match=match):
        _conv_call(a)


def _idx_base(conv=False):
    c = IdxCase(2, 5, 6, (4, 1), (0, 3))
    x, w, b, wt, bt, oi, ii = make_indexed(c, True, kernel=(3, 3) if conv else (), dtype=torch.float32, grad=False)
    return dict(x=x, w=w, b=b, wt=wt, bt=bt, oi=oi, ii=ii)


def _idx_call(a, conv=False):
    if conv:
        return O.masked_conv2d_indexed(a["x"], a["w"], a["b"], a["wt"], a["bt"], a["oi"], a["ii"],
                                       a.get("stride", (1, 1)))
    return O.masked_linear_indexed(a["x"], a["w"], a["b"], a["wt"], a["bt"], a["oi"], a["ii"])


IDX_ERRORS = {
    "out_index out of range": (dict(oi=torch.tensor([6, 1])), r"out_index holds unit indices in \[1, 6\].*\[0, 5\]"),
    "out_index negative": (dict(oi=torch.tensor([-1, 1])), r"out_index holds unit indices"),
    "out_index repeated": (dict(oi=torch.tensor([1, 1])), r"out_index holds repeated unit indices"),
    "out_index empty": (dict(oi=torch.tensor([], dtype=torch.long), wt=torch.randn(0, 5), bt=torch.randn(0)),
                        r"out_index is empty"),
    "out_index int32": (dict(oi=torch.tensor([4, 1], dtype=torch.int32)), r"out_index must be int64"),
    "out_index rank": (dict(oi=torch.tensor([[4, 1]])), r"out_index must be a 1-D tensor"),
    "out_index non-contiguous": (dict(oi=torch.tensor([4, 0, 1, 0])[::2]), r"out_index must be contiguous"),
    "in_index out of range": (dict(ii=torch.tensor([0, 5])), r"in_index holds unit indices .*\[0, 4\]"),
    "in_index repeated": (dict(ii=torch.tensor([3, 3])), r"in_index holds repeated"),
    "w_train rows != out_index": (dict(wt=torch.randn(3, 5)), r"w_train\.size\(0\) must be 2"),
    "weight width != x": (dict(w=torch.randn(6, 4)), r"weight\.size\(1\) must be 5"),
    "x rank": (dict(x=torch.randn(2, 5, 1)), r"x must be a 2-D tensor"),
    "dtype mix": (dict(wt=torch.randn(2, 5, dtype=torch.float64)), r"w_train has dtype"),
    "non-contiguous x": (dict(x=torch.randn(5, 2).t()), r"x must be contiguous"),
    "bias shape": (dict(b=torch.randn(5)), r"bias\.size\(0\) must be 6"),
    "b_train shape": (dict(bt=torch.randn(3)), r"b_train\.size\(0\) must be 2"),
    "bias without b_train": (dict(bt=None), r"bias and b_train must both be given"),
}


@pytest.mark.parametrize("name", list(IDX_ERRORS))
def test_masked_linear_indexed_rejects_bad_input(name):
    change, match = IDX_ERRORS[name]
    a = _idx_base()
    a.update(change)
    with pytest.raises(RuntimeError, match=match):
        _idx_call(a)


CONV_IDX_ERRORS = {
    "x rank": (dict(x=torch.randn(2, 5, 6)), r"x must be a 4-D tensor"),
    "weight rank": (dict(w=torch.randn(6, 5, 3)), r"weight must be a 4-D tensor"),
    "w_train kernel": (dict(wt=torch.randn(2, 5, 3, 1)), r"w_train\.size\(3\) must be 3"),
    "stride zero": (dict(stride=(0, 0)), r"stride must be >= 1"),
    "out_index repeated": (dict(oi=torch.tensor([4, 4])), r"out_index holds repeated"),
    "in_index out of range": (dict(ii=torch.tensor([7])), r"in_index holds unit indices"),
}


@pytest.mark.parametrize("name", list(CONV_IDX_ERRORS))
def test_masked_conv2d_indexed_rejects_bad_input(name):
    change, match = CONV_IDX_ERRORS[name]
    a = _idx_base(conv=True)
    a.update(change)
    with pytest.raises(RuntimeError, match=match):
        _idx_call(a, conv=True)


def test_index_values_are_checked_once_per_version():
    """Range/repeat checks read indices on the host (a sync on CUDA): once per index tensor and version."""
    a = _idx_base()
    _idx_call(a)  # valid: checked and remembered
    _idx_call(a)  # remembered: no second read
    a["oi"][0] = 7  # an in-place change is a new version: checked again
    with pytest.raises(RuntimeError, match=r"out_index holds unit indices in \[1, 7\]"):
        _idx_call(a)
    a["oi"][0] = 1  # repeated index, again a new version
    with pytest.raises(RuntimeError, match=r"out_index holds repeated unit indices \(1 appears twice\)"):
        _idx_call(a)


BACKWARD_ERRORS = {
    "grad_out dtype": (lambda x, wt, g: (g.double(), x, wt, 4, 2), r"grad_out has dtype"),
    "grad_out rank": (lambda x, wt, g: (g[..., None], x, wt, 4, 2), r"grad_out must be a 2-D tensor"),
    "grad_out non-contiguous": (lambda x, wt, g: (torch.randn(7, 3).t(), x, wt, 4, 2), r"grad_out must be contiguous"),
    "in_split out of range": (lambda x, wt, g: (g, x, wt, 7, 2), r"in_split must be in \[0, 6\]"),
    "out_frozen too big": (lambda x, wt, g: (g, x, wt, 4, 6), r"out_frozen \+ trainable units must be in \[1, 7\]"),
    "empty w_train": (lambda x, wt, g: (g, x, wt[:0], 4, 2), r"w_train has 0 rows"),
}


@pytest.mark.parametrize("name", list(BACKWARD_ERRORS))
def test_masked_linear_backward_rejects_bad_input(name):
    make, match = BACKWARD_ERRORS[name]
    x, wt, g = torch.randn(3, 6), torch.randn(2, 6), torch.randn(3, 7)
    with pytest.raises(RuntimeError, match=match):
        P.masked_linear_backward(*make(x, wt, g), [True, True, True])


def test_masked_linear_backward_rejects_batch_mismatch():
    x, wt, g = torch.randn(3, 6), torch.randn(2, 6), torch.randn(5, 7)
    with pytest.raises(RuntimeError, match=r"grad_out"):
        P.masked_linear_backward(g, x, wt, 4, 2, [True, False, False])


def test_masked_linear_backward_rejects_negative_out_frozen():
    x, wt, g = torch.randn(3, 6), torch.randn(2, 6), torch.randn(3, 7)
    with pytest.raises(RuntimeError, match=r"out_frozen"):
        P.masked_linear_backward(g, x, wt, 4, -1, [True, True, True])


BTM_ERRORS = {
    "not ending at size": (lambda: (torch.randn(5, 6), [2, 4], [3, 6]),
                           r"out_ends must end at the layer's unit count 5"),
    "decreasing": (lambda: (torch.randn(5, 6), [2, 5], [3, 2, 6]), r"in_ends\[1\] must be in \[3, 6\]"),
    "beyond size": (lambda: (torch.randn(5, 6), [2, 7], [3, 6]), r"out_ends\[1\] must be in \[2, 5\]"),
    "empty ends": (lambda: (torch.randn(5, 6), [], []), r"out_ends must end"),
    "different step counts": (lambda: (torch.randn(5, 6), [2, 5], [1, 3, 6]), r"same growth steps"),
    "int weight": (lambda: (torch.ones(5, 6, dtype=torch.int64), [5], [6]), r"weight must be float32"),
    "1-D weight": (lambda: (torch.randn(5), [5], [5]), r"weight must have at least 2 dims"),
    "non-contiguous": (lambda: (torch.randn(6, 5).t(), [5], [6]), r"weight must be contiguous"),
}


@pytest.mark.parametrize("name", list(BTM_ERRORS))
def test_block_triangular_mask_rejects_bad_input(name):
    make, match = BTM_ERRORS[name]
    w, o, i = make()
    before = w.clone()
    with pytest.raises(RuntimeError, match=match):
        O.block_triangular_mask_(w, o, i)
    assert torch.equal(w, before)  # a rejected call leaves the weight alone


@requires_cuda
def test_device_mix_is_rejected():
    a = _lin_base()
    a["wt"] = a["wt"].cuda()
    with pytest.raises(RuntimeError, match=r"w_train is on cuda"):
        _lin_call(a)
    b = _idx_base()
    b["oi"] = b["oi"].cuda()
    with pytest.raises(RuntimeError, match=r"out_index is on cuda"):
        _idx_call(b)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("c", LIN_CASES[:3], ids=_ids(LIN_CASES[:3]))
def test_cuda_matches_cpu(c):
    x, wf, bf, wt, bt = make_linear(c, True, dtype=torch.float64)
    y = O.masked_linear(x, wf, bf, wt, bt, c.in_split, c.out)
    y.sum().backward()
    cu = [t.detach().cuda().requires_grad_(t.requires_grad) for t in (x, wf, bf, wt, bt)]
    yc = O.masked_linear(*cu, c.in_split, c.out)
    yc.sum().backward()
    torch.testing.assert_close(yc.cpu(), y, **F64)
    for i in (0, 3, 4):
        torch.testing.assert_close(cu[i].grad.cpu(), (x, wf, bf, wt, bt)[i].grad, **F64)


# ====================================================================================== frozen growth steps

def _stepped_linear():
    """Frozen block of two growth steps: rows [0, 2) read inputs [0, 3), rows [2, 5) read [0, 5)."""
    x = torch.randn(4, 8, dtype=torch.float64)
    wf = torch.randn(5, 5, dtype=torch.float64)
    wf[:2, 3:] = 0  # rule 2: the older step ignores the newer inputs
    wt = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    return x, wf, wt


def test_frozen_steps_match_one_block_and_dense():
    x, wf, wt = _stepped_linear()
    y_steps = O.masked_linear(x, wf, None, wt, None, 5, 9, [2, 5], [3, 5])
    y_block = O.masked_linear(x, wf, None, wt, None, 5, 9)
    torch.testing.assert_close(y_steps, y_block, rtol=1e-12, atol=1e-12)
    # each step's rows equal a GEMM of exactly that step's shape (what it computed while it trained)
    assert torch.equal(y_steps[:, :2], x[:, :3] @ wf[:2, :3].t())


def test_opcheck_masked_linear_with_steps():
    x, wf, wt = _stepped_linear()
    torch.library.opcheck(P.masked_linear.default, (x.float(), wf.float(), None, wt.detach().float().requires_grad_(),
                                                    None, 5, 9, [2, 5], [3, 5]))


@pytest.mark.parametrize("rows,cols,match", [
    ([2], [3, 5], "frozen_rows and frozen_cols"),
    ([3, 2], [3, 5], r"frozen_rows\[1\]"),
    ([2, 5], [4, 3], r"frozen_cols\[1\]"),
    ([2, 4], [3, 5], "last growth step"),
    ([2, 5], [3, 6], r"frozen_cols\[1\]"),
])
def test_bad_frozen_steps(rows, cols, match):
    x, wf, wt = _stepped_linear()
    with pytest.raises(RuntimeError, match=match):
        O.masked_linear(x, wf, None, wt, None, 5, 9, rows, cols)
