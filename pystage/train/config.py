"""Configuration of stage training: optimiser hyper-parameters, the methods, and the ``fit`` options each supports."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pystage.optim import TrainConfig
from pystage.train.errors import FitArgumentError, UnsupportedOptionError

__all__ = ["FIT_OPTIONS", "GROWING_METHODS", "METHODS", "Method", "TrainConfig", "check_options", "get_method"]

# fit's optional arguments with their defaults: a method that does not support one raises when it is given another
# value ("distributed": running inside a process group of more than one process)
FIT_OPTIONS: dict[str, Any] = {"memory_budget": None, "search": None, "store": None, "checkpoint_dir": None,
                               "share_prefixes": True, "store_dtype": torch.float16, "measure_memory": True,
                               "growth": None, "distributed": False, "compile_mode": None}
_STAGE_OPTIONS = frozenset(FIT_OPTIONS) - {"growth"}


@dataclass(frozen=True)
class Method:
    """A training method as data: which stages train together, where their input comes from, what it supports.

    per_stage: train each stage on its own (with its head) instead of the whole net at once.
    source: "data" (raw batches), "store" (stored features of the stage before) or
            "recompute" (raw batches pushed through the frozen prefix every batch).
    checkpoint: recompute activations in backward (torch.utils.checkpoint) to save memory.
    grows: "module:function" that trains a growing method (``fit`` dispatches to it).
    options: the ``FIT_OPTIONS`` it supports.
    """

    name: str
    per_stage: bool
    source: str
    checkpoint: bool = False
    grows: str = ""
    options: frozenset = _STAGE_OPTIONS


METHODS = {
    "total": Method("total", per_stage=False, source="data", options=_STAGE_OPTIONS - {"store_dtype"}),
    "partial": Method("partial", per_stage=True, source="store"),
    "partial-recompute": Method("partial-recompute", per_stage=True, source="recompute",
                                options=_STAGE_OPTIONS - {"store_dtype"}),
    "checkpoint": Method("checkpoint", per_stage=False, source="data", checkpoint=True,
                         options=_STAGE_OPTIONS - {"store_dtype"}),
}

# Growing methods (docs/growing.md) take fit(..., growth=<their config>); kept apart from METHODS, whose
# entries all run the stage loop with the same report layout.
GROWING_METHODS = {
    "incremental": Method("incremental", per_stage=True, source="store",
                          grows="pystage.train.incremental:fit_incremental",
                          options=frozenset({"store", "store_dtype", "checkpoint_dir", "share_prefixes",
                                             "measure_memory", "growth"})),
    "capacity": Method("capacity", per_stage=False, source="data", grows="pystage.train.capacity:fit_capacity",
                       options=frozenset({"measure_memory", "growth"})),
}


def get_method(name: str) -> Method:
    if isinstance(name, str) and name in METHODS:
        return METHODS[name]
    if isinstance(name, str) and name in GROWING_METHODS:
        return GROWING_METHODS[name]
    raise FitArgumentError("method", name, f"one of {', '.join([*METHODS, *GROWING_METHODS])}")


def check_options(method: Method, given: dict[str, Any]) -> None:
    """UnsupportedOptionError for the first option in ``given`` that ``method`` does not support but was set."""
    for name, value in given.items():
        if name not in method.options and not _is_default(value, FIT_OPTIONS[name]):
            raise UnsupportedOptionError(method.name, name, value, method.options)


def _is_default(value: Any, default: Any) -> bool:
    return value is default or (type(value) is type(default) and value == default)
