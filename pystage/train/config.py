"""Configuration of stage training: optimiser hyper-parameters and the method strategies."""
from __future__ import annotations

from dataclasses import dataclass

from pystage.optim import TrainConfig

__all__ = ["GROWING_METHODS", "METHODS", "Method", "TrainConfig", "get_method"]


@dataclass(frozen=True)
class Method:
    """A training method as data: which stages train together, where their input comes from.

    per_stage: train each stage on its own (with its head) instead of the whole net at once.
    source: "data" (raw batches), "store" (stored features of the stage before) or
            "recompute" (raw batches pushed through the frozen prefix every batch).
    checkpoint: recompute activations in backward (torch.utils.checkpoint) to save memory.
    grows: "module:function" that trains a growing method with its own loop (``fit`` dispatches to it).
    """

    name: str
    per_stage: bool
    source: str
    checkpoint: bool = False
    grows: str = ""


METHODS = {
    "total": Method("total", per_stage=False, source="data"),
    "partial": Method("partial", per_stage=True, source="store"),
    "partial-recompute": Method("partial-recompute", per_stage=True, source="recompute"),
    "checkpoint": Method("checkpoint", per_stage=False, source="data", checkpoint=True),
}

# Growing methods (docs/growing.md) take fit(..., growth=<their config>); kept apart from METHODS, whose
# entries all run the stage loop with the same report layout.
GROWING_METHODS = {
    "incremental": Method("incremental", per_stage=True, source="store",
                          grows="pystage.train.incremental:fit_incremental"),
    "capacity": Method("capacity", per_stage=False, source="data", grows="pystage.train.capacity:fit_capacity"),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name] if name in METHODS else GROWING_METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {', '.join([*METHODS, *GROWING_METHODS])}, got {name!r}") from None
