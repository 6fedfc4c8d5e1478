"""``pystage-bench layers``: backward cost of masked layers vs the alternatives.

For each case and trainable fraction t (input trainable fraction = output trainable fraction):
* dense     - the plain layer, full backward (dW, db, dX)
* masked    - pystage's compiled op: dW/db for trainable units, dX for trainable inputs
* hook      - dense + a grad hook zeroing the frozen rows (the usual workaround)
* composed  - the same narrowed ATen calls as the op, composed in Python (the bar to clear)
``ideal_speedup`` is dense FLOPs / FLOPs of what the masked path computes. Fraction 1.0 is the layer at
full width with every unit trainable: its ``forward_overhead`` is the price of the masked layer itself.

The masked layer's backward runs the path pystage.autotune picked for the shape (masked kernels or
dense-then-discard): ``path`` says which, ``tuned_*_ms`` are the tuner's own measurements of each.
The paper-sized cases run by default; the GPU-sized ones (``LARGE``) run by default with ``--device
cuda`` and on the CPU only with ``--large`` (minutes each there).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pystage import autotune
from pystage.bench.composed import ComposedConv2d, ComposedLinear
from pystage.bench.report import environment, format_table, print_environment, write_json
from pystage.bench.timing import median_ms
from pystage.errors import UsageError
from pystage.layers import MaskedConv2d, MaskedLinear


@dataclass(frozen=True)
class Case:
    layer: str  # "linear" | "conv2d"
    n_in: int
    n_out: int
    batch: int
    spatial: int = 0  # H = W for conv2d

    @property
    def name(self) -> str:
        if self.layer == "linear":
            return f"linear {self.n_in}->{self.n_out} b{self.batch}"
        return f"conv3x3 {self.n_in}->{self.n_out} {self.spatial}x{self.spatial} b{self.batch}"


SMALL = (
    Case("linear", 4096, 4096, 256),
    Case("conv2d", 64, 64, 64, 32),
    Case("conv2d", 32, 32, 50, 32),  # the seed paper's layer (CIFAR-10, batch 50)
)
LARGE = (  # sized for a GPU: enough work per call that a backward is not launch-bound
    Case("conv2d", 128, 128, 64, 56),
    Case("conv2d", 256, 256, 64, 28),
    Case("linear", 8192, 8192, 4096),
)
CASES = SMALL + LARGE  # --cases indexes this tuple
FRACTIONS = (1.0, 0.5, 0.25, 0.1)  # 1.0: full width, every unit trainable (the forward-overhead case)


def _units(n: int, t: float) -> int:
    return max(1, round(n * t))


def _input(case: Case, device: str, dtype: torch.dtype) -> Tensor:
    shape = (case.batch, case.n_in) if case.layer == "linear" else (case.batch, case.n_in, case.spatial, case.spatial)
    return torch.randn(shape, device=device, dtype=dtype, requires_grad=True)


def _dense(case: Case, device: str, dtype: torch.dtype) -> nn.Module:
    if case.layer == "linear":
        return nn.Linear(case.n_in, case.n_out, device=device, dtype=dtype)
    return nn.Conv2d(case.n_in, case.n_out, 3, padding=1, device=device, dtype=dtype)


def _masked(dense: nn.Module, t_out: int, t_in: int) -> nn.Module:
    cls = MaskedLinear if isinstance(dense, nn.Linear) else MaskedConv2d
    return cls.from_dense(dense, trainable_units=t_out, trainable_inputs=t_in)


def _hooked(dense: nn.Module, t_out: int) -> nn.Module:
    """The usual workaround: full backward, then zero the frozen rows' gradients in a hook."""
    n_frozen = dense.weight.shape[0] - t_out
    keep = torch.ones(dense.weight.shape[0], device=dense.weight.device, dtype=dense.weight.dtype)
    keep[:n_frozen] = 0
    dense.weight.register_hook(lambda g: g * keep.view(-1, *([1] * (g.dim() - 1))))
    dense.bias.register_hook(lambda g: g * keep)
    return dense


def _backward_ms(module: nn.Module, x: Tensor, device: str, repeats: int) -> float:
    y = module(x)
    g = torch.randn_like(y)
    leaves = [x, *module.parameters()]

    def clear() -> None:
        for p in leaves:
            p.grad = None

    return median_ms(lambda: y.backward(g, retain_graph=True), device, warmup=2, repeats=repeats, setup=clear)


def _forward_ms(module: nn.Module, x: Tensor, device: str, repeats: int) -> float:
    return median_ms(lambda: module(x), device, warmup=3, repeats=repeats)


def ideal_speedup(case: Case, t_out: int, t_in: int) -> float:
    """Dense backward FLOPs (dW + dX) / masked backward FLOPs (dW of trainable rows + dX of trainable inputs)."""
    return 2 * case.n_out * case.n_in / (t_out * case.n_in + t_out * t_in)


def _masked_backward(masked: nn.Module, x: Tensor, device: str, repeats: int) -> tuple[float, dict]:
    """Backward time of the masked layer, and the autotuner's decision for its shape (tuned afresh)."""
    autotune.clear_cache()
    ms = _backward_ms(masked, x, device, repeats)
    decisions = autotune.decisions()
    if not decisions:
        return ms, {"path": "full-width", "tuned": False}  # the layer ran the dense call: nothing to tune
    d = decisions[-1]
    info = {"path": d.path, "tuned": d.measured}
    info.update({f"tuned_{name.replace('+', '_').replace('-', '_')}_ms": v for name, v in d.times_ms.items()})
    return ms, info


def measure(case: Case, t: float, device: str, dtype: torch.dtype, repeats: int, fwd_repeats: int,
            dense_ms: dict[tuple, float]) -> dict:
    t_out, t_in = _units(case.n_out, t), _units(case.n_in, t)
    x = _input(case, device, dtype)
    dense = _dense(case, device, dtype)
    masked = _masked(dense, t_out, t_in)
    composed = (ComposedLinear if case.layer == "linear" else ComposedConv2d)(masked)
    if (case, dtype) not in dense_ms:
        dense_ms[(case, dtype)] = _backward_ms(dense, x, device, repeats)
    masked_ms, path = _masked_backward(masked, x, device, repeats)
    row = {
        "layer": case.layer,
        "case": case.name,
        "dtype": str(dtype).replace("torch.", ""),
        "trainable_fraction": t,
        "trainable_units": t_out,
        "trainable_inputs": t_in,
        "dense_backward_ms": dense_ms[(case, dtype)],
        "masked_backward_ms": masked_ms,
        **path,
        "composed_backward_ms": _backward_ms(composed, x, device, repeats),
        "hook_backward_ms": _backward_ms(_hooked(_dense(case, device, dtype), t_out), x, device, repeats),
        "ideal_speedup": ideal_speedup(case, t_out, t_in),
    }
    fwd_dense = _forward_ms(dense, x, device, fwd_repeats)
    fwd_masked = _forward_ms(masked, x, device, fwd_repeats)
    row["speedup"] = row["dense_backward_ms"] / row["masked_backward_ms"]
    row["hook_speedup"] = row["dense_backward_ms"] / row["hook_backward_ms"]
    row["speedup_vs_ideal"] = row["speedup"] / row["ideal_speedup"]
    row["masked_vs_composed"] = row["masked_backward_ms"] / row["composed_backward_ms"]
    row["dense_forward_ms"], row["masked_forward_ms"] = fwd_dense, fwd_masked
    row["forward_overhead"] = fwd_masked / fwd_dense - 1
    return row


COLUMNS = ["case", "dtype", "trainable_fraction", "path", "dense_backward_ms", "masked_backward_ms",
           "composed_backward_ms", "hook_backward_ms", "speedup", "ideal_speedup", "speedup_vs_ideal",
           "masked_vs_composed", "forward_overhead"]


def _cases(spec: str, device: str, large: bool) -> tuple[Case, ...]:
    if spec == "default":
        return CASES if device == "cuda" or large else SMALL
    if spec == "all":
        return CASES
    try:
        return tuple(CASES[int(i)] for i in spec.split(","))
    except (ValueError, IndexError):
        raise UsageError(f"--cases must be 'default', 'all' or indices in [0, {len(CASES) - 1}], "
                         f"got {spec!r}") from None


def _dtypes(spec: str | None, device: str) -> list[torch.dtype]:
    names = spec.split(",") if spec else (["float32", "bfloat16"] if device == "cuda" else ["float32"])
    bad = [n for n in names if n not in ("float32", "float16", "bfloat16")]
    if bad:
        raise UsageError(f"--dtype takes float32, float16, bfloat16; got {', '.join(bad)}")
    return [getattr(torch, n) for n in names]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to run on (default cpu)")
    p.add_argument("--dtype", default=None,
                   help="comma-separated dtypes among float32, float16, bfloat16 (default: float32 on cpu, "
                        "float32,bfloat16 on cuda)")
    p.add_argument("--repeats", type=int, default=9, help="timed backward repeats per measurement (median)")
    p.add_argument("--forward-repeats", type=int, default=31, help="timed forward repeats (median)")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="trainable fractions, comma-separated")
    p.add_argument("--cases", default="default",
                   help="'default' (0-2 on cpu, all on cuda), 'all', or comma-separated indices into the case list: "
                        + ", ".join(f"{i}: {c.name}" for i, c in enumerate(CASES)))
    p.add_argument("--large", action="store_true",
                   help="on cpu, add the GPU-sized cases 3-5 to the default ones (minutes each on a CPU)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch.cuda.is_available() is False")
    torch.manual_seed(0)
    dtypes = _dtypes(args.dtype, args.device)
    cases = _cases(args.cases, args.device, args.large)
    fractions = [float(f) for f in args.fractions.split(",")]
    env = environment(args.device)
    env["dtype"] = ",".join(str(d).replace("torch.", "") for d in dtypes)
    env["autotune"] = autotune.autotune_enabled()
    print_environment(env)
    dense_ms: dict[tuple, float] = {}
    rows = [measure(c, t, args.device, dtype, args.repeats, args.forward_repeats, dense_ms)
            for dtype in dtypes for c in cases for t in fractions]
    print(format_table(rows, COLUMNS))
    write_json(args.json, {"benchmark": "layers", "environment": env, "results": rows})
    return 0
