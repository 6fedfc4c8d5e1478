"""CUDA kernels of the masked ops (csrc/cuda/): every op on CUDA against the same op on CPU.

Skipped without a CUDA device. The four device kernels are reached through the
ops: gather/scatter through the indexed ops, the bias-gradient reduction
through backward (both of its layouts: linear/small spatial size = "columns",
conv with >= 32 output pixels = "rows"; one split and several), and the
block-triangular mask directly.

Reference: the CPU op on the same (dtype-rounded) inputs; in float32 for
float16/bfloat16, in the same dtype for float32/float64. TF32 is switched off
for the comparisons.

PYSTAGE_CUDA_TEST_DEVICE=cpu runs this file's logic on CPU (CPU against CPU),
a dry run for editing these tests on a machine without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

import pystage._ext as ext
import pystage.ops as ops

DEVICE = os.environ.get("PYSTAGE_CUDA_TEST_DEVICE", "cuda")
DRY_RUN = DEVICE == "cpu"
HAVE_DEVICE = DRY_RUN or torch.cuda.is_available()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAVE_DEVICE, reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_ids = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
_pystage = torch.ops.pystage


def _dt_id(d: torch.dtype) -> str:
    return _ids[d]


@pytest.fixture(autouse=True)
def _no_tf32():
    """Exact float32 GEMMs/convolutions on CUDA, so float32 can be compared tightly."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------- helpers

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale


def _subset(n: int, k: int, seed: int) -> torch.Tensor:
    """k distinct indices out of n, in random (unsorted) order."""
    return torch.randperm(n, generator=_gen(seed))[:k].to(torch.int64)


def _ref_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _tol(dtype: torch.dtype) -> tuple[float, float]:
    return {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2),
            torch.bfloat16: (5e-2, 5e-2)}[dtype]


def _close(actual: torch.Tensor | None, expected: torch.Tensor | None, dtype: torch.dtype, what: str) -> None:
    assert (actual is None) == (expected is None), f"{what}: one side is None"
    if actual is None:
        return
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    rtol, atol = _tol(dtype)
    exp = expected.detach().double().cpu()
    scale = max(1.0, exp.abs().max().item()) if exp.numel() else 1.0
    torch.testing.assert_close(actual.detach().double().cpu(), exp, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _run(fn, args, grad_of, device, dtype, round_to=None, seed=99):
    """fn(*args) with float tensors cast to dtype on device; backward with a seeded grad_out.

    args: CPU float64 tensors (already rounded to the dtype under test), int64 index tensors, None or plain
    values. grad_out is drawn in float64 and rounded to `round_to` (default dtype) before the cast, so a
    float32 reference sees the same grad_out as a float16 run. grad_of: indices into args whose gradient is
    returned. Returns (output, [grads]).
    """
    leaves = {}
    call = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            t = a.to(dtype).to(device).requires_grad_(i in grad_of)
            leaves[i] = t
            call.append(t)
        elif isinstance(a, torch.Tensor):
            call.append(a.to(device))
        else:
            call.append(a)
    out = fn(*call)
    if grad_of:
        gy = _randn(*out.shape, seed=seed).to(round_to or dtype).to(dtype).to(device)
        out.backward(gy)
    return out.detach(), [leaves[i].grad for i in grad_of]


def _compare_op(fn, args, grad_of, dtype, what):
    """The op on DEVICE in dtype vs the op on CPU in the reference dtype, on the same rounded inputs."""
    rounded = [a.to(dtype).double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    out, grads = _run(fn, rounded, grad_of, DEVICE, dtype)
    ref_out, ref_grads = _run(fn, rounded, grad_of, "cpu", _ref_dtype(dtype), round_to=dtype)
    assert out.device.type == torch.device(DEVICE).type
    _close(out, ref_out, dtype, f"{what}: output")
    for i, g, r in zip(grad_of, grads, ref_grads):
        _close(g, r, dtype, f"{what}: grad of argument {i}")


def _dev(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.to(DEVICE) if dtype is None else t.to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------------------------- loaded

@pytest.mark.skipif(DRY_RUN, reason="dry run on CPU")
def test_cuda_kernels_loaded():
    assert ext.HAS_CUDA_KERNELS, "pystage._C_cuda is missing or failed to load: build with a CUDA toolkit"
    for op in ("masked_linear", "masked_linear_backward", "masked_conv2d", "masked_conv2d_backward",
               "masked_linear_indexed", "masked_linear_indexed_backward", "masked_conv2d_indexed",
               "masked_conv2d_indexed_backward", "block_triangular_mask_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pystage::{op}", "CUDA"), op
    for op in ("masked_linear", "masked_conv2d"):  # C++ autograd (csrc/autograd.cpp) covers CUDA too
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pystage::{op}", "AutogradCUDA"), op


# ---------------------------------------------------------------------------------------------- masked_linear

# (batch, in_features, out_features, frozen F, in_split, trainable T, in_active, bias)
LINEAR = [
    (8, 12, 10, 3, 4, 5, 9, True),
    (8, 12, 10, 0, 0, 6, 12, True),       # nothing frozen
    (5, 7, 7, 2, 7, 3, 7, False),         # no trainable inputs: grad_x all zero
    (4096, 24, 40, 8, 8, 16, 16, True),   # bias grad over many rows: several splits
]


def _linear_args(B, n_in, n_out, F, in_split, T, in_active, bias, seed=0):
    return [_randn(B, n_in, seed=seed), _randn(F, in_split, seed=seed + 1, scale=0.3),
            _randn(F, seed=seed + 2) if bias else None, _randn(T, in_active, seed=seed + 3, scale=0.3),
            _randn(T, seed=seed + 4) if bias else None, in_split, n_out]


@pytest.mark.parametrize("dtype", FLOATS, ids=_dt_id)
@pytest.mark.parametrize("case", LINEAR, ids=lambda c: "x".join(map(str, c[:7])) + ("b" if c[7] else ""))
def test_masked_linear_matches_cpu(case, dtype):
    args = _linear_args(*case)
    grad_of = [0, 3] + ([4] if case[7] else [])
    _compare_op(ops.masked_linear, args, grad_of, dtype, f"masked_linear{case}")


@pytest.mark.parametrize("dtype", FLOATS, ids=_dt_id)
@pytest.mark.parametrize("mask", [[True, True, True], [False, False, True], [True, False, False], [False, True, True]])
def test_masked_linear_backward_op(mask, dtype):
    """The backward op called directly with each output_mask; bias grad over a channel range starting at F."""
    B, n_in, n_out, F, in_split, T, in_active = 300, 10, 14, 4, 3, 6, 8
    g, x, wt = _randn(B, n_out, seed=1), _randn(B, n_in, seed=2), _randn(T, in_active, seed=3)
    res = _pystage.masked_linear_backward(_dev(g, dtype), _dev(x, dtype), _dev(wt, dtype), in_split, F, mask)
    rd = _ref_dtype(dtype)
    ref = _pystage.masked_linear_backward(g.to(dtype).to(rd), x.to(dtype).to(rd), wt.to(dtype).to(rd), in_split, F, mask)
    for k, (r, e) in enumerate(zip(res, ref)):
        if mask[k]:
            _close(r, e, dtype, f"masked_linear_backward mask={mask} output {k}")
        else:
            assert r.numel() == 0, f"output {k} must be empty when output_mask[{k}] is False"
    if mask[2]:  # and against the plain sum
        want = g.to(dtype).double()[:, F:F + T].sum(0)
        _close(res[2], want, dtype, "bias grad vs sum")


# ---------------------------------------------------------------------------------------------- masked_conv2d

# (B, C, H, W, out, F, in_split, T, in_active, k, stride, padding, dilation, bias)
CONV = [
    (2, 6, 8, 8, 7, 2, 3, 3, 5, 3, 1, 1, 1, True),     # 64 output pixels: rows kernel, one split
    (64, 4, 16, 16, 8, 2, 2, 4, 4, 3, 1, 1, 1, True),  # rows kernel, several splits
    (3, 5, 6, 6, 6, 1, 2, 4, 5, 3, 2, 1, 1, True),     # 9 output pixels: columns kernel
    (2, 4, 9, 9, 5, 0, 0, 5, 4, 3, 1, 2, 2, False),    # nothing frozen, dilation
    (300, 3, 4, 4, 4, 1, 1, 3, 3, 1, 1, 0, 1, True),   # 16 pixels, many rows: columns kernel, several splits
]


def _conv_args(B, C, H, W, n_out, F, in_split, T, in_active, k, s, p, d, bias, seed=0):
    return [_randn(B, C, H, W, seed=seed), _randn(F, in_split, k, k, seed=seed + 1, scale=0.3),
            _randn(F, seed=seed + 2) if bias else None, _randn(T, in_active, k, k, seed=seed + 3, scale=0.3),
            _randn(T, seed=seed + 4) if bias else None, in_split, n_out, (s, s), (p, p), (d, d)]


@pytest.mark.parametrize("dtype", FLOATS, ids=_dt_id)
@pytest.mark.parametrize("case", CONV, ids=lambda c: "x".join(map(str, c[:13])) + ("b" if c[13] else ""))
def test_masked_conv2d_matches_cpu(case, dtype):
    args = _conv_args(*case)
    grad_of = [0, 3] + ([4] if case[13] else [])
    _compare_op(ops.masked_conv2d, args, grad_of, dtype, f"masked_conv2d{case}")


@pytest.mark.parametrize("dtype", FLOATS, ids=_dt_id)
@pytest.mark.parametrize("hw", [2, 6, 12], ids=lambda v: f"{v}x{v}")
def test_conv_bias_grad_op(hw, dtype):
    """bias grad of the conv backward op against the plain sum, both kernel layouts."""
    B, C, n_out, F, T, k = 40, 3, 9, 3, 5, 1
    g, x, wt = _randn(B, n_out, hw, hw, seed=5), _randn(B, C, hw, hw, seed=6), _randn(T, C, k, k, seed=7)
    _, _, gb = _pystage.masked_conv2d_backward(_dev(g, dtype), _dev(x, dtype), _dev(wt, dtype), 1, F, [1, 1], [0, 0],
                                               [1, 1], [False, False, True])
    _close(gb, g.to(dtype).double()[:, F:F + T].sum((0, 2, 3)), dtype, f"conv bias grad {hw}x{hw}")


# ---------------------------------------------------------------------------------------------- backward paths

# path 0 masked (least work: strided GEMMs; conv: the grad slice copied with db in the same pass, dX padded in one
# write), 1 dense-then-discard, 2 masked with db in the dW GEMM's epilogue (cuBLASLt BGRADB; linear only, falls
# back to 0 where cuBLASLt has no algorithm). Each on CUDA against path 0 on CPU.
PATHS = [0, 1, 2]

# (B, in, out, F, in_split, T, in_active): F odd makes the grad block start at an odd element (unaligned for
# cuBLASLt); in_active < in leaves x a strided column block.
LINEAR_PATHS = [
    (64, 24, 40, 8, 8, 16, 16),
    (33, 12, 10, 3, 4, 5, 9),
    (512, 32, 48, 0, 0, 48, 32),   # nothing frozen: full-width grad
]


@pytest.mark.parametrize("dtype", FLOATS, ids=_dt_id)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", LINEAR_PATHS, ids=lambda c: "x".join(map(str, c)))
def test_masked_linear_backward_paths(case, path, dtype):
    B, n_in, n_out, F, in_split, T, in_active = case
    g, x, wt = _randn(B, n_out, seed=11), _randn(B, n_in, seed=12), _randn(T, in_active, seed=13, scale=0.3)
    mask = [True, True, True]
    res = _pystage.masked_linear_backward(_dev(g, dtype), _dev(x, dtype), _dev(wt, dtype), in_split, F, mask, path)
    rd = _ref_dtype(dtype)
    ref = _pystage.masked_linear_backward(g.to(dtype).to(rd), x.to(dtype).to(rd), wt.to(dtype).to(rd), in_split, F,
                                          mask, 0)
    for k, (r, e) in enumerate(zip(res, ref)):
        _close(r, e, dtype, f"masked_linear_backward path {path} output {k}")
    assert not res[0][:, :in_split].any() and not res[0][:, in_active:].any()


# (B, C, H, W, out, F, in_split, T, in_active, k, stride, padding): maps of >= 32 pixels take the fused copy+db
# kernel (one split or several), smaller ones the plain copy; in_split > 0 and in_active < C the one-write pad.
CONV_PATHS = [
    (2, 6, 8, 8, 7, 2, 3, 3, 5, 3, 1, 1),
    (64, 8, 16, 16, 12, 3, 5, 6, 8, 3, 1, 1),   # several splits of the fused reduction
    (3, 5, 6, 6, 6, 1, 2, 4, 5, 3, 2, 1),       # 9 output pixels: plain copy, column reduction
    (2, 4, 9, 9, 5, 0, 0, 5, 4, 3, 1, 2),       # nothing frozen, every input: the dense call on the block
]


@pytest.mark.parametrize("dtype", FLOATS, ids=_dt_id)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CONV_PATHS, ids=lambda c: "x".join(map(str, c)))
def test_masked_conv2d_backward_paths(case, path, dtype):
    B, C, H, W, n_out, F, in_split, T, in_active, k, s, p = case
    x, wt = _randn(B, C, H, W, seed=21), _randn(T, in_active, k, k, seed=22, scale=0.3)
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    g = _randn(B, n_out, Ho, Wo, seed=23)
    conv, mask = ([s, s], [p, p], [1, 1]), [True, True, True]
    res = _pystage.masked_conv2d_backward(_dev(g, dtype), _dev(x, dtype), _dev(wt, dtype), in_split, F, *conv, mask,
                                          path)
    rd = _ref_dtype(dtype)
    ref = _pystage.masked_conv2d_backward(g.to(dtype).to(rd), x.to(dtype).to(rd), wt.to(dtype).to(rd), in_split, F,
                                          *conv, mask, 0)
    for k_, (r, e) in enumerate(zip(res, ref)):
        _close(r, e, dtype, f"masked_conv2d_backward path {path} output {k_}")
    assert not res[0][:, :in_split].any() and not res[0][:, in_active:].any()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_autotuned_layer_matches_dense_reference(kind):
    """A masked layer trained on the device: whichever path the tuner picks, grads equal the dense layer's."""
    from torch import nn

    from pystage.layers import MaskedConv2d, MaskedLinear

    torch.manual_seed(0)
    if kind == "linear":
        dense = nn.Linear(64, 48, dtype=torch.float64)
        m = MaskedLinear.from_dense(dense, trainable_units=16, trainable_inputs=24).to(DEVICE)
        x = _randn(32, 64, seed=31)
    else:
        dense = nn.Conv2d(16, 24, 3, padding=1, dtype=torch.float64)
        m = MaskedConv2d.from_dense(dense, trainable_units=8, trainable_inputs=4).to(DEVICE)
        x = _randn(8, 16, 12, 12, seed=31)
    # the reference: the dense layer the masked one computes (rule 2 zeroed the frozen units' newer inputs)
    W = m.dense_weight().cpu().requires_grad_()
    b = m.dense_bias().cpu().requires_grad_()
    xd = x.detach().clone().to(DEVICE).requires_grad_()  # a copy even on the CPU dry run
    y = m(xd)
    gy = _randn(*y.shape, seed=32)
    y.backward(gy.to(DEVICE))
    xr = x.clone().requires_grad_()
    ref = torch.nn.functional.linear(xr, W, b) if kind == "linear" else torch.nn.functional.conv2d(xr, W, b, padding=1)
    ref.backward(gy)
    F_, split = m.frozen_units, m.in_split
    _close(y, ref, torch.float64, "forward")
    _close(m.weight.grad, W.grad[F_:], torch.float64, "weight grad")
    _close(m.bias.grad, b.grad[F_:], torch.float64, "bias grad")
    _close(xd.grad[:, split:], xr.grad[:, split:], torch.float64, "grad of the trainable inputs")
    assert not xd.grad[:, :split].any()


@pytest.mark.skipif(DRY_RUN, reason="host syncs are a CUDA matter")
def test_no_host_sync_per_step():
    """After the first step (index checks, path tuning), a step of masked layers never waits on the device."""
    from torch import nn

    from pystage.layers import MaskedConv2d, MaskedLinear

    conv = MaskedConv2d.from_dense(nn.Conv2d(8, 12, 3, padding=1), trainable_units=4, trainable_inputs=4).cuda()
    lin = MaskedLinear.from_dense(nn.Linear(12 * 36, 10), trainable_units=5, trainable_inputs=12 * 36).cuda()
    ix = _linear_ix_args(16, 10, 12, 5, 4, True)
    x_ix, w_ix, b_ix, wt_ix, bt_ix = (_dev(a, torch.float32) for a in ix[:5])
    wt_ix.requires_grad_()
    oi, ii = _dev(ix[5]), _dev(ix[6])
    x = torch.randn(4, 8, 6, 6, device="cuda", requires_grad=True)

    def step():
        y = lin(conv(x).flatten(1))
        z = ops.masked_linear_indexed(x_ix, w_ix, b_ix, wt_ix, bt_ix, oi, ii)
        (y.sum() + z.sum()).backward()

    step()  # validates the indices once, tunes the backward paths
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------------- indexed (gather/scatter)

# (B, in, out, T, K, bias)
LINEAR_IX = [
    (6, 10, 12, 5, 4, True),
    (6, 10, 12, 12, 10, True),   # everything trainable
    (3, 10, 12, 3, 0, False),    # no input gradient wanted
    (2048, 16, 24, 7, 5, True),  # bias grad of the gathered rows, several splits
]


def _linear_ix_args(B, n_in, n_out, T, K, bias, seed=0):
    return [_randn(B, n_in, seed=seed), _randn(n_out, n_in, seed=seed + 1, scale=0.3),
            _randn(n_out, seed=seed + 2) if bias else None, _randn(T, n_in, seed=seed + 3, scale=0.3),
            _randn(T, seed=seed + 4) if bias else None, _subset(n_out, T, seed + 5), _subset(n_in, K, seed + 6)]


@pytest.mark.parametrize("dtype", FLOATS, ids=_dt_id)
@pytest.mark.parametrize("case", LINEAR_IX, ids=lambda c: "x".join(map(str, c[:5])) + ("b" if c[5] else ""))
def test_masked_linear_indexed_matches_cpu(case, dtype):
    args = _linear_ix_args(*case)
    grad_of = [0, 3] + ([4] if case[5] else [])
    _compare_op(ops.masked_linear_indexed, args, grad_of, dtype, f"masked_linear_indexed{case}")


# (B, C, H, W, out, T, K, k, stride, padding, bias)
CONV_IX = [
    (2, 5, 7, 7, 6, 3, 2, 3, 1, 1, True),
    (4, 3, 8, 8, 4, 4, 3, 1, 1, 0, False),
    (3, 4, 10, 10, 9, 2, 0, 3, 2, 1, True),
]


def _conv_ix_args(B, C, H, W, n_out, T, K, k, s, p, bias, seed=0):
    return [_randn(B, C, H, W, seed=seed), _randn(n_out, C, k, k, seed=seed + 1, scale=0.3),
            _randn(n_out, seed=seed + 2) if bias else None, _randn(T, C, k, k, seed=seed + 3, scale=0.3),
            _randn(T, seed=seed + 4) if bias else None, _subset(n_out, T, seed + 5), _subset(C, K, seed + 6),
            (s, s), (p, p), (1, 1)]


@pytest.mark.parametrize("dtype", FLOATS, ids=_dt_id)
@pytest.mark.parametrize("case", CONV_IX, ids=lambda c: "x".join(map(str, c[:10])) + ("b" if c[10] else ""))
def test_masked_conv2d_indexed_matches_cpu(case, dtype):
    args = _conv_ix_args(*case)
    grad_of = [0, 3] + ([4] if case[10] else [])
    _compare_op(ops.masked_conv2d_indexed, args, grad_of, dtype, f"masked_conv2d_indexed{case}")


@pytest.mark.parametrize("dtype", FLOATS, ids=_dt_id)
def test_indexed_forward_is_scatter(dtype):
    """Forward = dense layer with rows out_index replaced by w_train's."""
    x, w, b, wt, bt, oi, ii = _linear_ix_args(5, 6, 9, 4, 2, True, seed=11)
    y = ops.masked_linear_indexed(_dev(x, dtype), _dev(w, dtype), _dev(b, dtype), _dev(wt, dtype), _dev(bt, dtype),
                                  _dev(oi), _dev(ii))
    dense = torch.nn.functional.linear(_dev(x, dtype), _dev(w, dtype), _dev(b, dtype))
    train = torch.nn.functional.linear(_dev(x, dtype), _dev(wt, dtype), _dev(bt, dtype))
    keep = torch.ones(9, dtype=torch.bool)
    keep[oi] = False
    _close(y[:, keep.to(DEVICE)], dense[:, keep.to(DEVICE)], dtype, "frozen rows")
    _close(y[:, _dev(oi)], train, dtype, "trainable rows (scattered)")


@pytest.mark.parametrize("dtype", FLOATS, ids=_dt_id)
def test_indexed_unaligned_storage(dtype):
    """Tensors at an odd storage offset: the copy kernels must fall back to narrower units."""
    x, w, b, wt, bt, oi, ii, *_ = _conv_ix_args(2, 3, 5, 5, 5, 2, 2, 3, 1, 1, True, seed=21)

    def odd(t):  # same values, storage offset of one element
        buf = torch.empty(t.numel() + 1, dtype=dtype, device=DEVICE)
        v = buf[1:].view(t.shape)
        v.copy_(t.to(dtype))
        return v

    def run(make):
        xs, wts, bts = make(x).requires_grad_(), make(wt).requires_grad_(), make(bt).requires_grad_()
        out = ops.masked_conv2d_indexed(xs, make(w), make(b), wts, bts, _dev(oi), _dev(ii), (1, 1), (1, 1), (1, 1))
        out.backward(_randn(*out.shape, seed=5).to(dtype).to(DEVICE))
        return out.detach(), xs.grad, wts.grad, bts.grad

    for k, (got, want) in enumerate(zip(run(odd), run(lambda t: _dev(t, dtype)))):
        _close(got, want, dtype, f"unaligned storage, result {k}")


# ---------------------------------------------------------------------------------------------- block-triangular mask

MASKS = [
    ((6, 5), [2, 4, 6], [1, 3, 5]),
    ((6, 5, 3, 3), [2, 2, 6], [1, 3, 5]),       # an empty output step
    ((4, 8), [4], [8]),                         # one step: nothing zeroed
    ((70, 40, 1, 3), [10, 30, 70], [0, 20, 40]),
    ((33, 17, 5, 5), [1, 2, 3, 33], [4, 4, 10, 17]),
]


@pytest.mark.parametrize("dtype", FLOATS, ids=_dt_id)
@pytest.mark.parametrize("case", MASKS, ids=lambda c: "x".join(map(str, c[0])) + f"-{len(c[1])}steps")
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
def test_block_triangular_mask_matches_cpu(case, dtype, offset):
    shape, out_ends, in_ends = case
    w = _randn(*shape, seed=3).to(dtype)
    ref = w.clone()
    ops.block_triangular_mask_(ref, out_ends, in_ends)
    buf = torch.zeros(w.numel() + offset + 4, dtype=dtype, device=DEVICE)
    buf[offset:offset + w.numel()] = w.reshape(-1).to(DEVICE)
    dw = buf[offset:offset + w.numel()].view(shape)
    assert dw.is_contiguous()
    res = ops.block_triangular_mask_(dw, out_ends, in_ends)
    assert res is dw
    assert torch.equal(dw.cpu(), ref)
    assert not buf[:offset].any() and not buf[offset + w.numel():].any(), "wrote outside the weight"


# ---------------------------------------------------------------------------------------------- streams, devices, errors

def test_bias_grad_deterministic():
    g, x, wt = _randn(5000, 20, seed=1), _randn(5000, 8, seed=2), _randn(6, 8, seed=3)
    args = (_dev(g, torch.float32), _dev(x, torch.float32), _dev(wt, torch.float32), 2, 4, [False, False, True])
    a = _pystage.masked_linear_backward(*args)[2]
    b = _pystage.masked_linear_backward(*args)[2]
    assert torch.equal(a, b)


@pytest.mark.skipif(DRY_RUN, reason="CUDA streams")
def test_runs_on_current_stream():
    args = _linear_ix_args(512, 16, 24, 7, 5, True, seed=4)
    ref, ref_grads = _run(ops.masked_linear_indexed, args, [0, 3, 4], DEVICE, torch.float32)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out, grads = _run(ops.masked_linear_indexed, args, [0, 3, 4], DEVICE, torch.float32)
    s.synchronize()
    _close(out, ref, torch.float32, "output on a side stream")
    for g, r in zip(grads, ref_grads):
        _close(g, r, torch.float32, "grad on a side stream")


@pytest.mark.skipif(DRY_RUN or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels must run on the tensors' device."""
    x, w, b, wt, bt, oi, ii = _linear_ix_args(8, 10, 12, 5, 4, True, seed=8)
    d1 = torch.device("cuda:1")
    with torch.cuda.device(0):
        y1 = ops.masked_linear_indexed(x.float().to(d1), w.float().to(d1), b.float().to(d1), wt.float().to(d1),
                                       bt.float().to(d1), oi.to(d1), ii.to(d1))
        w1 = _randn(6, 5, seed=1).float().to(d1)
        ops.block_triangular_mask_(w1, [2, 6], [1, 5])
    y0 = ops.masked_linear_indexed(x.float(), w.float(), b.float(), wt.float(), bt.float(), oi, ii)
    torch.testing.assert_close(y1.cpu(), y0)
    assert y1.device == d1
    assert not w1[:2, 1:].any()


@pytest.mark.skipif(DRY_RUN, reason="device mismatch needs CUDA")
def test_index_on_wrong_device_is_rejected():
    x, w, b, wt, bt, oi, ii = _linear_ix_args(4, 6, 8, 3, 2, True)
    with pytest.raises(RuntimeError, match="out_index is on cpu"):
        ops.masked_linear_indexed(_dev(x, torch.float32), _dev(w, torch.float32), _dev(b, torch.float32),
                                  _dev(wt, torch.float32), _dev(bt, torch.float32), oi, _dev(ii))


@pytest.mark.skipif(DRY_RUN, reason="device mismatch needs CUDA")
def test_mixed_devices_are_rejected():
    x, wf, bf, wt, bt, in_split, n_out = _linear_args(8, 12, 10, 3, 4, 5, 9, True)
    with pytest.raises(RuntimeError, match="one device"):
        ops.masked_linear(_dev(x, torch.float32), wf.float(), _dev(bf, torch.float32), _dev(wt, torch.float32),
                          _dev(bt, torch.float32), in_split, n_out)


# ---------------------------------------------------------------------------------------------- opcheck

def _opcheck_cases():
    f = torch.float32
    lin = _linear_args(8, 12, 10, 3, 4, 5, 9, True)
    conv = _conv_args(2, 6, 8, 8, 7, 2, 3, 3, 5, 3, 1, 1, 1, True)
    lix = _linear_ix_args(6, 10, 12, 5, 4, True)
    cix = _conv_ix_args(2, 5, 7, 7, 6, 3, 2, 3, 1, 1, True)

    def dev(args, grad_of=()):
        return tuple(_dev(a, f).requires_grad_(i in grad_of) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     else _dev(a) if isinstance(a, torch.Tensor) else list(a) if isinstance(a, tuple) else a
                     for i, a in enumerate(args))

    mask = [True, True, True]
    return {
        "masked_linear": (_pystage.masked_linear.default, dev(lin, (0, 3, 4))),
        "masked_linear_backward": (_pystage.masked_linear_backward.default,
         dev((_randn(8, 10, seed=9), lin[0], lin[3], 4, 3, mask))),
        "masked_conv2d": (_pystage.masked_conv2d.default, dev(conv, (0, 3, 4))),
        "masked_conv2d_backward": (_pystage.masked_conv2d_backward.default,
         dev((_randn(2, 7, 8, 8, seed=9), conv[0], conv[3], 3, 2, (1, 1), (1, 1), (1, 1), mask))),
        "masked_linear_indexed": (_pystage.masked_linear_indexed.default, dev(lix, (0, 3, 4))),
        "masked_linear_indexed_backward": (_pystage.masked_linear_indexed_backward.default,
         dev((_randn(6, 12, seed=9), lix[0], lix[1], lix[3], lix[5], lix[6], mask))),
        "masked_conv2d_indexed": (_pystage.masked_conv2d_indexed.default, dev(cix, (0, 3, 4))),
        "masked_conv2d_indexed_backward": (_pystage.masked_conv2d_indexed_backward.default,
         dev((_randn(2, 6, 7, 7, seed=9), cix[0], cix[1], cix[3], cix[5], cix[6], (1, 1), (1, 1), (1, 1), mask))),
        "block_triangular_mask_": (_pystage.block_triangular_mask_.default,
         dev((_randn(6, 5, 3, 3, seed=9), [2, 4, 6], [1, 3, 5]))),
    }


OPCHECK = ["masked_linear", "masked_linear_backward", "masked_conv2d", "masked_conv2d_backward", "masked_linear_indexed",
           "masked_linear_indexed_backward", "masked_conv2d_indexed", "masked_conv2d_indexed_backward",
           "block_triangular_mask_"]


@pytest.mark.parametrize("name", OPCHECK)
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)
