"""``pystage-bench store``: feature-store write speed, shuffled streaming read vs raw np.memmap read, extra RAM.

Both reads are measured warm (both files in the page cache: one untimed pass of each first) and, with
``--cache both`` (the default) or ``cold``, also cold (posix_fadvise DONTNEED on both files, after fsync,
before every timed pass: both read from the disk). The store read is one shuffled epoch of entry.stream()
batches. The raw read ("raw -> new batch arrays") reads the same bytes sequentially from a plain file
(features, then labels) through np.memmap and copies them batch by batch (same batch size) into new arrays
handed over as tensors, as a consumer gets batches it may keep; ``read_ratio`` = store MB/s / that, warm when
warm reads ran (``read_ratio_cold``: cold). ``read_ratio_vs_reused`` compares with a memcpy ceiling instead:
the same bytes copied into one reused, cache-resident buffer (no batch could be kept). Passes are
interleaved (store, raw, reused, ...) and each figure is the median. Peak extra RSS (psutil, sampled every
2 ms in a thread, minus the RSS before streaming, after freeing the entry's kept windows so they count) is
taken in a separate untimed epoch, because the sampling thread competes for the GIL.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from pystage.bench.report import environment, format_table, print_environment, write_json
from pystage.memory.measure import PeakRSS
from pystage.store import FeatureStore, StoreEntry, parse_size
from pystage.store.format import FEATURES, LABELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="2GiB", help="store size (features + labels), e.g. 512MiB, 2GiB")
    parser.add_argument("--ram-budget", default="256MiB", help="FeatureStore ram_budget while streaming")
    parser.add_argument("--root", default=None, help="store root (default: a temporary directory, removed afterwards)")
    parser.add_argument("--feature-shape", default="32,16,16", help="shape of one row (CIFAR stage-like)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each read; the median is reported")
    parser.add_argument("--cache", default="both", choices=["warm", "cold", "both"],
                        help="page cache state of both reads (default: both, reported separately)")
    parser.add_argument("--json", default=None, help="write the results here")


class _Batches(IterableDataset):
    """``rows`` synthetic rows in ready batches (random features cycled from a 64 MiB pool, labels 0..rows-1)."""

    def __init__(self, rows: int, shape: tuple[int, ...], dtype: torch.dtype, batch_size: int) -> None:
        super().__init__()
        self.rows, self.batch_size = rows, batch_size
        pool_rows = max(batch_size, (64 << 20) // (int(np.prod(shape)) * torch.finfo(dtype).bits // 8))
        self.pool = torch.randn((pool_rows, *shape), generator=torch.Generator().manual_seed(0)).to(dtype)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for a in range(0, self.rows, self.batch_size):
            n = min(self.batch_size, self.rows - a)
            p = a % (len(self.pool) - n + 1)
            yield self.pool[p:p + n], torch.arange(a, a + n)  # (B, *shape), (B,)


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _write_raw(entry: StoreEntry, path: str) -> None:
    """The entry's feature bytes then its label bytes, in row order, as a plain file."""
    import h5py

    with h5py.File(entry.path, "r") as f, open(path, "wb") as out:
        for name in (FEATURES, LABELS):
            d = f[name]
            step = max(1, (64 << 20) // max(1, d.dtype.itemsize * int(np.prod(d.shape[1:]))))
            for a in range(0, d.shape[0], step):
                out.write(np.ascontiguousarray(d[a:a + step]).data)
        out.flush()
        os.fsync(out.fileno())


def _read_raw(path: str, rows: int, row_bytes: int, label_bytes: int, batch_size: int) -> float:
    """Seconds for a consumer-style raw epoch: sequential batches of ``batch_size`` rows, each copied from the
    np.memmap (features region, then the matching labels) into its own new arrays, handed over as tensors,
    as a loader that gives the consumer batches to keep must do. Same bytes as the store read."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    xs = mm[:rows * row_bytes].reshape(rows, row_bytes)
    ys = mm[rows * row_bytes:rows * (row_bytes + label_bytes)].reshape(rows, label_bytes)
    t0 = time.perf_counter()
    for a in range(0, rows, batch_size):
        n = min(batch_size, rows - a)
        bx, by = np.empty((n, row_bytes), np.uint8), np.empty((n, label_bytes), np.uint8)
        np.copyto(bx, xs[a:a + n])
        np.copyto(by, ys[a:a + n])
        xb, yb = torch.from_numpy(bx), torch.from_numpy(by)
        del xb, yb
    seconds = time.perf_counter() - t0
    del xs, ys, mm
    return seconds


def _read_raw_reused(path: str, chunk: int) -> float:
    """Seconds to copy the whole file through np.memmap into ONE reused ``chunk``-byte buffer: a memcpy
    ceiling (the buffer stays in the CPU cache and nothing could be kept), not a loader a consumer can use."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    buf = np.empty(chunk, np.uint8)
    t0 = time.perf_counter()
    for a in range(0, len(mm), chunk):
        n = min(chunk, len(mm) - a)
        np.copyto(buf[:n], mm[a:a + n])
    seconds = time.perf_counter() - t0
    del mm
    return seconds


def _read_store(entry: StoreEntry, batch_size: int, epoch: int) -> tuple[float, int]:
    """(seconds, rows) of one shuffled epoch."""
    rows = 0
    t0 = time.perf_counter()
    for xb, _ in entry.stream(batch_size=batch_size, shuffle=True, seed=0, epoch=epoch):
        rows += len(xb)
    return time.perf_counter() - t0, rows


def _store_extra_rss(entry: StoreEntry, batch_size: int) -> float:
    """Peak extra RSS (MiB) of one shuffled epoch, in its own untimed pass: the sampling thread slows reads.
    The entry's kept window buffers are freed first, so they are counted."""
    entry.release_buffers()
    with PeakRSS(every=0.002) as rss:
        for xb, _ in entry.stream(batch_size=batch_size, shuffle=True, seed=0, epoch=2000):
            del xb
    return rss.growth / 2**20


def _measure(entry: StoreEntry, raw: str, args: argparse.Namespace, mode: str) -> dict[str, float]:
    """Median store and raw read speeds (MB/s) over ``args.repeats`` passes with the page cache ``mode``."""
    row_bytes, label_bytes = entry.nbytes // entry.num_rows - 8, 8
    chunk = args.batch_size * (row_bytes + label_bytes)
    readers = {"raw": lambda: _read_raw(raw, entry.num_rows, row_bytes, label_bytes, args.batch_size),
               "reused": lambda: _read_raw_reused(raw, chunk)}
    if mode == "warm":  # one untimed pass of each, so that both are read from the page cache
        for read in readers.values():
            read()
        _read_store(entry, args.batch_size, epoch=1000)  # also allocates the windows the entry reuses
    runs: dict[str, list[float]] = {"store": [], "raw": [], "reused": []}
    for rep in range(args.repeats):  # interleaved, so that load from other processes hits all alike
        if mode == "cold":
            _drop_cache(entry.path)
        seconds, rows = _read_store(entry, args.batch_size, epoch=rep)
        if rows != entry.num_rows:
            raise RuntimeError(f"the stream yielded {rows} rows, expected {entry.num_rows}")
        runs["store"].append(seconds)
        for name, read in readers.items():
            if mode == "cold":
                _drop_cache(raw)
            runs[name].append(read())
    s = {k: statistics.median(v) for k, v in runs.items()}
    mb = entry.nbytes / 1e6
    return {f"{mode}_store_read_mb_s": mb / s["store"], f"{mode}_raw_read_mb_s": mb / s["raw"],
            f"{mode}_read_ratio": s["raw"] / s["store"], f"{mode}_raw_reused_mb_s": mb / s["reused"],
            f"{mode}_read_ratio_vs_reused": s["reused"] / s["store"],
            f"{mode}_extra_rss_mib": _store_extra_rss(entry, args.batch_size)}


def run(args: argparse.Namespace) -> int:
    env = environment("cpu")
    print_environment(env)
    size, budget = parse_size(args.size, "--size"), parse_size(args.ram_budget, "--ram-budget")
    shape = tuple(int(s) for s in args.feature_shape.split(","))
    dtype = getattr(torch, args.dtype)
    row_bytes = int(np.prod(shape)) * torch.finfo(dtype).bits // 8 + 8  # features + int64 label
    rows = size // row_bytes
    root = args.root or tempfile.mkdtemp(prefix="pystage-bench-store-")
    try:
        store = FeatureStore(root, ram_budget=budget)
        data = DataLoader(_Batches(rows, shape, dtype, args.batch_size), batch_size=None)
        key = store.key(upstream=f"bench-{rows}-{shape}", module=nn.Identity(), dtype=dtype)
        store.remove(key)
        t0 = time.perf_counter()
        entry = store.build(key, nn.Identity(), data, batch_size=args.batch_size, progress=False)
        write_s = time.perf_counter() - t0
        raw = os.path.join(root, "raw.bin")
        _write_raw(entry, raw)
        nbytes = entry.nbytes
        result: dict[str, Any] = {}
        for mode in (["warm", "cold"] if args.cache == "both" else [args.cache]):
            result.update(_measure(entry, raw, args, mode))
        first = "warm" if "warm_store_read_mb_s" in result else "cold"
        mb = nbytes / 1e6
        result = {
            "store_read_mb_s": result[f"{first}_store_read_mb_s"], "raw_read_mb_s": result[f"{first}_raw_read_mb_s"],
            "read_ratio": result[f"{first}_read_ratio"], "read_cache": first,
            "read_ratio_vs_reused": result[f"{first}_read_ratio_vs_reused"],
            "write_mb_s": mb / write_s, "extra_rss_mib": max(v for k, v in result.items() if k.endswith("extra_rss_mib")),
            "store_bytes": nbytes, "file_bytes": os.path.getsize(entry.path), "rows": entry.num_rows,
            "feature_shape": list(shape), "dtype": args.dtype, "ram_budget_bytes": budget,
            "batch_size": args.batch_size, "repeats": args.repeats, "shuffle": True, "chunk_rows": entry.chunk_rows,
            **({"read_ratio_cold": result["cold_read_ratio"]} if "cold_read_ratio" in result else {}), **result,
        }
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    table = [{"what": "store write (build, fsync)", "cache": "-", "MB/s": result["write_mb_s"]}]
    for mode in ("warm", "cold"):
        if f"{mode}_read_ratio" in result:
            table += [{"what": "store: shuffled stream, batches", "cache": mode, "MB/s": result[f"{mode}_store_read_mb_s"],
                       "extra_rss_mib": result[f"{mode}_extra_rss_mib"]},
                      {"what": "raw: memmap -> new batch arrays", "cache": mode, "MB/s": result[f"{mode}_raw_read_mb_s"],
                       "store/this": result[f"{mode}_read_ratio"]},
                      {"what": "raw: memmap -> one reused buffer", "cache": mode, "MB/s": result[f"{mode}_raw_reused_mb_s"],
                       "store/this": result[f"{mode}_read_ratio_vs_reused"]}]
    print(f"store: {nbytes / 2**30:.2f} GiB, {result['rows']} rows of {shape} {args.dtype}, "
          f"ram_budget {budget / 2**20:.0f} MiB, batch {args.batch_size}, median of {args.repeats} interleaved passes")
    print("  store: one shuffled epoch of (x, y) batches from entry.stream() (windows reused from the untimed pass)")
    print("  raw -> new batch arrays: the same bytes read sequentially from a plain file via np.memmap, copied")
    print("    batch by batch into new arrays (tensors), as a consumer gets them; read_ratio = store / this")
    print("  raw -> one reused buffer: memcpy ceiling (cache-resident buffer, batches cannot be kept)")
    print("  extra_rss_mib: the process's peak RSS growth over one shuffled epoch (ram_budget bounds the stream's")
    print("    two windows, ram_budget / 2; batches in flight and thread stacks come on top)")
    print(format_table(table, ["what", "cache", "MB/s", "store/this", "extra_rss_mib"]))
    write_json(args.json, {"environment": env, **result})
    return 0
