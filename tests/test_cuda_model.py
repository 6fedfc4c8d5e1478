"""The CUDA memory model, on a machine without a GPU: allocator rules, cuBLAS/cuDNN workspaces, the replay."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from pystage.memory import CachingAllocator, ConvWorkspaces, CudaTarget, profile
from pystage.memory.allocator import round_size, segment_size
from pystage.memory.cuda import cublas_workspace_bytes, cublaslt_workspace_bytes
from pystage.memory.tracker import TensorSpec
from pystage.memory.workspace import SPLIT_K_SLICES, ConvCall, modelled_workspace
from pystage.optim import TrainConfig

MiB = 1 << 20


def test_block_rounding_and_segment_sizes():
    assert [round_size(n) for n in (0, 1, 512, 513, 4000)] == [512, 512, 512, 1024, 4096]
    assert segment_size(512) == segment_size(1 << 20) == 2 * MiB  # small pool: 2 MiB segments
    assert segment_size((1 << 20) + 512) == segment_size(9 * MiB) == 20 * MiB  # 1-10 MiB: a 20 MiB segment
    assert segment_size(10 * MiB) == 10 * MiB and segment_size(11 * MiB) == 12 * MiB  # else rounded to 2 MiB


def test_allocator_packs_small_blocks_and_splits_large_segments():
    a = CachingAllocator()
    small = [a.malloc(1000) for _ in range(4)]  # 1024 each, one 2 MiB segment
    assert a.allocated == 4096 and a.reserved == 2 * MiB
    big = a.malloc(3 * MiB)  # 20 MiB segment, split: the rest stays free
    assert a.allocated == 4096 + 3 * MiB and a.reserved == 22 * MiB
    b2 = a.malloc(3 * MiB)  # from the free rest of the same segment
    assert a.reserved == 22 * MiB
    for b in (*small, big, b2):
        a.free(b)
    assert a.allocated == 0 and a.peak_allocated == 4096 + 6 * MiB and a.reserved == 22 * MiB
    again = a.malloc(20 * MiB - 4096)  # the 20 MiB segment merged back into one free block: handed out whole
    assert a.reserved == 22 * MiB and again.size == 20 * MiB and a.allocated == 20 * MiB


def test_allocator_hands_out_a_large_block_whole_when_the_rest_is_1mib_or_less():
    a = CachingAllocator()
    a.free(a.malloc(12 * MiB))  # a cached 12 MiB segment
    b = a.malloc(11 * MiB + 512)  # rest 1 MiB - 512: not split
    assert b.size == 12 * MiB and a.allocated == 12 * MiB
    a.free(b)
    c = a.malloc(10 * MiB)  # rest 2 MiB > 1 MiB: split
    assert c.size == 10 * MiB and a.allocated == 10 * MiB and a.reserved == 12 * MiB
    with pytest.raises(ValueError):
        a.free(a.malloc(512)) or a.free(c) or a.free(c)


def test_allocator_takes_the_smallest_free_block_that_fits():
    a = CachingAllocator()
    x, y, z = a.malloc(30 * MiB), a.malloc(12 * MiB), a.malloc(16 * MiB)
    a.free(x)
    a.free(z)
    w = a.malloc(14 * MiB)  # best fit: the 16 MiB block (rest 2 MiB is split off), not the 30 MiB one
    assert w.addr == z.addr and w.size == 14 * MiB and a.reserved == 58 * MiB
    del y


def test_cublas_workspace_sizes_follow_pytorch():
    assert cublas_workspace_bytes((9, 0)) == 32 * MiB  # Hopper
    assert cublas_workspace_bytes((8, 0)) == 4096 * 1024 * 2 + 16 * 1024 * 8
    assert cublas_workspace_bytes((8, 0), ":4096:8") == 32 * MiB
    assert cublas_workspace_bytes((9, 0), ":4096:2:16:8") == 4096 * 1024 * 2 + 16 * 1024 * 8
    assert cublaslt_workspace_bytes(32 * MiB) == MiB and cublaslt_workspace_bytes(32 * MiB, "2048") == 2 * MiB
    assert cublaslt_workspace_bytes(512 * 1024) == 512 * 1024  # never more than the cuBLAS workspace


def _call(kind: str, n: int = 256, c: int = 64, hw: int = 32, channels_last: bool = False) -> ConvCall:
    shape = (n, c, hw, hw)
    stride = (c * hw * hw, 1, hw * c, c) if channels_last else (c * hw * hw, hw * hw, hw, 1)
    t = TensorSpec(shape, stride, torch.float32)
    w = TensorSpec((c, c, 3, 3), (c * 9, 9, 3, 1), torch.float32)
    return ConvCall(kind, t, w, t, (1, 1), (1, 1), (1, 1), False, (0, 0), 1)


def test_modelled_cudnn_workspace_pieces():
    act = 256 * 64 * 32 * 32 * 4
    assert modelled_workspace(_call("fwd")) == modelled_workspace(_call("dgrad")) == 2 * act  # NHWC copies
    assert modelled_workspace(_call("wgrad")) == 2 * act  # copies beat split-K partials at 32x32
    assert modelled_workspace(_call("wgrad", hw=8)) == SPLIT_K_SLICES * 64 * 64 * 9 * 4  # 72 MiB of partials
    assert modelled_workspace(_call("fwd", channels_last=True)) == 0  # NHWC already: no copies
    measured = ConvWorkspaces(torch.device("cuda", 0), {_call("fwd"): 12345})
    assert measured.bytes(_call("fwd")) == 12345  # a measured call is used as measured
    assert ConvWorkspaces().bytes(_call("dgrad", hw=8)) == modelled_workspace(_call("dgrad", hw=8))


def net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU())


SPANS = [(0, 8), (0, 2), (3, 8), (6, 8), (2, 3)]


def test_cuda_estimate_is_at_least_the_cpu_accounting():
    loop = TrainConfig(foreach=False)  # the same optimizer code on both targets
    cpu = profile(net(), (3, 16, 16), 32, optimizer=loop)
    cuda = profile(net(), (3, 16, 16), 32, device="cuda", optimizer=loop)
    assert cuda.cuda is not None and cuda.cuda.capability == (9, 0)  # no GPU: the sm_90 model
    for span in SPANS:
        c, g = cpu.stage(*span), cuda.stage(*span)
        body = [p for m in list(net())[span[0]:span[1]] for p in m.parameters()]
        host = 4 * (len(body) + 2)  # Adam's step counters (+ the head's two): CPU memory, not the GPU's
        assert g.tensor_peak is not None and g.reserved is not None
        assert g.peak >= g.tensor_peak >= c.peak - host, span  # the GPU's rounding only adds
        assert g.reserved >= g.peak and g.reserved % (2 * MiB) == 0


def test_first_stage_pays_the_cublas_workspaces():
    prof = profile(net(), (3, 16, 16), 32, device="cuda")
    first, later = prof.stage(0, 8), prof.stage(2, 8)  # both end in the same linear head and Linear layer
    target = prof.cuda
    assert target is not None
    assert first.once == 2 * target.cublas_workspace + target.cublaslt_workspace  # forward + autograd + Lt
    assert later.once == 0 and prof.stage(3, 8).once == 0
    assert first.peak >= first.tensor_peak + first.once


def test_smaller_cublas_workspace_on_other_gpus():
    small = CudaTarget((8, 0), "A100")
    prof = profile(net(), (3, 16, 16), 32, device="cuda", cuda=small)
    assert prof.stage(0, 8).once == 2 * small.cublas_workspace + small.cublaslt_workspace
    assert prof.stage(0, 8).peak < profile(net(), (3, 16, 16), 32, device="cuda").stage(0, 8).peak


def test_cudnn_workspaces_sit_on_top_of_the_step():
    zero = CudaTarget(workspaces=ConvWorkspacesFixed(size=0))
    big = CudaTarget(workspaces=ConvWorkspacesFixed(size=64 * MiB))
    a = profile(net(), (3, 16, 16), 32, device="cuda", cuda=zero).stage(3, 8)
    b = profile(net(), (3, 16, 16), 32, device="cuda", cuda=big).stage(3, 8)
    assert a.tensor_peak == b.tensor_peak
    assert b.peak - a.peak >= 60 * MiB  # one workspace at a time, on top of the live tensors


@dataclasses.dataclass
class ConvWorkspacesFixed(ConvWorkspaces):
    size: int = 0

    def bytes(self, call: ConvCall) -> int:
        return self.size


def test_foreach_optimizer_temporaries_are_counted():
    """CUDA's default Adam is the foreach one: temporaries for all parameters at once (a sqrt of every second
    moment), where the for-loop one holds a few of one parameter's size at a time."""
    deep = nn.Sequential(nn.Flatten(), *[m for _ in range(16) for m in (nn.Linear(512, 512), nn.ReLU())])
    loop = profile(deep, (2, 16, 16), 8, device="cuda", optimizer=TrainConfig(foreach=False)).stage(0, 33)
    each = profile(deep, (2, 16, 16), 8, device="cuda", optimizer=TrainConfig()).stage(0, 33)  # CUDA default
    params = 16 * (512 * 512 + 512) * 4 + (512 * 10 + 10) * 4
    assert TrainConfig().uses_foreach(torch.device("cuda")) and not TrainConfig().uses_foreach(torch.device("cpu"))
    assert each.step_peak >= each.resident + each.once + 2 * params  # gradients + one list of temporaries
    assert each.step_peak - loop.step_peak >= params // 2
    assert each.forward_peak == loop.forward_peak


def test_plain_net_matches_the_recorded_h200_figures_within_the_target():
    """Stage [6, 10) of plain-24-64 at batch 256 (recorded: 397.1 MiB; target +10% / -5%)."""
    models = pytest.importorskip("pystage.models")
    prof = profile(models.get("plain-24-64"), (3, 32, 32), 256, device="cuda")
    peak = prof.stage(6, 10).peak / MiB
    assert 0.95 * 397.112 <= peak <= 1.10 * 397.112
