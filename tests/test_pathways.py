"""Skip pathways: shapes of concat and sum, that pooled conv outputs reach the output, models.get wiring."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pystage
from pystage import models
from pystage.models import ModelError
from pystage.pathways import PathwayError, PathwayNet, as_staged, conv_taps


def test_get_without_pathways_is_still_a_sequential():
    assert type(models.get("plain-4-8")) is nn.Sequential


@pytest.mark.parametrize("mode,channels", [("concat", 8 * 5), ("sum", 8)])
def test_shapes(mode, channels):
    net = models.get("plain-4-8", pathways=mode, num_classes=5)
    assert isinstance(net, PathwayNet) and net.num_classes == 5 and net.split_points == ()
    out = net(torch.randn(2, 3, 32, 32))  # plain-4: pools after convs 1, 3, 4 -> 4x4
    assert out.shape == (2, channels, 4, 4) and net.out_channels == channels


def test_concat_is_body_output_then_pooled_conv_outputs():
    torch.manual_seed(0)
    net = models.get("plain-3-4", pathways="concat")
    x = torch.randn(2, 3, 16, 16)
    out = net(x)
    body_out = net.body(x)
    assert torch.equal(out[:, :4], body_out)
    first_relu = net.body[: conv_taps(net.body)[0] + 1](x)  # (2, 4, 8... full res) -> pooled to the final size
    assert torch.equal(out[:, 4:8], F.adaptive_max_pool2d(first_relu, body_out.shape[-2:]))


def test_sum_adds_pooled_outputs():
    torch.manual_seed(0)
    net = models.get("plain-2-4", pathways="sum")
    x = torch.randn(1, 3, 16, 16)
    cat = PathwayNet(net.body, "concat")(x)
    assert torch.allclose(net(x), cat.view(1, 3, 4, *cat.shape[-2:]).sum(1), atol=1e-6)


def test_errors():
    with pytest.raises(PathwayError, match="'avg'"):
        PathwayNet(models.get("plain-2-4"), "avg")
    unequal = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
    with pytest.raises(PathwayError, match=r"\[4, 6\]"):
        PathwayNet(unequal, "sum")
    with pytest.raises(ModelError, match="cnn4"):
        models.get("cnn4", pathways="concat")


def test_trains_through_fit(tmp_path):
    data = pystage.data.synthetic(n=100, num_classes=3, shape=(3, 8, 8))
    net = as_staged(models.get("plain-3-4", pathways="concat", num_classes=3, input_size=8), (3, 8, 8), 3)
    res = pystage.fit(net, data, data, method="total", epochs=1, store=pystage.FeatureStore(tmp_path),
                      checkpoint_dir=str(tmp_path / "stages"), progress=False)
    assert res.model(data.x[:4]).shape == (4, 3)
