"""What verifying every chunk's CRC as it is read costs `partial`, next to its epoch time (cnn8).

For the stored features `partial` trains its later stages on (stage 1's and stage 2's, float16, train split),
one epoch of `entry.stream()` is timed with `check=True` and with `check=False`, interleaved, median of
`--repeats`, in the two ways an entry is read: resident (it fits half the store's RAM budget: loaded and
verified once, then served from RAM) and streamed in windows (`--window-budget`, below the entry's size:
every epoch reads and verifies every chunk again). The reference is `partial`'s epoch: one epoch of each of
the three stages' training through the engine (stage 1 on raw data, stages 2 and 3 on the stored features).
cost = (checked - unchecked stream time of both entries) / partial's epoch time.

    python bench/checksum_cost.py [--n 5000] [--repeats 5] [--window-budget 16MiB] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

import pystage
from pystage.train.engine import Cursor, Engine
from pystage.train.sources import DatasetSource, StoreSource


def epoch_s(entry, check: bool) -> float:
    t = time.perf_counter()
    for _ in entry.stream(batch_size=50, seed=0, epoch=0, check=check):
        pass
    return time.perf_counter() - t


def stream_costs(store_root: str, keys: list[str], budget: str, repeats: int) -> dict[str, float]:
    """Median epoch seconds of every entry together, checked and unchecked (fresh entry objects: a resident entry
    pays its one verified load in the first epoch, which is what a stage of one epoch pays)."""
    checked, unchecked = [], []
    for r in range(repeats):
        for check in ((True, False) if r % 2 == 0 else (False, True)):
            store = pystage.FeatureStore(store_root, ram_budget=budget)
            entries = [store.open(k) for k in keys]
            (checked if check else unchecked).append(sum(epoch_s(e, check) for e in entries))
    return {"checked_s": statistics.median(checked), "unchecked_s": statistics.median(unchecked)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/checksum_cost.py", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--window-budget", default="16MiB")
    p.add_argument("--json")
    args = p.parse_args(argv)
    print(f"device cpu, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"command: python bench/checksum_cost.py {' '.join(argv)}")
    train = pystage.data.synthetic(n=args.n, seed=0)
    torch.manual_seed(0)
    net = pystage.StagedNet.from_sequential(pystage.models.get("cnn8"), input_shape=(3, 32, 32), num_classes=10)
    with tempfile.TemporaryDirectory(prefix="pystage-crc-") as root:
        store = pystage.FeatureStore(root)
        k1 = store.key(pystage.dataset_fingerprint(train), net.bodies[0], torch.float16)
        e1 = store.build(k1, net.bodies[0], train, progress=False)
        k2 = store.key(e1.content_digest, net.bodies[1], torch.float16)
        e2 = store.build(k2, net.bodies[1], e1, progress=False)
        epoch = {}
        sources = [DatasetSource(train, 50), StoreSource(e1, 50), StoreSource(e2, 50)]
        for i, (stage, src) in enumerate(zip(net.stages, sources)):  # partial's epoch: every stage once
            engine = Engine(nn.Sequential(stage.body, stage.head), pystage.TrainConfig(), torch.device("cpu"))
            engine.run(src, 5, Cursor())  # warm-up
            t = time.perf_counter()
            engine.run(src, None, Cursor(epoch=1))
            epoch[f"stage{i + 1}_s"] = time.perf_counter() - t
        partial = sum(epoch.values())
        out = {"n": args.n, "entry_mib": [e1.nbytes / 2**20, e2.nbytes / 2**20], "partial_epoch_s": partial, **epoch}
        for name, budget in (("resident", "256MiB"), ("windows", args.window_budget)):
            c = stream_costs(root, [k1, k2], budget, args.repeats)
            c["cost_of_partial_epoch"] = (c["checked_s"] - c["unchecked_s"]) / partial
            out[name] = c
    print(f"partial epoch (cnn8, {args.n} rows, 3 stages): {partial:.2f} s "
          f"({', '.join(f'{k} {v:.2f}' for k, v in epoch.items())}); stored features "
          f"{out['entry_mib'][0]:.1f} + {out['entry_mib'][1]:.1f} MiB")
    print("| read | checked s | unchecked s | checksum cost / partial epoch |\n| --- | --- | --- | --- |")
    for name in ("resident", "windows"):
        c = out[name]
        print(f"| {name} | {c['checked_s']:.3f} | {c['unchecked_s']:.3f} | {100 * c['cost_of_partial_epoch']:.2f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
