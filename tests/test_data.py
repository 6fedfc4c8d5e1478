"""pystage.data: CIFAR-10 / MNIST / array loaders on tiny fake files, the split, and the synthetic task."""
from __future__ import annotations

import gzip
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from pystage import data
from pystage.data import DataError, MissingDataError

# ---------------------------------------------------------------- CIFAR-10


def _write_cifar(folder: Path, per_batch: int = 4) -> np.ndarray:
    """The python-pickle layout with ``per_batch`` images per batch; returns the train data (N, 3072)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"fake", b"data": d, b"labels": labels}, f, protocol=2)
        if name != "test_batch":
            train.append(d)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, f, protocol=2)
    return np.concatenate(train)


def test_cifar10_loads_and_normalises(tmp_path: Path) -> None:
    raw = _write_cifar(tmp_path / "cifar-10-batches-py")
    train = data.cifar10(tmp_path, "train")  # the parent folder is accepted too
    test = data.get("cifar10", tmp_path / "cifar-10-batches-py", split="test")
    assert len(train) == 20 and len(test) == 4
    x, y = train[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64 and y.dim() == 0
    # pixel (row 2, col 7) of image 5, green channel: offset 1024 * channel + 32 * row + col
    expected = (raw[5, 1024 + 2 * 32 + 7] / 255.0 - data.CIFAR10_MEAN[1]) / data.CIFAR10_STD[1]
    assert x[1, 2, 7].item() == pytest.approx(expected, abs=1e-5)
    plain = data.cifar10(tmp_path, "train", normalize=False)
    assert plain.x.min() >= 0 and plain.x.max() <= 1


def test_cifar10_missing_batch_names_path_and_file(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(MissingDataError, match=rf"{tmp_path}.*data_batch_3") as info:
        data.cifar10(tmp_path, "train")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataError)
    data.cifar10(tmp_path, "test")  # the test split does not need it
    with pytest.raises(FileNotFoundError, match="test_batch"):
        data.cifar10(tmp_path / "nowhere", "test")


def test_cifar10_malformed_batch(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match=r"test_batch.*\(N, 3072\)"):
        data.cifar10(tmp_path, "test")
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch.*not a CIFAR-10"):
        data.cifar10(tmp_path, "test")


def test_cifar10_refuses_code_in_pickle(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.mkdir, (str(marker),))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="not allowed"):
        data.cifar10(tmp_path, "test")
    assert not marker.exists()


# ---------------------------------------------------------------- MNIST


def _idx(magic: int, arr: np.ndarray) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, n: int = 6, gz: bool = False) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        for stem, blob in ((f"{prefix}-images-idx3-ubyte", _idx(2051, images)),
                           (f"{prefix}-labels-idx1-ubyte", _idx(2049, labels))):
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(blob))
            else:
                (folder / stem).write_bytes(blob)
    return images


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loads(tmp_path: Path, gz: bool) -> None:
    images = _write_mnist(tmp_path, gz=gz)
    ds = data.get("mnist", tmp_path, split="test")
    assert len(ds) == 6
    x, y = ds[2]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (images[2, 3, 4] / 255.0 - data.MNIST_MEAN[0]) / data.MNIST_STD[0]
    assert x[0, 3, 4].item() == pytest.approx(expected, abs=1e-5)


def test_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match=rf"{tmp_path}.*train-images-idx3-ubyte"):
        data.mnist(tmp_path, "train")
    _write_mnist(tmp_path)
    bad = tmp_path / "train-labels-idx1-ubyte"
    bad.write_bytes(_idx(2051, np.zeros(6, np.uint8)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*magic.*0x00000801"):
        data.mnist(tmp_path, "train")
    bad.write_bytes(_idx(2049, np.zeros(6, np.uint8))[:-2])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*size 12 bytes.*expected 14"):
        data.mnist(tmp_path, "train")
    bad.write_bytes(_idx(2049, np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match="6 images but 5 labels"):
        data.mnist(tmp_path, "train")


def test_data_errors_are_pystage_errors_naming_the_path(tmp_path: Path) -> None:
    """Every loader failure a user can cause is a typed pystage error (the CLI prints it as one line)."""
    from pystage.errors import PystageError

    _write_mnist(tmp_path / "mnist")
    images = tmp_path / "mnist" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100])  # truncated mid-image
    with pytest.raises(DataError, match=rf"{images}: truncated IDX file.*size 100 bytes.*expected 4720") as info:
        data.mnist(tmp_path / "mnist", "train")
    assert isinstance(info.value, PystageError)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for load in (data.mnist, data.cifar10):
        with pytest.raises(MissingDataError, match=rf"{a_file} is a file; expected the folder"):
            load(a_file, "train")
    _write_cifar(tmp_path / "cifar")
    batch = tmp_path / "cifar" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:500])  # truncated pickle
    with pytest.raises(DataError, match=rf"{batch}: not a CIFAR-10 python pickle batch"):
        data.cifar10(tmp_path / "cifar", "test")
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 1, 2, 2), np.uint8), y=np.zeros(2, np.int64))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "d.npz").read_bytes()[:60])
    with pytest.raises(DataError, match=rf"{tmp_path / 'cut.npz'}: not a readable .npz file"):
        data.numpy_file(tmp_path / "cut.npz")
    (tmp_path / "x.npy").write_bytes(b"garbage")
    np.save(tmp_path / "y.npy", np.zeros(2, np.int64))
    with pytest.raises(DataError, match=rf"{tmp_path / 'x.npy'}: not a readable .npy array file"):
        data.numpy_file(tmp_path / "x.npy", tmp_path / "y.npy")


# ---------------------------------------------------------------- arrays, split, get


def test_numpy_arrays_and_npz(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(8, 5, 6, 3), dtype=np.uint8)  # (N, H, W, C)
    y = np.arange(8) % 4
    ds = data.numpy_arrays(x, y, layout="NHWC")
    assert ds.x.shape == (8, 3, 5, 6) and ds.x.max() <= 1 and ds.num_classes == 4
    assert ds[3][0][2, 1, 4].item() == pytest.approx(x[3, 1, 4, 2] / 255.0)
    np.savez(tmp_path / "d.npz", x_train=x.transpose(0, 3, 1, 2), y_train=y, x=x[:2, ..., 0], y=y[:2])
    assert len(data.get("npz", tmp_path / "d.npz", split="train")) == 8
    assert data.numpy_file(tmp_path / "d.npz").x.shape == (2, 1, 5, 6)
    with pytest.raises(DataError, match="x_val/y_val or x/y"):
        np.savez(tmp_path / "e.npz", a=x)
        data.numpy_file(tmp_path / "e.npz", split="val")
    with pytest.raises(DataError, match="same length"):
        data.numpy_arrays(x, y[:3], layout="NHWC")
    with pytest.raises(DataError, match="1-D integer"):
        data.numpy_arrays(x, y.astype(np.float32), layout="NHWC")


def test_as_dataset() -> None:
    tds = TensorDataset(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long))
    assert data.as_dataset(tds) is tds
    assert len(data.as_dataset((np.zeros((4, 2, 2), np.float32), np.zeros(4, np.int64)))) == 4
    with pytest.raises(DataError, match="got int"):
        data.as_dataset(3)


def test_train_val_split_deterministic_disjoint() -> None:
    ds = data.numpy_arrays(torch.arange(100.0).view(100, 1, 1, 1), torch.arange(100) % 10)
    tr, va = data.train_val_split(ds, 0.2, seed=1)
    tr2, va2 = data.train_val_split(ds, 0.2, seed=1)
    assert isinstance(tr, data.TensorData) and len(tr) == 80 and len(va) == 20
    assert torch.equal(va.x, va2.x) and torch.equal(tr.x, tr2.x)
    assert set(tr.x.flatten().tolist()).isdisjoint(va.x.flatten().tolist())
    assert not torch.equal(data.train_val_split(ds, 0.2, seed=2)[1].x, va.x)
    sub_tr, sub_va = data.train_val_split(TensorDataset(ds.x, ds.y), 0.5)
    assert isinstance(sub_tr, Subset) and len(sub_va) == 50
    with pytest.raises(DataError, match="val_fraction.*got 1.5"):
        data.train_val_split(ds, 1.5)


def test_get_errors() -> None:
    with pytest.raises(DataError, match="unknown data set name 'imagenet'.*synthetic, cifar10, mnist, npz"):
        data.get("imagenet")
    with pytest.raises(DataError, match="needs path"):
        data.get("cifar10")


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_balanced_disjoint() -> None:
    a = data.synthetic(n=200, seed=5)
    b = data.get("synthetic", n=200, seed=5)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.x.shape == (200, 3, 32, 32) and a.x.dtype == torch.float32 and a.y.dtype == torch.int64
    assert torch.bincount(a.y, minlength=10).tolist() == [20] * 10
    val = data.synthetic(n=200, seed=5, split="val")
    flat_a, flat_v = a.x.flatten(1), val.x.flatten(1)
    assert torch.cdist(flat_a, flat_v).min() > 1.0  # no shared sample
    assert not torch.equal(data.synthetic(n=200, seed=6).x, a.x)
    assert data.synthetic(n=10, num_classes=3, shape=(1, 12, 12)).x.shape == (10, 1, 12, 12)
    with pytest.raises(DataError, match="split must be one of.*got 'dev'"):
        data.synthetic(n=10, split="dev")


def _train(model: nn.Module, ds: data.TensorData, epochs: int, lr: float = 3e-3, batch: int = 32) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(ds), generator=g)
        for i in range(0, len(ds), batch):
            idx = perm[i:i + batch]
            loss = nn.functional.cross_entropy(model(ds.x[idx]), ds.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def _accuracy(model: nn.Module, ds: data.TensorData) -> float:
    return (model(ds.x).argmax(1) == ds.y).float().mean().item()


def test_synthetic_is_learnable_by_a_cnn_not_by_a_linear_model() -> None:
    train, val = data.synthetic(n=2000, split="train"), data.synthetic(n=500, split="val")
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 16, 16)
                        nn.Flatten(), nn.Linear(16 * 16 * 16, 10))
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    t0 = time.perf_counter()
    _train(cnn, train, epochs=2)
    _train(linear, train, epochs=2)
    cnn_acc, linear_acc = _accuracy(cnn, val), _accuracy(linear, val)
    print(f"synthetic: cnn {cnn_acc:.3f}, linear {linear_acc:.3f}, {time.perf_counter() - t0:.1f}s")
    assert cnn_acc >= 0.5
    assert linear_acc <= cnn_acc - 0.2
