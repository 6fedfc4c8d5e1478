"""Model zoo: Griswold's CNN1-CNN8, the deep ``plain-<depth>-<width>`` and ``flat-<depth>-<width>`` families.

Each is a staged ``nn.Sequential``.

A model is an ``nn.Sequential`` of layers (each conv is followed by its own
``nn.ReLU`` module) with the attribute ``split_points``: the layer indices where
a new stage starts. ``()`` means one stage (total learning). Stage ``i`` is
``model[bounds[i]:bounds[i + 1]]`` with ``bounds = (0, *split_points, len(model))``
(see :func:`stage_bounds`). Classifier heads are *not* part of the model: the
training code adds one per stage. ``get`` also sets ``model.name``,
``model.in_channels`` and ``model.num_classes`` (the number of classes the heads
should score) so that training code can build the heads.

Weights: Kaiming-normal (fan-in, ReLU gain) convs with zero bias, so deep plain
nets train without BatchNorm; deterministic given ``torch.manual_seed``. The flat
family has BatchNorm by default: every layer keeps the input's resolution, so each
adds the same activation memory (the default ``pystage-bench`` job trains one under
a budget a quarter of what end-to-end training needs).
docs/models.md gives the reading of the paper's Table 1.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Optional, Sequence, Union

from torch import nn

from pystage.errors import PystageError

logger = logging.getLogger(__name__)

Factory = Callable[..., nn.Sequential]
"""``factory(in_channels: int, **kw) -> nn.Sequential`` with ``split_points`` set."""

# Griswold, "Applying Partial Learning to CNNs", Table 1: one tuple per stage;
# "c<k>" = Conv-k-32 (+ ReLU), "p" = Pool-2 (2x2 max-pool, stride 2).
CNN_TABLE: dict[str, tuple[tuple[str, ...], ...]] = {
    "cnn1": (("c3", "c3", "p"),),
    "cnn2": (("c3",), ("c3", "p")),
    "cnn3": (("c3", "c1"), ("c3", "c1", "p")),
    "cnn4": (("c3", "c3"), ("c3", "c3", "p")),
    "cnn5": (("c3", "c1", "p"), ("c3", "c1", "p")),
    "cnn6": (("c3", "c3", "p"), ("c3", "c3", "p")),
    "cnn7": (("c3", "c1", "p"),) * 3,
    "cnn8": (("c3", "c3", "p"),) * 3,
}

_PLAIN = re.compile(r"plain-(\d+)-(\d+)")
_PLAIN_PATTERN = "plain-<depth>-<width>"
_FLAT = re.compile(r"flat-(\d+)-(\d+)")
_FLAT_PATTERN = "flat-<depth>-<width>"


class ModelError(PystageError, ValueError):
    """An unknown model name or an invalid model option; the message names the argument and the valid values."""


def _conv_block(c_in: int, c_out: int, kernel: int, batch_norm: bool) -> list[nn.Module]:
    """Conv (``same`` padding) [+ BatchNorm] + ReLU."""
    if kernel % 2 != 1:
        raise ModelError(f"kernel must be odd for 'same' padding, got {kernel}")
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=not batch_norm)
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU()] if batch_norm else [conv, nn.ReLU()]


def with_splits(model: nn.Sequential, split_points: Sequence[int]) -> nn.Sequential:
    """Validate ``split_points`` against ``model`` and attach them as ``model.split_points``; returns ``model``."""
    points = tuple(int(p) for p in split_points)
    if any(not 0 < p < len(model) for p in points) or list(points) != sorted(set(points)):
        raise ModelError(f"split_points must be strictly increasing layer indices in [1, {len(model) - 1}] "
                         f"(the model has {len(model)} layers), got {tuple(split_points)}")
    model.split_points = points  # type: ignore[assignment]
    return model


def stage_bounds(model: nn.Sequential) -> tuple[int, ...]:
    """``(0, *model.split_points, len(model))``: stage ``i`` is ``model[b[i]:b[i + 1]]``."""
    return (0, *getattr(model, "split_points", ()), len(model))


def stages(model: nn.Sequential) -> list[nn.Sequential]:
    """The stages of ``model`` as ``nn.Sequential`` slices that share the model's modules (no copies)."""
    b = stage_bounds(model)
    return [model[b[i]:b[i + 1]] for i in range(len(b) - 1)]  # type: ignore[misc]


def cnn_from_table(stage_layers: Sequence[Sequence[str]], in_channels: int = 3, width: int = 32,
                   batch_norm: bool = False) -> nn.Sequential:
    """Build a staged CNN from per-stage layer codes (``"c<k>"`` conv k x k, ``"p"`` 2x2 max-pool)."""
    layers: list[nn.Module] = []
    splits: list[int] = []
    c = in_channels
    for s, codes in enumerate(stage_layers):
        if s > 0:
            splits.append(len(layers))
        for code in codes:
            if code == "p":
                layers.append(nn.MaxPool2d(2, 2))
            elif re.fullmatch(r"c\d+", code):
                layers += _conv_block(c, width, int(code[1:]), batch_norm)
                c = width
            else:
                raise ModelError(f"layer code must be 'c<kernel>' or 'p', got {code!r} in stage {s + 1}")
    return with_splits(nn.Sequential(*layers), splits)


def _griswold(name: str) -> Factory:
    def factory(in_channels: int = 3, *, width: int = 32, batch_norm: bool = False) -> nn.Sequential:
        return cnn_from_table(CNN_TABLE[name], in_channels, width, batch_norm)
    factory.__doc__ = f"{name.upper()} of Griswold's Table 1: " + " | ".join(
        ", ".join(CNN_TABLE[name][s]) for s in range(len(CNN_TABLE[name])))
    return factory


def _pool_after(depth: int, input_size: int) -> set[int]:
    """Conv indices (1-based) followed by a pool: the end of each third, while the map stays >= 4 pixels."""
    after, size = set(), input_size
    for k in (1, 2, 3):
        i = round(depth * k / 3)
        if i > 0 and i not in after and size // 2 >= 4:
            after.add(i)
            size //= 2
    return after


def plain(depth: int, width: int, in_channels: int = 3, *, batch_norm: bool = False,
          input_size: Union[int, Sequence[int]] = 32, stages: Optional[int] = None) -> nn.Sequential:
    """``depth`` conv3-``width`` layers (+ ReLU, optional BatchNorm), a 2x2 max-pool after each third of the depth.

    Pools stop once the map would drop below 4 pixels (``input_size``: the input's
    spatial size, the smaller side if a pair). ``stages=k`` splits evenly by conv
    count, before a conv, so a stage's trailing pool stays with it; the default is
    one stage (a planner chooses the split points later).
    """
    if depth < 1 or width < 1:
        raise ModelError(f"plain-<depth>-<width> needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
    size = min(input_size) if not isinstance(input_size, int) else input_size
    pools = _pool_after(depth, size)
    layers: list[nn.Module] = []
    conv_start: list[int] = []  # layer index where conv i (0-based) starts
    c = in_channels
    for i in range(1, depth + 1):
        conv_start.append(len(layers))
        layers += _conv_block(c, width, 3, batch_norm)
        c = width
        if i in pools:
            layers.append(nn.MaxPool2d(2, 2))
    return with_splits(nn.Sequential(*layers), _even_splits(conv_start, stages))


def _even_splits(conv_start: Sequence[int], stages: Optional[int]) -> list[int]:
    """Split points for ``stages`` stages of about equal conv count, each just before a conv (default: one stage)."""
    depth, k = len(conv_start), 1 if stages is None else stages
    if not 1 <= k <= depth:
        raise ModelError(f"stages must be in [1, {depth}] (one conv per stage at most), got {stages}")
    return [conv_start[round(depth * s / k)] for s in range(1, k)]


def flat(depth: int, width: int, in_channels: int = 3, *, batch_norm: bool = True,
         stages: Optional[int] = None) -> nn.Sequential:
    """``depth`` conv3-``width`` + BatchNorm + ReLU layers at the input's resolution, then one 2x2 max-pool.

    No layer shrinks the map, so every layer adds the same activation memory: end-to-end
    training needs several times what a stage of one layer does (the memory a stage needs
    stays put as the net gets deeper). ``batch_norm=False`` drops the BatchNorm; ``stages=k``
    splits evenly by conv count, before a conv; the default is one stage.
    """
    if depth < 1 or width < 1:
        raise ModelError(f"flat-<depth>-<width> needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
    layers: list[nn.Module] = []
    conv_start: list[int] = []
    c = in_channels
    for _ in range(depth):
        conv_start.append(len(layers))
        layers += _conv_block(c, width, 3, batch_norm)
        c = width
    layers.append(nn.MaxPool2d(2, 2))
    return with_splits(nn.Sequential(*layers), _even_splits(conv_start, stages))


_PATTERNS = {_PLAIN: (_PLAIN_PATTERN, plain), _FLAT: (_FLAT_PATTERN, flat)}


_REGISTRY: dict[str, Factory] = {name: _griswold(name) for name in CNN_TABLE}


def register(name: str, factory: Factory, *, overwrite: bool = False) -> None:
    """Make ``get(name)`` call ``factory(in_channels, **kw)``; it must return an ``nn.Sequential``."""
    key = name.lower()
    if not callable(factory):
        raise ModelError(f"factory for {name!r} must be callable, got {type(factory).__name__}")
    for regex, (pattern, _) in _PATTERNS.items():
        if regex.fullmatch(key):
            raise ModelError(f"name {name!r} is reserved by the pattern {pattern}")
    if key in _REGISTRY and not overwrite:
        raise ModelError(f"model name {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = factory


def names() -> list[str]:
    """Registered model names, then the name patterns (``plain-<depth>-<width>``, ``flat-<depth>-<width>``)."""
    return sorted(_REGISTRY) + [pattern for pattern, _ in _PATTERNS.values()]


def get(name: str, in_channels: int = 3, num_classes: int = 10, *,
        split_points: Optional[Sequence[int]] = None, pathways: Optional[str] = None,
        **kw: object) -> nn.Module:
    """Build model ``name`` (see :func:`names`); ``split_points`` overrides the model's own stages.

    ``kw`` goes to the factory: ``width``, ``batch_norm`` for cnn1-8; ``batch_norm``,
    ``input_size``, ``stages`` for ``plain-<depth>-<width>``; ``batch_norm`` (default True),
    ``stages`` for ``flat-<depth>-<width>``. ``pathways="concat"|"sum"`` (plain family
    only) wraps the net in a :class:`pystage.pathways.PathwayNet`; with None the result is an ``nn.Sequential``.
    """
    if pathways is not None and not _PLAIN.fullmatch(name.lower()):
        raise ModelError(f"pathways is an option of the {_PLAIN_PATTERN} family, got it for {name!r}")
    if in_channels < 1 or num_classes < 1:
        raise ModelError(f"in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}")
    key = name.lower()
    family = next(((f, m) for regex, (_, f) in _PATTERNS.items() if (m := regex.fullmatch(key))), None)
    if family is not None:
        factory, match = family
        model = factory(int(match.group(1)), int(match.group(2)), in_channels, **kw)  # type: ignore[operator]
    elif key in _REGISTRY:
        model = _REGISTRY[key](in_channels, **kw)
    else:
        raise ModelError(f"unknown model name {name!r}; expected one of {', '.join(names())}")
    if not isinstance(model, nn.Sequential):
        raise ModelError(f"factory for {name!r} must return nn.Sequential, got {type(model).__name__}")
    with_splits(model, getattr(model, "split_points", ()) if split_points is None else split_points)
    model.name, model.in_channels, model.num_classes = key, in_channels, num_classes  # type: ignore[assignment]
    logger.debug("built %s: %d layers, split_points=%s", key, len(model), model.split_points)
    if pathways is not None:
        from pystage.pathways import with_pathways

        return with_pathways(model, pathways)
    return model
