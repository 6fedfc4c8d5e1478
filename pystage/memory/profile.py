"""Per-layer training memory of an ``nn.Sequential``, and the peak of any candidate stage [i, j) + head.

``profile(model, input_shape, batch_size, ...)`` returns a :class:`MemoryProfile`:
* ``layers``: one :class:`LayerMemory` per top-level layer (from one meta pass of the whole net);
* ``stage(i, j)``: the :class:`StageMemory` of a training step of ``model[i:j]`` + head, computed by
  running that step (meta estimate, or real on CPU/CUDA with ``source="measure"``), cached per (i, j).
The stage peak is computed directly, not summed from layers: the peak of [i, j) is not the sum of its layers'.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from pystage.errors import PystageError
from pystage.memory.cuda import CudaTarget
from pystage.memory.measure import StageMemory, estimate_step, measure_cpu_step, measure_cuda_step
from pystage.memory.step import (HeadFactory, Standin, build_stage, linear_head, make_optimizer, meta_copy,
                                 real_copy, target_config, training_step, warm_up_state)
from pystage.memory.tracker import CUDA_BLOCK, LiveBytes, storage_bytes
from pystage.optim import TrainConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerMemory:
    """One layer inside a stage (its input requires grad, except layer 0's), at the profile's batch size."""

    index: int
    name: str
    out_shape: tuple[int, ...]  # one sample's output shape
    output_bytes: int  # (B, *out_shape)
    param_bytes: int  # = gradient bytes for trainable parameters
    grad_bytes: int
    optimizer_bytes: int  # optimizer state for this layer's parameters
    saved_bytes: int  # storages its autograd nodes keep for backward (parameters excluded)
    forward_peak: int  # highest live bytes above the count before its forward, during its forward
    backward_peak: int  # highest live bytes above the count when its output's gradient arrives, during its backward
    head_param_bytes: int  # parameters of the head of a stage that ends after this layer
    fallback: bool = False  # estimated by the conservative stand-in (no meta kernel)


@dataclass
class MemoryProfile:
    """What the planner needs: per-layer rows, and stage peaks on demand (cached)."""

    model: nn.Sequential
    input_shape: tuple[int, ...]
    batch_size: int
    dtype: torch.dtype
    optimizer: "str | TrainConfig"
    num_classes: int
    device: torch.device  # the target
    source: str  # "estimate" | "measure"
    head: HeadFactory
    shapes: list[torch.Size]  # shapes[k] = one sample's input of layer k; shapes[len] = the model's output
    layers: list[LayerMemory] = field(default_factory=list)
    fallback: frozenset[int] = frozenset()
    cuda: Optional[CudaTarget] = None  # a CUDA estimate's target (capability, workspaces)
    _cache: dict[tuple[int, int], StageMemory] = field(default_factory=dict, repr=False)
    _meta: Optional[list[nn.Module]] = field(default=None, repr=False)
    _meta_state: Optional[torch.optim.Optimizer] = field(default=None, repr=False)  # state of all meta layers
    _saved: list[dict[int, int]] = field(default_factory=list, repr=False)  # per layer: storage -> bytes saved

    def __len__(self) -> int:
        return len(self.model)

    def stage(self, start: int, stop: int) -> StageMemory:
        """Memory of one training step of ``model[start:stop]`` + head (cached)."""
        if not 0 <= start < stop <= len(self.model):
            raise IndexError(f"stage [{start}, {stop}) is out of range for a model of {len(self.model)} layers")
        key = (start, stop)
        if key not in self._cache:
            self._cache[key] = self._run(start, stop)
            logger.debug("stage [%d, %d): peak %d bytes (%s)", start, stop, self._cache[key].peak, self.source)
        return self._cache[key]

    def stage_peak(self, start: int, stop: int) -> int:
        return self.stage(start, stop).peak

    def lower_bound(self, start: int, stop: int) -> int:
        """A cheap lower bound of ``stage_peak(start, stop)``, from the per-layer rows, without running the step.

        At the end of the forward pass the stage holds its parameters and optimizer state, its input batch
        and labels, and every tensor its layers saved for backward. Layers after the stage's first trainable
        layer see an input that requires grad, as in the whole-model pass, so they save the same storages
        (counted once when layers share one); what the first layers save is left out. Grows with ``stop``.
        """
        rows, round_to = self.layers, CUDA_BLOCK if self.device.type == "cuda" else 1
        first = next((k for k in range(start, stop) if rows[k].grad_bytes), stop)
        saved: dict[int, int] = {}
        for k in range(first + 1, stop):
            saved.update(self._saved[k])
        batch = -(-self.batch_size * self.input_bytes(start) // round_to) * round_to
        labels = -(-self.batch_size * 8 // round_to) * round_to
        own = sum(rows[k].param_bytes + rows[k].optimizer_bytes for k in range(start, stop))
        return own + batch + labels + sum(saved.values())

    def total(self) -> StageMemory:
        """End-to-end training of the whole model with one head (total learning)."""
        return self.stage(0, len(self.model))

    def input_bytes(self, k: int) -> int:
        """Bytes of one sample of the input of layer ``k`` (``k = len``: the model's output), in ``dtype``."""
        return self.shapes[k].numel() * self.dtype.itemsize

    def _build(self, start: int, stop: int, layers: list[nn.Module], device: torch.device):  # noqa: ANN202
        """The stage on ``device``; on meta with the optimizer implementation the target runs (foreach or not)."""
        meta = device.type == "meta"
        return build_stage(layers, self.shapes[start], self.shapes[stop], self.batch_size, device, self.dtype,
                           target_config(self.optimizer, self.device) if meta else self.optimizer,
                           self.num_classes, self.head, self._meta_state if meta else None)

    def _run(self, start: int, stop: int) -> StageMemory:
        if self.source == "estimate":
            stage = self._build(start, stop, self._meta_layers()[start:stop], torch.device("meta"))
            fb = tuple(k for k in range(start, stop) if k in self.fallback)
            return estimate_step(stage, start, stop, self.device, fb, self.cuda)
        real = self.model[start:stop]
        if self.device.type == "cuda":
            return measure_cuda_step(lambda: self._build(start, stop, real_copy(real, self.device, self.dtype),
                                                         self.device), start, stop, self.device)
        stage = self._build(start, stop, real_copy(real, self.device, self.dtype), self.device)
        return measure_cpu_step(stage, start, stop)

    def _meta_layers(self) -> list[nn.Module]:
        """Meta copies of the model's layers (stand-ins where needed), with optimizer state allocated once."""
        if self._meta is None:
            layers = meta_copy(list(self.model), self.dtype)
            for k in self.fallback:
                layers[k] = Standin(layers[k], self.shapes[k + 1])
            params = [p for m in layers for p in m.parameters() if p.requires_grad]
            self._meta_state = make_optimizer(target_config(self.optimizer, self.device), params)
            warm_up_state(params, self._meta_state)
            self._meta = layers
        return self._meta


class ProfileError(PystageError, ValueError):
    """A layer cannot run on the shape it is given (``layer``: its index, ``in_shape``: one sample's input)."""

    def __init__(self, message: str, *, layer: int, in_shape: tuple[int, ...]) -> None:
        super().__init__(message)
        self.layer, self.in_shape = layer, in_shape


def _shapes(model: nn.Sequential, input_shape: Sequence[int], dtype: torch.dtype) -> tuple[list[torch.Size], set[int]]:
    """Per-sample input shape of every layer (+ the output), and the layers that cannot run on meta tensors.

    A layer that fails on meta tensors is run once on a real zero sample: if that works, the layer only
    lacks a meta kernel (it gets the stand-in); if that fails too, the input does not fit the layer
    (a wrong ``input_shape``) and :class:`ProfileError` says so.
    """
    shapes, fallback = [torch.Size(input_shape)], set()
    x = torch.empty(1, *input_shape, device="meta", dtype=dtype)
    for k, (layer, meta) in enumerate(zip(model, meta_copy(list(model), dtype))):
        try:
            with torch.no_grad():
                x = meta(x)
        except RuntimeError as e:  # NotImplementedError is a RuntimeError: no meta kernel, or a shape error
            x = _real_output(k, layer, x, dtype, tuple(input_shape))
            logger.warning("layer %d (%s) has an op without a meta kernel (%s); its memory is estimated with a "
                           "conservative stand-in (saves input + output, output-sized temporaries)",
                           k, type(layer).__name__, str(e).splitlines()[0])
            fallback.add(k)
        shapes.append(x.shape[1:])
    return shapes, fallback


def _real_output(k: int, layer: nn.Module, x: Tensor, dtype: torch.dtype, input_shape: tuple[int, ...]) -> Tensor:
    """The layer's output for one real zero sample, on the layer's own device, as a meta tensor."""
    p = next(iter(layer.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    try:
        with torch.no_grad():
            y = layer(torch.zeros(x.shape, device=device, dtype=p.dtype if p is not None else dtype))
    except RuntimeError as e:
        in_shape = tuple(x.shape[1:])
        raise ProfileError(f"layer {k} ({type(layer).__name__}) cannot take a per-sample input of shape {in_shape} "
                           f"(from input_shape={input_shape}): {str(e).splitlines()[0]}; check input_shape",
                           layer=k, in_shape=in_shape) from e
    return torch.empty(y.shape, device="meta", dtype=dtype)


def _layer_rows(prof: MemoryProfile) -> tuple[list[LayerMemory], list[dict[int, int]]]:
    """One meta pass of the whole model + head under :class:`LiveBytes`, with a phase per layer and direction."""
    round_to = CUDA_BLOCK if prof.device.type == "cuda" else 1
    meta = prof._meta_layers()
    stage = prof._build(0, len(meta), meta, torch.device("meta"))
    params = {id(p.untyped_storage()) for m in (stage.body, stage.head) for p in m.parameters()}
    saved: dict[int, dict[int, int]] = {k: {} for k in range(-1, len(meta))}
    current = [0]

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        if id(st) not in params and t.device.type == "meta":
            saved[current[0]][id(st)] = -(-st.nbytes() // round_to) * round_to
        return t

    tracker = LiveBytes("meta", round_to)
    tracker.track(stage.resident())

    def pre(k: int):  # noqa: ANN202
        def hook(_m: nn.Module, _args: object) -> None:
            current[0] = k
            tracker.phase(f"f{k}")
        return hook

    def post(k: int):  # noqa: ANN202
        def hook(_m: nn.Module, _args: object, out: Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: tracker.phase(f"b{k}"))
            tracker.phase(f"f{k}-end")
            current[0] = -1  # the head's saved tensors belong to no layer
        return hook

    handles = [h for k, m in enumerate(meta) for h in (m.register_forward_pre_hook(pre(k)),
                                                          m.register_forward_hook(post(k)))]
    try:
        with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            training_step(stage, tracker.phase)
    finally:
        for h in handles:
            h.remove()
    ph = tracker.phase_dict()
    state = {id(p): sum(storage_bytes([v], round_to) for v in s.values() if isinstance(v, Tensor)
                        and v.device.type == "meta") for p, s in stage.optimizer.state.items()}
    rows = []
    for k, layer in enumerate(meta):
        ps = list(layer.parameters())
        pb = storage_bytes(ps, round_to) if ps else 0
        gb = storage_bytes([p for p in ps if p.requires_grad], round_to) if ps else 0
        fwd, bwd = ph[f"f{k}"], ph.get(f"b{k}")
        rows.append(LayerMemory(
            index=k, name=_name(prof.model[k]), out_shape=tuple(prof.shapes[k + 1]),
            output_bytes=prof.batch_size * prof.input_bytes(k + 1), param_bytes=pb, grad_bytes=gb,
            optimizer_bytes=sum(state.get(id(p), 0) for p in ps), saved_bytes=sum(saved[k].values()),
            forward_peak=fwd.peak - fwd.start, backward_peak=(bwd.peak - bwd.start) if bwd else 0,
            head_param_bytes=_head_params(prof, k + 1), fallback=k in prof.fallback))
    return rows, [saved[k] for k in range(len(meta))]


def _head_params(prof: MemoryProfile, k: int) -> int:
    with torch.device("meta"):
        head = prof.head(prof.shapes[k], prof.num_classes)
    return sum(p.numel() for p in head.parameters()) * prof.dtype.itemsize


def _name(layer: nn.Module) -> str:
    text = repr(layer).replace("\n", " ")
    return text if len(text) <= 48 else text[:45] + "..."


def profile(model: nn.Sequential, input_shape: Sequence[int], batch_size: int, *, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32, optimizer: "str | TrainConfig" = "adam", num_classes: int = 10,
            head: HeadFactory = linear_head, source: str = "estimate",
            cuda: Optional[CudaTarget] = None) -> MemoryProfile:
    """Profile ``model`` for training at ``batch_size`` on ``device``; stage peaks are computed on demand.

    ``source="estimate"`` runs on meta tensors (nothing allocated; works for a CUDA target on a CPU machine);
    ``source="measure"`` runs real steps on ``device`` (CPU: live-tensor accounting; CUDA: max_memory_allocated).
    ``optimizer``: a name or the ``TrainConfig`` training will use. ``cuda``: the GPU a CUDA estimate is for
    (default :meth:`CudaTarget.detect`: this machine's GPU with measured workspaces, or the sm_90 model).
    """
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        raise TypeError(f"model must be a non-empty nn.Sequential, got {type(model).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if source not in ("estimate", "measure"):
        raise ValueError(f"source must be 'estimate' or 'measure', got {source!r}")
    device = torch.device(device)
    if source == "measure" and device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("source='measure' on a CUDA device needs CUDA; use source='estimate' on this machine")
    shapes, fallback = _shapes(model, tuple(input_shape), dtype)
    if device.type == "cuda" and source == "estimate" and cuda is None:
        cuda = CudaTarget.detect(device)
    prof = MemoryProfile(model, tuple(input_shape), batch_size, dtype, optimizer, num_classes, device, source, head,
                         shapes, fallback=frozenset(fallback), cuda=cuda)
    prof.layers, prof._saved = _layer_rows(prof)
    return prof
