"""Keys and fingerprints: content-addressed, stable, sensitive to every input that changes the features."""
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from pystage.store import FeatureStore, StoreArgumentError, StoreKey, dataset_fingerprint, parse_size


class _Rows(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _data(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 10, (n,), generator=g)


def _stage(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())


def test_fingerprint_same_rows_same_hash_whatever_the_container():
    x, y = _data()
    fp = dataset_fingerprint(TensorDataset(x, y))
    assert fp == dataset_fingerprint((x.numpy(), y.numpy()))
    assert fp == dataset_fingerprint(_Rows(x, y))
    assert len(fp) == 32 and int(fp, 16) >= 0


def test_fingerprint_changes_with_data_labels_order_and_dtype():
    x, y = _data()
    fp = dataset_fingerprint(TensorDataset(x, y))
    x2 = x.clone()
    x2[3, 1, 2, 2] += 1e-3
    y2 = y.clone()
    y2[0] = (y2[0] + 1) % 10
    others = [TensorDataset(x2, y), TensorDataset(x, y2), TensorDataset(x.flip(0), y.flip(0)),
              TensorDataset(x.double(), y), TensorDataset(x[:-1], y[:-1])]
    assert len({fp, *map(dataset_fingerprint, others)}) == 1 + len(others)


def test_fingerprint_rejects_bad_input():
    with pytest.raises(StoreArgumentError, match="dataset"):
        dataset_fingerprint(object())
    with pytest.raises(StoreArgumentError, match="same number of rows"):
        dataset_fingerprint((np.zeros((3, 2)), np.zeros(4)))


def test_identical_stage_identical_key(tmp_path):
    store = FeatureStore(tmp_path)
    assert store.key("fp", _stage(0)) == store.key("fp", _stage(0))


@pytest.mark.parametrize("change", ["weight", "buffer", "arch", "dtype", "split", "transforms", "upstream", "shard", "extra"])
def test_key_changes_with_every_input(tmp_path, change):
    store = FeatureStore(tmp_path)
    base = dict(upstream="fp", module=_stage(0), dtype=torch.float16, transforms="", split="train", shard=None, extra=None)
    k0 = store.key(**base)
    m = _stage(0)
    if change == "weight":
        with torch.no_grad():
            m[0].weight[0, 0, 0, 0] += 1e-6
    elif change == "buffer":
        m[1].running_mean[0] = 0.5
    elif change == "arch":
        m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GELU())
        m.load_state_dict(_stage(0).state_dict())
    options = {"dtype": torch.bfloat16, "split": "val", "transforms": "flip", "upstream": "fp2",
               "shard": (0, 2), "extra": {"a": 1}}
    changed = {**base, "module": m}
    if change in options:
        changed[change] = options[change]
    assert store.key(**changed) != k0


def test_key_is_a_str_that_pickles_with_its_fields(tmp_path):
    k = FeatureStore(tmp_path).key("fp", _stage(0), dtype=torch.bfloat16, split="val", shard=(1, 4))
    k2 = pickle.loads(pickle.dumps(k))
    assert isinstance(k2, StoreKey) and k2 == k and str(k2) == str(k)
    assert (k2.dtype, k2.split_name, k2.shard, k2.upstream) == (torch.bfloat16, "val", (1, 4), "fp")
    assert k.split("x") == [str(k)]  # still a normal str


@pytest.mark.parametrize("kwargs, name", [({"upstream": ""}, "upstream"), ({"dtype": torch.int64}, "dtype"),
                                          ({"shard": (2, 2)}, "shard"), ({"extra": object()}, "extra"),
                                          ({"module": "not a module"}, "module")])
def test_key_rejects_bad_arguments(tmp_path, kwargs, name):
    args = {"upstream": "fp", "module": _stage(0), **kwargs}
    if name == "module":
        args["module"] = 3
    with pytest.raises(StoreArgumentError, match=name):
        FeatureStore(tmp_path).key(**args)


def test_parse_size():
    assert parse_size("256MiB") == 256 << 20 and parse_size("2GB") == 2 * 10**9 and parse_size(4096) == 4096
    assert parse_size("1.5K") == 1536
    for bad in ("lots", "-1MiB", 0, "12XB", True):
        with pytest.raises(StoreArgumentError, match="size"):
            parse_size(bad, "size")
