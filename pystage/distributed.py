"""Stage training on torch.distributed: world info, process-group init, barriers, DDP, rank-0 writes, sharded stores.

``fit`` calls ``init`` first: inside an initialised process group (or a torchrun environment: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) every stage trains under DistributedDataParallel, each rank builds its
own shard of every feature-store split, and only rank 0 writes stage checkpoints and shard manifests. The data
order is the single-process order (see docs/distributed.md): ``size`` ranks with per-rank batch ``B/size`` see
exactly the global batches one process sees with batch ``B``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pystage.errors import PystageError

log = logging.getLogger(__name__)
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedStateError(PystageError, RuntimeError):
    """Ranks that disagree about something they must agree on (a cached stage, a shard), or a bad environment."""

    def __init__(self, what: str, values: Any, rank: int, size: int) -> None:
        self.what, self.values, self.rank, self.size = what, values, rank, size
        super().__init__(f"rank {rank} of {size}: {what}: {values!r}")


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Rank 0: the one process that writes checkpoints and manifests."""
        return self.rank == 0


def world() -> World:
    """The initialised process group's world, else a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)), str(dist.get_backend()))


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join (or start, from torchrun's environment) the process group: NCCL on GPUs, gloo on CPU.

    Returns the world and this rank's device (``cuda:<local_rank>`` for a plain ``cuda`` device).
    """
    if not (dist.is_available() and dist.is_initialized()):
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size > 1:
            missing = [k for k in ENV if k not in os.environ]
            if missing:
                raise DistributedStateError("WORLD_SIZE is set but these variables are not", missing, -1, size)
            local = int(os.environ["LOCAL_RANK"])
            if device.type == "cuda":
                torch.cuda.set_device(local)
            backend, store = "nccl" if device.type == "cuda" else "gloo", _restart_store(size)
            if store is None:
                dist.init_process_group(backend)
            else:
                dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=size)
            log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), size, dist.get_backend())
    w = world()
    if w.active and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", w.local_rank)
    return w, device


def _restart_store(size: int) -> Optional[dist.Store]:
    """torchrun's shared store with this restart's keys kept apart from the killed group's; None: torch's default.

    torchrun (the c10d rendezvous) hands every worker group the same agent-hosted TCPStore, restart after
    restart. The killed group's keys (each rank's gloo/NCCL address) are still in it, and a restarted rank can
    read its peer's old address before the peer replaces it: it connects to a dead port (refused, or a hang).
    On one node every worker of a group has the same TORCHELASTIC_RESTART_COUNT: its prefix isolates each
    restart. Across nodes the counts can differ (a node restarted for a peer's failure does not count it),
    so there torch's default stays; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun instead.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_PORT" not in os.environ:
        return None
    if os.environ.get("LOCAL_WORLD_SIZE", str(size)) != str(size):
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0:
            log.warning("torchrun restarts across nodes with a shared rendezvous store can reconnect to the "
                        "killed group's ports; run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False,
                          timeout=dist.default_pg_timeout)
    return dist.PrefixStore(f"pystage/restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op in a world of one)."""
    if world().active:
        dist.barrier()


def all_sum(*values: float) -> list[float]:
    """Each value summed over the ranks (unchanged in a world of one)."""
    if not world().active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` reduced (sum, min or max) over the ranks, in place; ``t`` must be on this rank's device."""
    if world().active:
        dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t


def requested_size() -> int:
    """Processes in the group this process is in or is about to join (torchrun's WORLD_SIZE); 1 without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def all_gather(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order."""
    if not world().active:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def agree(value: Any, what: str) -> Any:
    """``value`` after checking every rank has the same one; DistributedStateError (with every rank's) if not."""
    values = all_gather(value)
    if any(v != values[0] for v in values):
        w = world()
        raise DistributedStateError(f"ranks disagree on {what}", values, w.rank, w.size)
    return value


def is_ddp(net: nn.Module) -> bool:
    return isinstance(net, DistributedDataParallel)


def wrap(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` under DistributedDataParallel (gradients averaged over ranks); ``net`` itself in a world of one."""
    if not world().active or not any(p.requires_grad for p in net.parameters()):
        return net
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, DistributedDataParallel) else net


class RankZeroCache:
    """A StageCache whose writes happen on rank 0 only, each followed by a barrier; every rank reads."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.root = inner, inner.root

    def load(self, key: str, kind: str = "") -> Optional[dict]:
        payload = self.inner.load(key, kind)
        agree(payload is not None, f"whether stage file {key}{'.' + kind if kind else ''} exists")
        return payload

    def save(self, key: str, payload: dict, kind: str = "") -> None:
        if world().writer:
            self.inner.save(key, payload, kind)
        barrier()

    def discard(self, key: str, kind: str) -> None:
        if world().writer:
            self.inner.discard(key, kind)
        barrier()


def build_shards(store: Any, upstream: str, body: nn.Module, data: Any, split: str, dtype: torch.dtype,
                 batch_size: int, device: torch.device, progress: bool) -> Any:
    """Build this rank's shard of ``body``'s features over ``data``; rank 0 writes the manifest; all ranks get the
    ShardSet of every rank's shard. A manifest or shard of another world size is logged and rebuilt, never used;
    so is a shard whose checksums do not match (every rank verifies its own shard once per run)."""
    from pystage.store.shards import ShardSet, StoreShardError, check_shard_entry, read_manifest, write_manifest

    w = world()
    manifest_id = store.key(upstream=upstream, module=body, dtype=dtype, split=split, extra={"sharded": True})
    try:
        read_manifest(store.directory, manifest_id, w.size)
    except StoreShardError as e:
        log.warning("%s: building shards for world size %d", e, w.size)
    key = store.key(upstream=upstream, module=body, dtype=dtype, split=split, shard=(w.rank, w.size))
    entry = store.build(key, body, data, batch_size=batch_size, device=device, progress=progress, verify=True)
    try:
        check_shard_entry(entry, w.rank, w.size, len(data))
    except StoreShardError as e:
        log.warning("%s: removing it and building again", e)
        store.remove(key)
        entry = store.build(key, body, data, batch_size=batch_size, device=device, progress=progress)
        check_shard_entry(entry, w.rank, w.size, len(data))
    keys, rows = zip(*all_gather((str(key), entry.num_rows)))
    if w.writer:
        write_manifest(store.directory, manifest_id, keys, rows)
    barrier()
    shards = ShardSet([store.open(k) for k in keys], store.config.ram_budget)
    shards.key = manifest_id  # the upstream of the next stage's shards: the same in every world size
    return shards


def broadcast_(net: nn.Module) -> nn.Module:
    """Copy rank 0's parameters and buffers into every rank's ``net`` (so stage keys agree across ranks)."""
    if world().active:
        with torch.no_grad():
            for t in [*net.parameters(), *net.buffers()]:
                dist.broadcast(t.data, 0)
    return net


