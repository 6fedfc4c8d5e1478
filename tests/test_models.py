"""pystage.models: the CNN1-CNN8 zoo, the plain family, split points and the registry."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pystage import models

# Written out independently of models.CNN_TABLE: per stage, conv kernel sizes and pool count.
SPEC = {
    "cnn1": [([3, 3], 1)],
    "cnn2": [([3], 0), ([3], 1)],
    "cnn3": [([3, 1], 0), ([3, 1], 1)],
    "cnn4": [([3, 3], 0), ([3, 3], 1)],
    "cnn5": [([3, 1], 1), ([3, 1], 1)],
    "cnn6": [([3, 3], 1), ([3, 3], 1)],
    "cnn7": [([3, 1], 1)] * 3,
    "cnn8": [([3, 3], 1)] * 3,
}
OUT_SIDE = {"cnn1": 16, "cnn2": 16, "cnn3": 16, "cnn4": 16, "cnn5": 8, "cnn6": 8, "cnn7": 4, "cnn8": 4}
PLAIN = ["plain-1-4", "plain-3-8", "plain-16-64"]


def _all_names() -> list[str]:
    return [n for n in models.names() if "<" not in n] + PLAIN


def test_names_lists_table_and_pattern() -> None:
    names = models.names()
    assert [f"cnn{i}" for i in range(1, 9)] == [n for n in names if n.startswith("cnn")]
    assert "plain-<depth>-<width>" in names


@pytest.mark.parametrize("name", _all_names())
def test_forward_shape_and_split_points(name: str) -> None:
    torch.manual_seed(0)
    model = models.get(name)
    assert isinstance(model, nn.Sequential)
    points = model.split_points
    assert list(points) == sorted(set(points)) and all(0 < p < len(model) for p in points)
    out = model(torch.randn(2, 3, 32, 32))  # (B, C, H, W)
    assert out.dim() == 4 and out.shape[0] == 2
    for stage in models.stages(model):
        assert isinstance(stage[0], nn.Conv2d), "a stage must start with a conv"
        assert not isinstance(stage[-1], nn.Conv2d), "a conv's ReLU must stay in its stage"
    if name in OUT_SIDE:
        assert out.shape[1:] == (32, OUT_SIDE[name], OUT_SIDE[name])


@pytest.mark.parametrize("name", sorted(SPEC))
def test_cnn_structure_matches_table(name: str) -> None:
    model = models.get(name)
    assert model.name == name and model.num_classes == 10 and model.in_channels == 3
    got = []
    for stage in models.stages(model):
        convs = [m for m in stage if isinstance(m, nn.Conv2d)]
        pools = [m for m in stage if isinstance(m, nn.MaxPool2d)]
        got.append(([c.kernel_size[0] for c in convs], len(pools)))
        for c in convs:
            assert c.out_channels == 32 and c.padding == (c.kernel_size[0] // 2,) * 2
        for p in pools:
            assert p.kernel_size == 2 and p.stride == 2
        for i, m in enumerate(stage):
            if isinstance(m, nn.Conv2d):
                assert isinstance(stage[i + 1], nn.ReLU)
    assert got == SPEC[name]


def test_stages_compose_to_the_model() -> None:
    model = models.get("cnn7")
    x = torch.randn(2, 3, 32, 32)  # (B, C, H, W)
    h = x
    for stage in models.stages(model):
        h = stage(h)
    assert torch.equal(h, model(x))


def test_shared_prefix_cnn1_cnn6_cnn8() -> None:
    """The paper trains stage 1 once for CNNs 1, 6 and 8: their first stages are the same architecture."""
    first = [str(models.stages(models.get(n))[0]) for n in ("cnn1", "cnn6", "cnn8")]
    assert first[0] == first[1] == first[2]


def test_deterministic_init() -> None:
    torch.manual_seed(3)
    a = models.get("cnn4")
    torch.manual_seed(3)
    b = models.get("cnn4")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model name 'cnn9'.*cnn1.*plain-<depth>-<width>"):
        models.get("cnn9")


def test_in_channels_and_width() -> None:
    model = models.get("cnn2", in_channels=1, width=8)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 8, 14, 14)


def test_plain_pools_and_batch_norm() -> None:
    model = models.get("plain-16-64", batch_norm=True)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16 and all(c.out_channels == 64 and c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model) == 16
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 3
    assert model.split_points == ()
    mnist_like = models.get("plain-6-8", in_channels=1, input_size=28)
    assert sum(isinstance(m, nn.MaxPool2d) for m in mnist_like) == 2  # 28 -> 14 -> 7, not below 4
    assert mnist_like(torch.randn(2, 1, 28, 28)).shape == (2, 8, 7, 7)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 16])
def test_plain_stages_split_evenly(k: int) -> None:
    model = models.get("plain-16-8", stages=k)
    assert len(model.split_points) == k - 1
    counts = [sum(isinstance(m, nn.Conv2d) for m in s) for s in models.stages(model)]
    assert sum(counts) == 16 and max(counts) - min(counts) <= 1


def test_plain_bad_stages() -> None:
    with pytest.raises(ValueError, match=r"stages must be in \[1, 4\].*got 5"):
        models.get("plain-4-8", stages=5)
    with pytest.raises(ValueError, match="depth >= 1"):
        models.get("plain-0-8")


def test_split_points_override_and_validation() -> None:
    assert models.get("cnn1", split_points=(2,)).split_points == (2,)
    with pytest.raises(ValueError, match=r"split_points.*\[1, 4\].*got \(0,\)"):
        models.get("cnn1", split_points=(0,))
    with pytest.raises(ValueError, match="strictly increasing"):
        models.get("cnn7", split_points=(10, 5))


def test_register() -> None:
    def tiny(in_channels: int = 3) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU())

    models.register("test-tiny", tiny, overwrite=True)
    try:
        assert "test-tiny" in models.names()
        model = models.get("test-tiny")
        assert model.split_points == () and model(torch.randn(1, 3, 8, 8)).shape == (1, 4, 8, 8)
        with pytest.raises(ValueError, match="already registered"):
            models.register("test-tiny", tiny)
        with pytest.raises(ValueError, match="reserved"):
            models.register("plain-2-2", tiny)
    finally:
        models._REGISTRY.pop("test-tiny", None)
