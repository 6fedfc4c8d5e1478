"""The flat-<depth>-<width> family: constant resolution, BatchNorm by default, even splits; and its memory shape."""
import pytest
import torch
from torch import nn

import pystage
from pystage.models import ModelError, stages


def test_flat_layout_and_output_shape():
    m = pystage.models.get("flat-5-8", in_channels=1)
    convs = [layer for layer in m if isinstance(layer, nn.Conv2d)]
    assert len(convs) == 5 and all(c.out_channels == 8 and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(layer, nn.BatchNorm2d) for layer in m) == 5 and isinstance(m[-1], nn.MaxPool2d)
    assert m.split_points == () and m.name == "flat-5-8" and m.in_channels == 1
    assert m(torch.randn(2, 1, 12, 10)).shape == (2, 8, 6, 5)  # every conv keeps 12x10; the pool halves it


def test_flat_options():
    no_bn = pystage.models.get("flat-3-4", batch_norm=False)
    assert not any(isinstance(layer, nn.BatchNorm2d) for layer in no_bn) and len(no_bn) == 3 * 2 + 1
    m = pystage.models.get("flat-6-4", stages=3)
    assert m.split_points == (6, 12)  # before conv 3 and conv 5 (conv + BN + ReLU = 3 layers)
    assert [len(s) for s in stages(m)] == [6, 6, 7]
    with pytest.raises(ModelError, match="stages must be in \\[1, 6\\].*got 7"):
        pystage.models.get("flat-6-4", stages=7)
    with pytest.raises(ModelError, match="depth >= 1.*depth=0"):
        pystage.models.get("flat-0-4")
    with pytest.raises(ModelError, match="reserved by the pattern flat-<depth>-<width>"):
        pystage.models.register("flat-2-2", lambda c: nn.Sequential(nn.Conv2d(c, 2, 1)))
    assert "flat-<depth>-<width>" in pystage.models.names()


def test_flat_end_to_end_memory_grows_with_depth_while_a_stage_stays():
    """What the default bench job relies on: depth multiplies end-to-end memory, not a one-layer stage's."""
    from pystage.memory import profile

    peaks = {}
    for depth in (4, 10):
        prof = profile(pystage.models.get(f"flat-{depth}-8"), (3, 16, 16), 20)
        peaks[depth] = (prof.total().peak, prof.stage_peak(3, 6))  # whole net; conv 2 + BN + ReLU (+ head)
    assert peaks[10][1] == peaks[4][1]
    assert peaks[10][0] > 1.8 * peaks[4][0] and peaks[10][0] > 3 * peaks[10][1]
