"""Masked partial-gradient layers: ``MaskedLinear`` and ``MaskedConv2d``.

A masked layer holds the full width of a layer but uses its units (output rows
or channels) in age order (DESIGN.md, "Masked partial-gradient layers"):

* ``frozen_weight`` (buffer, ``(F, in_split, ...)``): units of earlier growth
  steps. They read only the inputs that existed when they were frozen, so
  what they compute never changes, and no optimizer can touch them.
* ``weight`` (Parameter, ``(T, in_active, ...)``): the newest, trainable units.
* units ``F + T ..`` are inactive: their output is zero and costs nothing.

Backward, run by the compiled op, computes dW only for the trainable units and
dX only for the inputs ``[in_split, in_active)`` (the trainable units of the
layer below). After :meth:`grow`, re-create the optimizer: the trainable
Parameter is a new tensor.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pystage import ops
from pystage.layer_errors import GrowthError, LayerArgumentError, check_bool, check_int, int_pair

_IntPair = Union[int, Sequence[int]]
__all__ = ["GrowthError", "LayerArgumentError", "MaskedConv2d", "MaskedLinear", "grow_chain"]


class _MaskedLayer(nn.Module):
    """Block bookkeeping shared by the linear and conv layers; subclasses define the op and the weight shape."""

    frozen_weight: Tensor
    frozen_bias: Optional[Tensor]

    def _init_blocks(self, n_out: int, n_in: int, units: Optional[int], inputs: Optional[int],
                     trainable_inputs: int, bias: bool, factory: dict) -> None:
        name = type(self).__name__
        units = n_out if units is None else check_int(name, "units", units, 1, n_out, "the layer's width")
        inputs = n_in if inputs is None else check_int(name, "inputs", inputs, 1, n_in, "the layer's input width")
        trainable_inputs = check_int(name, "trainable_inputs", trainable_inputs, 0, inputs, "active inputs")
        bias = check_bool(name, "bias", bias)
        self._steps: list[tuple[int, int]] = []  # frozen growth steps: (cumulative units, inputs they read)
        self.register_buffer("frozen_weight", torch.empty(self._wshape(0, inputs - trainable_inputs), **factory))
        self.register_buffer("frozen_bias", torch.empty(0, **factory) if bias else None)
        self.weight = nn.Parameter(torch.empty(self._wshape(units, inputs), **factory))
        self.bias = nn.Parameter(torch.empty(units, **factory)) if bias else None
        self._reset(self.weight, self.bias)

    # -- shapes ------------------------------------------------------------------------------------------
    @property
    def frozen_units(self) -> int:
        return self.frozen_weight.shape[0]

    @property
    def trainable_units(self) -> int:
        return self.weight.shape[0]

    @property
    def active_units(self) -> int:
        return self.frozen_units + self.trainable_units

    @property
    def in_split(self) -> int:
        """Inputs read by the frozen units; inputs from here on get a gradient."""
        return self.frozen_weight.shape[1]

    @property
    def in_active(self) -> int:
        """Inputs read by the trainable units."""
        return self.weight.shape[1]

    # -- growth ------------------------------------------------------------------------------------------
    def _reset(self, weight: Tensor, bias: Optional[Tensor]) -> None:
        fan_in = max(1, weight[0].numel()) if weight.shape[0] else 1
        with torch.no_grad():
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5)) if weight.numel() else None
            if bias is not None:
                bound = 1 / math.sqrt(fan_in)
                bias.uniform_(-bound, bound)

    def _full_width(self, x: Tensor, w: Tensor, fw: Tensor) -> bool:
        """Every unit active and trainable, and dX wanted for every input or none: the layer is its dense self."""
        if fw.shape[0] != 0 or w.shape[0] != self._n_out or w.shape[1] != self._n_in:
            return False
        return fw.shape[1] == 0 or not (x.requires_grad and torch.is_grad_enabled())  # in_split > 0: no dX below it

    def _frozen_padded(self, width: int) -> Tensor:
        """Frozen weights with zero columns appended up to ``width`` inputs (rule 2: older units ignore newer inputs)."""
        fw = self.frozen_weight
        pad = torch.zeros(self._wshape(fw.shape[0], width - fw.shape[1]), dtype=fw.dtype, device=fw.device)
        return torch.cat([fw, pad], dim=1)

    @property
    def frozen_steps(self) -> list[tuple[int, int]]:
        """Growth steps of the frozen block: ``(cumulative units, inputs read)``; one GEMM each in forward."""
        return list(self._steps)

    def _step_args(self) -> tuple[list[int], list[int]]:
        return [r for r, _ in self._steps], [c for _, c in self._steps]

    def get_extra_state(self) -> dict:
        return {"frozen_steps": self.frozen_steps}

    def set_extra_state(self, state: dict) -> None:
        self._steps = [tuple(s) for s in state.get("frozen_steps", [])]  # type: ignore[misc]

    def _freeze_trainable(self) -> None:
        if self.trainable_units:
            self._steps.append((self.active_units, self.in_active))
        with torch.no_grad():
            self.frozen_weight = torch.cat([self._frozen_padded(self.in_active), self.weight.detach()], dim=0)
            if self.bias is not None:
                self.frozen_bias = torch.cat([self.frozen_bias, self.bias.detach()])

    def grow(self, n_units: int, n_inputs: int = 0) -> nn.Parameter:
        """Freeze the trainable units and activate ``n_units`` new ones that read ``n_inputs`` more inputs.

        ``n_inputs`` is the number of units the layer below just added (0 when the input is data).
        Returns the new trainable weight; re-create the optimizer afterwards.
        """
        if not isinstance(n_units, int) or n_units < 1:
            raise GrowthError(f"n_units must be a positive int, got {n_units!r}")
        if self.active_units + n_units > self._n_out:
            raise GrowthError(f"cannot grow by {n_units} units: {self.active_units} of {self._n_out} are active, "
                              f"{self._n_out - self.active_units} remain")
        if n_inputs < 0 or self.in_active + n_inputs > self._n_in:
            raise GrowthError(f"cannot read {n_inputs} more inputs: {self.in_active} of {self._n_in} are active")
        self._freeze_trainable()
        factory = {"dtype": self.frozen_weight.dtype, "device": self.frozen_weight.device}
        self.weight = nn.Parameter(torch.empty(self._wshape(n_units, self.in_active + n_inputs), **factory))
        self.bias = nn.Parameter(torch.empty(n_units, **factory)) if self.bias is not None else None
        self._reset(self.weight, self.bias)
        return self.weight

    def freeze_all(self) -> None:
        """Freeze every active unit: the layer keeps its output and has nothing left to train."""
        self._freeze_trainable()
        factory = {"dtype": self.frozen_weight.dtype, "device": self.frozen_weight.device}
        self.weight = nn.Parameter(torch.empty(self._wshape(0, self.in_active), **factory))
        self.bias = nn.Parameter(torch.empty(0, **factory)) if self.bias is not None else None

    def _step_slices(self) -> list[tuple[int, int, int]]:
        """(first unit, end unit, inputs read) of each frozen growth step."""
        rows, cols = self._step_args()
        return [(rows[i - 1] if i else 0, rows[i], cols[i]) for i in range(len(rows))]

    def dense_weight(self) -> Tensor:
        """The layer as one dense ``(out, in, ...)`` weight: zeros where rule 2 or inactivity put them."""
        w = torch.zeros(self._wshape(self._n_out, self._n_in), dtype=self.weight.dtype, device=self.weight.device)
        w[: self.frozen_units, : self.in_split] = self.frozen_weight
        w[self.frozen_units: self.active_units, : self.in_active] = self.weight.detach()
        return w

    def dense_bias(self) -> Optional[Tensor]:
        if self.bias is None:
            return None
        b = torch.zeros(self._n_out, dtype=self.weight.dtype, device=self.weight.device)
        b[: self.active_units] = torch.cat([self.frozen_bias, self.bias.detach()])
        return b

    def _load_dense(self, weight: Tensor, bias: Optional[Tensor], trainable_units: Optional[int],
                    trainable_inputs: int) -> None:
        t = self._n_out if trainable_units is None else trainable_units
        if not 1 <= t <= self._n_out:
            raise GrowthError(f"trainable_units must be in [1, {self._n_out}], got {t}")
        if not 0 <= trainable_inputs <= self._n_in:
            raise GrowthError(f"trainable_inputs must be in [0, {self._n_in}] (the layer's input width), "
                              f"got {trainable_inputs}")
        f, split = self._n_out - t, self._n_in - trainable_inputs
        w = weight.detach().clone().contiguous()
        ops.block_triangular_mask_(w, [f, self._n_out], [split, self._n_in])
        self._steps = [(f, split)] if f else []
        with torch.no_grad():
            self.frozen_weight = w[:f, :split].contiguous()
            self.weight = nn.Parameter(w[f:].contiguous())
            if bias is not None:
                self.frozen_bias = bias.detach()[:f].clone()
                self.bias = nn.Parameter(bias.detach()[f:].clone())

    # -- state_dict: shapes change with growth, so loading adopts the saved shapes ------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("frozen_weight", "frozen_bias", "weight", "bias"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is None or current is None or saved.shape == current.shape:
                continue
            fresh = torch.empty(saved.shape, dtype=current.dtype, device=current.device)
            setattr(self, name, nn.Parameter(fresh) if isinstance(current, nn.Parameter) else fresh)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"{self._n_in}, {self._n_out}, frozen={self.frozen_units}, trainable={self.trainable_units}, "
                f"in_split={self.in_split}, in_active={self.in_active}, bias={self.bias is not None}")


class MaskedLinear(_MaskedLayer):
    """``nn.Linear`` whose units grow in blocks; frozen blocks cost nothing in backward.

    units: initially active (trainable) units (default: all); inputs: active input units (default: all);
    trainable_inputs: how many of the newest active inputs are trainable in the layer below (0 for data).
    Input ``(..., in_features)``, output ``(..., out_features)``; inactive outputs are zero.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, units: Optional[int] = None,
                 inputs: Optional[int] = None, trainable_inputs: int = 0, device=None, dtype=None) -> None:
        super().__init__()
        in_features = check_int("MaskedLinear", "in_features", in_features, 1)
        out_features = check_int("MaskedLinear", "out_features", out_features, 1)
        self.in_features, self.out_features = in_features, out_features
        self._n_in, self._n_out = in_features, out_features
        self._init_blocks(out_features, in_features, units, inputs, trainable_inputs, bias,
                          {"device": device, "dtype": dtype})

    def _wshape(self, rows: int, cols: int) -> tuple[int, ...]:
        return (rows, cols)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"MaskedLinear expects inputs with last dim in_features={self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        w, fw = self.weight, self.frozen_weight  # one module lookup each: this runs every step
        if self._full_width(x, w, fw):  # nothing frozen, nothing inactive: exactly the dense layer
            return F.linear(x, w, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()  # (B, in)
        if w.shape[0] == 0:
            y = self._frozen_forward(x2)
        else:
            y = ops.masked_linear(x2, fw, self.frozen_bias, w, self.bias, fw.shape[1], self.out_features,
                                  *self._step_args())
        return y.reshape(*lead, self.out_features)

    def _frozen_forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            y = x.new_zeros(x.shape[0], self.out_features)
            for r0, r1, c in self._step_slices():
                y[:, r0:r1] = F.linear(x[:, :c], self.frozen_weight[r0:r1, :c], _rows(self.frozen_bias, r0, r1))
        return y

    @classmethod
    def from_dense(cls, layer: nn.Linear, trainable_units: Optional[int] = None,
                   trainable_inputs: int = 0) -> "MaskedLinear":
        """A masked copy of ``layer``: all units active, the last ``trainable_units`` trainable (default all)."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(layer).__name__}")
        m = cls(layer.in_features, layer.out_features, layer.bias is not None,
                device=layer.weight.device, dtype=layer.weight.dtype)
        m._load_dense(layer.weight, layer.bias, trainable_units, trainable_inputs)
        return m

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function (inactive units output zero)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if lin.bias is not None:
                lin.bias.copy_(self.dense_bias())
        return lin


class MaskedConv2d(_MaskedLayer):
    """``nn.Conv2d`` (NCHW, groups=1) whose output channels grow in blocks; see :class:`MaskedLinear`.

    ``padding`` may be ``"same"`` (odd kernels, stride 1) or ``"valid"`` (no padding), as in ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntPair, stride: _IntPair = 1,
                 padding: Union[_IntPair, str] = 0, dilation: _IntPair = 1, bias: bool = True, *,
                 units: Optional[int] = None, inputs: Optional[int] = None, trainable_inputs: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__()
        in_channels = check_int("MaskedConv2d", "in_channels", in_channels, 1)
        out_channels = check_int("MaskedConv2d", "out_channels", out_channels, 1)
        self.in_channels, self.out_channels = in_channels, out_channels
        self._n_in, self._n_out = in_channels, out_channels
        self.kernel_size = int_pair("MaskedConv2d", "kernel_size", kernel_size, 1)
        self.stride = int_pair("MaskedConv2d", "stride", stride, 1)
        self.dilation = int_pair("MaskedConv2d", "dilation", dilation, 1)
        self.padding = self._resolve_padding(padding)
        self._init_blocks(out_channels, in_channels, units, inputs, trainable_inputs, bias,
                          {"device": device, "dtype": dtype})

    def _resolve_padding(self, padding: Union[_IntPair, str]) -> tuple[int, int]:
        if padding == "valid":  # nn.Conv2d's spelling of no padding (from_dense passes it through)
            return (0, 0)
        if padding != "same":
            return int_pair("MaskedConv2d", "padding", padding, 0)  # type: ignore[arg-type]
        if self.stride != (1, 1) or any(k % 2 == 0 for k in self.kernel_size):
            raise LayerArgumentError("MaskedConv2d", "padding", padding,
                                     f"numeric here (padding='same' needs stride 1 and odd kernels; this layer has "
                                     f"stride={self.stride}, kernel_size={self.kernel_size})")
        return tuple(d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation))  # type: ignore[return-value]

    def _wshape(self, rows: int, cols: int) -> tuple[int, ...]:
        return (rows, cols, *self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"MaskedConv2d expects (batch, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        w, fw = self.weight, self.frozen_weight  # one module lookup each: this runs every step
        if self._full_width(x, w, fw):  # nothing frozen, nothing inactive: exactly the dense layer
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)
        x = x.contiguous()
        if w.shape[0] == 0:
            return self._frozen_forward(x)
        return ops.masked_conv2d(x, fw, self.frozen_bias, w, self.bias, fw.shape[1], self.out_channels, self.stride,
                                 self.padding, self.dilation, *self._step_args())

    def _frozen_forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            y = None
            for r0, r1, c in self._step_slices():
                yf = F.conv2d(x[:, :c], self.frozen_weight[r0:r1, :c].contiguous(), _rows(self.frozen_bias, r0, r1),
                              self.stride, self.padding, self.dilation)
                if y is None:
                    y = yf.new_zeros(yf.shape[0], self.out_channels, yf.shape[2], yf.shape[3])
                y[:, r0:r1] = yf
        return y

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, trainable_units: Optional[int] = None,
                   trainable_inputs: int = 0) -> "MaskedConv2d":
        """A masked copy of ``layer`` (groups=1, numeric padding): all channels active, the last ``trainable_units`` trainable."""
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(layer).__name__}")
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise ValueError(f"from_dense supports groups=1 and zero padding, got groups={layer.groups}, "
                             f"padding_mode={layer.padding_mode!r}")
        m = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                layer.dilation, layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype)
        m._load_dense(layer.weight, layer.bias, trainable_units, trainable_inputs)
        return m

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function (inactive channels output zero)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if conv.bias is not None:
                conv.bias.copy_(self.dense_bias())
        return conv


def _rows(t: Optional[Tensor], r0: int, r1: int) -> Optional[Tensor]:
    return None if t is None else t[r0:r1]


def grow_chain(layers: Sequence[_MaskedLayer], n_units: Union[int, Sequence[int]]) -> list[nn.Parameter]:
    """Grow a chain of masked layers together: layer k reads the units layer k-1 just added.

    The first layer reads data (no new inputs). Returns the new trainable Parameters.
    """
    counts = [n_units] * len(layers) if isinstance(n_units, int) else list(n_units)
    if len(counts) != len(layers):
        raise GrowthError(f"n_units lists {len(counts)} counts for {len(layers)} layers")
    new_inputs, params = 0, []
    for layer, n in zip(layers, counts):
        params.append(layer.grow(n, new_inputs))
        new_inputs = n
    return params
