"""The direct CPU kernels of the masked conv2d backward (few trainable units) agree with oneDNN's path."""
import pytest
import torch

from pystage import ops

GEOMETRIES = [
    # (B, C, H, W, T, in_split, k, padding)
    (3, 7, 9, 13, 3, 4, 3, 1),   # odd width: vector tail
    (2, 5, 8, 8, 2, 5, 3, 0),    # valid padding, no trainable inputs
    (2, 4, 6, 11, 1, 0, 1, 0),   # 1x1, every input trainable
    (2, 6, 10, 9, 3, 3, 5, 2),   # 5x5 same
    (2, 6, 7, 7, 2, 6, 5, 1),    # 5x5, padding smaller than "same"
    (2, 6, 9, 11, 9, 2, 3, 1),   # 9 units: register blocks of 8 (AVX-512) or 4 (AVX2) and a remainder
    (2, 5, 7, 8, 13, 3, 5, 2),   # 13 units, 5x5: smaller blocks (5 x 5 accumulators per unit)
    (3, 4, 6, 6, 7, 1, 1, 0),    # 1x1, 7 units
]


def _grads(x, wf, wt, split, out, padding, g, direct: bool, monkeypatch):
    monkeypatch.setenv("PYSTAGE_CONV_DIRECT_MAX_UNITS", "64" if direct else "0")
    x = x.detach().requires_grad_()
    wt = wt.detach().requires_grad_()
    y = ops.masked_conv2d(x, wf, None, wt, None, split, out, (1, 1), (padding, padding), (1, 1))
    y.backward(g)
    return x.grad, wt.grad


@pytest.mark.parametrize("isa", ["best", "avx2", "generic"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_direct_matches_onednn(geometry, isa, monkeypatch):
    """Every instruction-set variant of the kernels (the CPU's best, AVX2's 16-register blocks, plain C++)."""
    if isa != "best":
        monkeypatch.setenv("PYSTAGE_CONV_DIRECT_ISA", isa)
    B, C, H, W, T, split, k, p = geometry
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=gen)
    wf = torch.randn(4, split, k, k, generator=gen)
    wt = torch.randn(T, C, k, k, generator=gen)
    out = 4 + T + 1
    Ho, Wo = H + 2 * p - k + 1, W + 2 * p - k + 1
    g = torch.randn(B, out, Ho, Wo, generator=gen)
    gx_d, gw_d = _grads(x, wf, wt, split, out, p, g, True, monkeypatch)
    gx_a, gw_a = _grads(x, wf, wt, split, out, p, g, False, monkeypatch)
    torch.testing.assert_close(gw_d, gw_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx_d, gx_a, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(gx_d[:, :split]) == 0


def test_direct_matches_float64_reference(monkeypatch):
    """Against the dense layer in float64: dW of the trainable rows, dX of the trainable inputs."""
    monkeypatch.setenv("PYSTAGE_CONV_DIRECT_MAX_UNITS", "64")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 12, 12, generator=gen)
    wt = torch.randn(3, 6, 3, 3, generator=gen, requires_grad=True)
    wf = torch.randn(3, 4, 3, 3, generator=gen)
    xg = x.clone().requires_grad_()
    y = ops.masked_conv2d(xg, wf, None, wt, None, 4, 6, (1, 1), (1, 1), (1, 1))
    g = torch.randn_like(y)
    y.backward(g)
    dense = torch.zeros(6, 6, 3, 3, dtype=torch.float64)
    dense[:3, :4] = wf.double()
    dense[3:] = wt.detach().double()
    dense.requires_grad_()
    xr = x.double().requires_grad_()
    torch.nn.functional.conv2d(xr, dense, padding=1).backward(g.double())
    torch.testing.assert_close(wt.grad.double(), dense.grad[3:], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(xg.grad[:, 4:].double(), xr.grad[:, 4:], rtol=1e-5, atol=1e-4)
