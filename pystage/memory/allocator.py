"""A model of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp, native backend, defaults).

It replays allocations and frees and keeps the two numbers a CUDA budget is about:
``allocated`` (what ``torch.cuda.memory_allocated`` reports: the sizes of the blocks handed out, which are
larger than the requests) and ``reserved`` (``memory_reserved``: the segments obtained with cudaMalloc).

The rules it follows, with PyTorch's constants:
* every request is rounded up to a multiple of 512 bytes (``kMinBlockSize``);
* requests of at most 1 MiB (``kSmallSize``) use the small pool, larger ones the large pool;
* a request that no cached free block fits gets a new segment: 2 MiB (``kSmallBuffer``) for the small pool,
  20 MiB (``kLargeBuffer``) for requests under 10 MiB (``kMinLargeAlloc``), else the request rounded up to
  2 MiB (``kRoundLarge``);
* otherwise the smallest free block of the pool that fits is taken (lowest address on ties);
* the block is split when the rest is worth keeping: >= 512 bytes in the small pool, > 1 MiB in the large
  pool; an unsplit block is handed out whole, and ``allocated`` counts all of it;
* a freed block merges with free neighbours of its segment; segments are never returned (no
  ``empty_cache``), so ``reserved`` only grows.
Left out: ``max_split_size_mb``, ``roundup_power2_divisions``, expandable segments, streams (one stream),
garbage collection thresholds, and what happens when cudaMalloc fails.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Optional

MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 << 20  # kSmallSize: the largest small-pool request
SMALL_BUFFER = 2 << 20  # kSmallBuffer: small-pool segment
LARGE_BUFFER = 20 << 20  # kLargeBuffer: segment for 1-10 MiB requests
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge


def round_size(nbytes: int) -> int:
    """The block size a request of ``nbytes`` asks for (a multiple of 512, at least 512)."""
    return MIN_BLOCK * max(1, -(-nbytes // MIN_BLOCK))


def segment_size(size: int) -> int:
    """The cudaMalloc size of a new segment for a rounded request of ``size`` bytes."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * -(-size // ROUND_LARGE)


@dataclass(eq=False)
class Block:
    """A piece of a segment: [addr, addr + size), handed out or free."""

    addr: int
    size: int
    small: bool
    free: bool = True
    prev: Optional["Block"] = field(default=None, repr=False)
    next: Optional["Block"] = field(default=None, repr=False)


class CachingAllocator:
    """Replays ``malloc``/``free`` like the CUDA caching allocator; tracks allocated and reserved bytes."""

    def __init__(self) -> None:
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0
        self._free: dict[bool, list[tuple[int, int, Block]]] = {True: [], False: []}  # pool -> sorted (size, addr)
        self._next_addr = 0

    def malloc(self, nbytes: int) -> Block:
        """Hand out a block for a request of ``nbytes``; returns it (pass it to :meth:`free`)."""
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            block = pool.pop(i)[2]
        else:
            block = self._new_segment(segment_size(size), small)
        rest = block.size - size
        if rest >= MIN_BLOCK if small else rest > SMALL_SIZE:
            tail = Block(block.addr + size, rest, small, True, block, block.next)
            if block.next is not None:
                block.next.prev = tail
            block.next, block.size = tail, size
            self._insert(tail)
        block.free = False
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: Block) -> None:
        """Return ``block`` to its pool, merged with its free neighbours."""
        if block.free:
            raise ValueError(f"block at {block.addr} of {block.size} bytes is already free")
        self.allocated -= block.size
        block.free = True
        for other in (block.prev, block.next):
            if other is not None and other.free:
                self._remove(other)
                if other is block.prev:
                    block.addr, block.prev = other.addr, other.prev
                    if other.prev is not None:
                        other.prev.next = block
                else:
                    block.next = other.next
                    if other.next is not None:
                        other.next.prev = block
                block.size += other.size
        self._insert(block)

    def reset_peak(self) -> None:
        """Like ``torch.cuda.reset_peak_memory_stats``: peaks start again from the current values."""
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def _new_segment(self, size: int, small: bool) -> Block:
        block = Block(self._next_addr, size, small)
        self._next_addr += size
        self.reserved += size
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block

    def _insert(self, block: Block) -> None:
        bisect.insort(self._free[block.small], (block.size, block.addr, block))

    def _remove(self, block: Block) -> None:
        pool = self._free[block.small]
        i = bisect.bisect_left(pool, (block.size, block.addr))
        assert pool[i][2] is block
        pool.pop(i)
