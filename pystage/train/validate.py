"""Checks ``fit`` runs before any stage trains: arguments, data, model, roots. Each raises a ``FitArgumentError``
(or ``FitTypeError``) naming the argument, the value it got and what was expected."""
from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from pystage.optim import TrainConfig
from pystage.staged import HEADS, StagedNet
from pystage.train.errors import FitArgumentError, FitTypeError

STORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_arguments(*, epochs: Any, batch_size: Any, seed: Any, head: Any, progress: Any, share_prefixes: Any,
                    measure_memory: Any, config: Any, search: Any, store_dtype: Any, memory_budget: Any) -> None:
    """Types and ranges of ``fit``'s scalar arguments."""
    from pystage.train.search import SearchConfig
    from pystage.units import SizeError, parse_bytes

    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FitArgumentError(name, v, "an int >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise FitArgumentError("seed", seed, "an int >= 0")
    if head not in HEADS:
        raise FitArgumentError("head", head, f"one of {HEADS}")
    for name, v, allowed in (("progress", progress, (True, False, None)), ("share_prefixes", share_prefixes, (True, False)),
                             ("measure_memory", measure_memory, (True, False))):
        if not any(v is a for a in allowed):
            raise FitArgumentError(name, v, " or ".join(map(str, allowed)))
    if not isinstance(config, TrainConfig):
        raise FitTypeError("config", config, "a pystage.TrainConfig")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (config.lr, config.weight_decay)):
        raise FitArgumentError("config", config, "finite lr and weight_decay")
    if search is not None and not isinstance(search, SearchConfig):
        raise FitTypeError("search", search, "None or a pystage.SearchConfig")
    if store_dtype not in STORE_DTYPES:
        raise FitArgumentError("store_dtype", store_dtype, f"one of {', '.join(map(str, STORE_DTYPES))}")
    if memory_budget is not None:
        try:
            parse_bytes(memory_budget, "memory_budget")
        except SizeError as e:
            raise FitArgumentError("memory_budget", memory_budget, "a size like '512MiB' or an int of bytes",
                                   str(e)) from None


def resolve_device(device: Any) -> torch.device:
    """``device`` as a torch.device this process can use (default: cuda when available, else cpu)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise FitArgumentError("device", device, "a device such as 'cpu' or 'cuda:0'", str(e)) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FitArgumentError("device", device, "a device this machine has (CUDA is not available here)")
    return dev


def as_data(data: Any, name: str, required: bool = True) -> Optional[Dataset]:
    """``data`` as a non-empty map-style Dataset of ``(x, y)``: ``(x, y)`` arrays and .npz paths are loaded."""
    if data is None:
        if required:
            raise FitArgumentError(name, None, "a Dataset of (x, y) samples or an (x, y) pair of arrays")
        return None
    if not isinstance(data, Dataset) and isinstance(data, (tuple, list, str, os.PathLike)):
        from pystage.data import as_dataset
        from pystage.data.base import DataError

        try:
            data = as_dataset(data)
        except DataError as e:
            raise FitArgumentError(name, type(data).__name__, "a Dataset or an (x, y) pair of arrays", str(e)) from None
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise FitTypeError(name, type(data).__name__, "a map-style Dataset of (x, y) samples (with __len__)")
    if len(data) == 0:
        raise FitArgumentError(name, f"a dataset of {len(data)} samples", "at least one sample")
    item = data[0]
    if not isinstance(item, (tuple, list)) or len(item) != 2 or not torch.is_tensor(item[0]):
        raise FitArgumentError(f"{name}[0]", type(item).__name__, "a pair (x: Tensor, y)")
    if not item[0].is_floating_point():
        raise FitArgumentError(f"{name}[0] x", item[0].dtype, "a floating-point input tensor")
    return data


def check_pair(train: Dataset, val: Optional[Dataset]) -> None:
    """Validation samples shaped like training samples; no NaN/inf in in-memory inputs."""
    x0 = train[0][0]
    if val is not None and tuple(val[0][0].shape) != tuple(x0.shape):
        raise FitArgumentError("val", f"samples of shape {tuple(val[0][0].shape)}",
                               f"the training samples' shape {tuple(x0.shape)}")
    for name, data in (("train", train), ("val", val)):
        x = _column(data, 0) if data is not None else None
        if x is not None and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            row = int((~torch.isfinite(x.reshape(len(x), -1))).any(1).nonzero()[0])
            raise FitArgumentError(name, f"non-finite inputs (NaN or inf), first in row {row}", "finite inputs")


def check_model(model: nn.Module, sample: Tensor, name: str = "train") -> Tensor:
    """One forward of one sample through the whole ``model`` (eval mode, no grad); its output."""
    if not isinstance(model, nn.Module):
        raise FitTypeError("model", type(model).__name__, "an nn.Sequential (with split_points) or a StagedNet")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = sample.unsqueeze(0)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    modes = [m.training for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return model(x)
    except Exception as e:  # noqa: BLE001 - any failure here is a mismatch between data and model
        raise FitArgumentError(name, f"samples of shape {tuple(sample.shape)}", "inputs the model accepts",
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode


def check_labels(data: Optional[Dataset], name: str, classes: int) -> None:
    """Integer class labels in ``[0, classes)``."""
    if data is None:
        return
    y = _column(data, 1)
    if y is None:  # a dataset read row by row (fit reads every row for its fingerprint anyway)
        labels = [torch.as_tensor(data[i][1]) for i in range(len(data))]
        y = torch.as_tensor([int(t) if _is_int(t) else math.nan for t in labels])
    if y.is_floating_point() or y.dim() != 1:
        raise FitArgumentError(f"{name} labels", f"{y.dtype} of shape {tuple(y.shape)}",
                               "one integer class id per sample")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        raise FitArgumentError(f"{name} labels", f"range [{lo}, {hi}]", f"class ids in [0, {classes}) "
                               f"(the model's head has {classes} outputs)")


def check_writable(path: Any, name: str) -> str:
    """``path`` as a directory this process can create files in (made if missing)."""
    text = str(path)
    try:
        os.makedirs(text, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=text, prefix=".pystage-write-check-"):
            pass
    except OSError as e:
        raise FitArgumentError(name, text, "a writable directory", f"{type(e).__name__}: {e.strerror or e}") from None
    return text


def classes_of(model: nn.Module, train: Dataset, out: Optional[Tensor] = None) -> int:
    """Classes the heads ``fit`` gives ``model`` predict: a StagedNet's own head outputs (``out``: its output for
    one sample, if already computed), else the dataset's or the model's ``num_classes`` (10 when neither says)."""
    if isinstance(model, StagedNet):
        return int((out if out is not None else check_model(model, train[0][0])).shape[1])
    return getattr(train, "num_classes", None) or getattr(model, "num_classes", None) or 10


def staged_model(model: nn.Module, train: Dataset, head: str) -> StagedNet:
    """``model`` as a StagedNet (an ``nn.Sequential`` split at its ``split_points``, each stage with a head)."""
    if isinstance(model, StagedNet):
        return model
    if not isinstance(model, nn.Sequential):
        raise FitTypeError("model", type(model).__name__, "an nn.Sequential (with split_points) or a StagedNet",
                           f"model must be an nn.Sequential (with split_points) or a StagedNet, got "
                           f"{type(model).__name__}")
    x0, _ = train[0]
    return StagedNet.from_sequential(model, input_shape=tuple(x0.shape), num_classes=classes_of(model, train),
                                     head=head)


def _is_int(t: Tensor) -> bool:
    return t.dim() == 0 and not t.is_floating_point() and not t.is_complex()


def _column(data: Any, i: int) -> Optional[Tensor]:
    """Column ``i`` (0: inputs, 1: labels) of an in-memory dataset, without iterating it; None for others."""
    tensors = getattr(data, "tensors", None)
    if tensors is not None and len(tensors) == 2:
        return tensors[i]
    if isinstance(data, Subset):
        inner = _column(data.dataset, i)
        return None if inner is None else inner[torch.as_tensor(list(data.indices), dtype=torch.long)]
    return None
