"""pystage.memory: the meta estimate of a stage's training step against real steps."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from pystage.memory import LiveBytes, ProfileError, linear_head, pooled_head, profile
from pystage.memory.step import build_stage, real_copy, training_step

HAS_GPU = torch.cuda.is_available()


def small_net() -> nn.Sequential:
    """conv/BN/ReLU/pool/linear: every kind of layer the planner meets, on 3x8x8 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),           # 0-2   (8, 8, 8)
        nn.MaxPool2d(2),                                                       # 3     (8, 4, 4)
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),                            # 4-5   (16, 4, 4)
        nn.Conv2d(16, 16, 1), nn.ReLU(),                                       # 6-7
        nn.Flatten(), nn.Linear(256, 32), nn.ReLU(),                           # 8-10  (32,)
    )


SPANS = [(0, 11), (0, 3), (3, 11), (4, 8), (8, 11), (3, 4), (6, 11)]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("head", [linear_head, pooled_head])
def test_estimate_matches_real_step_on_cpu(optimizer, head):
    net = small_net()
    kw = dict(optimizer=optimizer, head=head, num_classes=5)
    est, real = profile(net, (3, 8, 8), 4, **kw), profile(net, (3, 8, 8), 4, source="measure", **kw)
    for span in SPANS:
        e, m = est.stage(*span), real.stage(*span)
        assert e.source == "estimate" and m.source == "cpu"
        assert abs(e.peak - m.peak) <= 0.10 * m.peak, span
        assert e.resident == m.resident, span
        assert m.rss_peak is not None and m.rss_peak > 0


def test_measured_step_agrees_with_torch_memtracker():
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    net, cpu = small_net(), torch.device("cpu")
    prof = profile(net, (3, 8, 8), 4, source="measure")
    stage = build_stage(real_copy(list(net)[3:11], cpu, torch.float32), prof.shapes[3], prof.shapes[11], 4, cpu,
                        torch.float32, "adam", 10, linear_head)
    mt = mem_tracker.MemTracker()
    mt.track_external(stage.body, stage.head, stage.optimizer, stage.x, stage.y)
    with mt:
        training_step(stage)
    theirs = mt.get_tracker_snapshot("peak")[cpu]["Total"]
    assert abs(prof.stage(3, 11).peak - theirs) <= 0.01 * theirs


def test_estimate_allocates_nothing():
    big = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
    prof = profile(big, (3, 512, 512), 256)  # a real step would need tens of GiB
    peak = prof.total().peak
    assert peak > 4 * 256 * 64 * 512 * 512 * 4  # at least four (B, 64, 512, 512) activations


def test_stage_input_does_not_require_grad():
    """A stage that starts with a parameter-free layer keeps nothing for it and computes no input gradient."""
    net = small_net()
    prof = profile(net, (3, 8, 8), 4)
    pool = prof.stage(3, 4)  # MaxPool2d alone, on stored features
    pool_input = 4 * prof.input_bytes(3)
    assert pool.backward_peak - pool.resident < pool_input  # no (B, 8, 8, 8) gradient, no saved indices
    assert prof.layers[3].saved_bytes >= pool_input  # inside a stage, the same pool saves its input


def test_layer_rows():
    net = small_net()
    adam, sgd = profile(net, (3, 8, 8), 4), profile(net, (3, 8, 8), 4, optimizer="sgd")
    conv = adam.layers[4]
    assert conv.param_bytes == conv.grad_bytes == (8 * 16 * 9 + 16) * 4
    assert conv.optimizer_bytes == 2 * conv.param_bytes  # exp_avg, exp_avg_sq (the step counters are on the CPU side)
    assert sgd.layers[4].optimizer_bytes == conv.param_bytes  # momentum buffer
    assert conv.out_shape == (16, 4, 4) and conv.output_bytes == 4 * 16 * 4 * 4 * 4
    assert adam.layers[3].param_bytes == 0 and adam.layers[3].out_shape == (8, 4, 4)
    assert adam.layers[8].head_param_bytes == (256 * 10 + 10) * 4
    assert all(r.forward_peak >= 0 and r.backward_peak >= 0 for r in adam.layers)


def test_cuda_target_rounds_blocks_like_the_caching_allocator():
    net = small_net()
    cpu, cuda = profile(net, (3, 8, 8), 3), profile(net, (3, 8, 8), 3, device="cuda")
    s_cpu, s_cuda = cpu.stage(0, 11), cuda.stage(0, 11)
    assert s_cuda.peak % 512 == 0 and s_cuda.resident % 512 == 0
    assert s_cuda.peak > s_cpu.peak


def test_tracker_counts_views_once_and_frees():
    tracker = LiveBytes("cpu")
    with tracker:
        a = torch.ones(256)  # 1 KiB
        b = a.view(16, 16)
        c = a * 2
        del c
        d = b.t().contiguous()
    assert tracker.peak == 2048 and tracker.current == 2048
    del a, b, d
    assert tracker.current == 0


@torch.library.custom_op("pystage_test::no_fake", mutates_args=())
def _no_fake(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * w


def _no_fake_backward(ctx, g):  # noqa: ANN001, ANN202
    x, w = ctx.saved_tensors
    return g * w, (g * x).sum(0)


_no_fake.register_autograd(_no_fake_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


class NoFake(nn.Module):
    """A layer whose op has no fake (meta) kernel."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _no_fake(x, self.w)


def test_layer_without_meta_kernel_falls_back_conservatively(caplog):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), NoFake((8, 8, 8)), nn.Conv2d(8, 4, 1), nn.ReLU())
    with caplog.at_level(logging.WARNING, logger="pystage.memory"):
        est = profile(net, (3, 8, 8), 4)
    assert any("layer 2" in r.getMessage() and "meta kernel" in r.getMessage() for r in caplog.records)
    assert est.fallback == {2} and est.layers[2].fallback and est.shapes[3] == torch.Size((8, 8, 8))
    real = profile(net, (3, 8, 8), 4, source="measure")
    for span in [(0, 5), (2, 5), (0, 3)]:
        e, m = est.stage(*span), real.stage(*span)
        assert 2 in e.fallback_layers
        assert m.peak <= e.peak <= 1.5 * m.peak, span  # conservative, but not absurd
    assert est.stage(3, 5).fallback_layers == ()


def test_profile_rejects_bad_arguments():
    with pytest.raises(TypeError):
        profile(nn.Linear(3, 3), (3,), 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        profile(small_net(), (3, 8, 8), 0)
    with pytest.raises(ValueError):
        profile(small_net(), (3, 8, 8), 4, source="guess")
    with pytest.raises(IndexError):
        profile(small_net(), (3, 8, 8), 4).stage(3, 3)


def test_wrong_input_shape_is_a_profile_error_not_a_missing_meta_kernel(caplog):
    """The H200 failure: small_net (sized for 8x8 inputs) profiled on 32x32 inputs for a CUDA target."""
    with caplog.at_level(logging.WARNING, logger="pystage.memory"), pytest.raises(ProfileError) as err:
        profile(small_net(), (3, 32, 32), 32, device="cuda")
    e = err.value
    assert isinstance(e, ValueError) and e.layer == 9 and e.in_shape == (4096,)
    assert "layer 9 (Linear)" in str(e) and "(3, 32, 32)" in str(e) and "mat1 and mat2" in str(e)
    assert not any("meta kernel" in r.getMessage() for r in caplog.records)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_estimate_matches_max_memory_allocated_on_cuda():
    net = small_net()
    est = profile(net, (3, 8, 8), 64, device="cuda")  # with a GPU: cuDNN workspaces measured on it
    real = profile(net.cuda(), (3, 8, 8), 64, device="cuda", source="measure")
    assert est.cuda is not None and est.cuda.workspaces.device is not None
    for span in SPANS:
        e, m = est.stage(*span), real.stage(*span)
        assert m.source == "cuda" and m.reserved is not None and e.reserved is not None
        assert abs(e.peak - m.peak) <= 0.10 * m.peak, (span, e.peak, m.peak)
