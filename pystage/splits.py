"""Split search over a chain of boundaries: exact, and lazy about the stage costs it asks for.

A cost ``cost(a, b)`` (the step peak of the stage [a, b)) is expensive: a training step on meta tensors.
Both searches take an optional ``lower(a, b) <= cost(a, b)`` (cheap, e.g. the stage's parameters, optimizer
state, input batch and the tensors its layers save for backward) and only ask ``cost`` for the pairs whose
lower bound could still beat the best answer: a stage whose lower bound is over the budget is never run,
and the search stops as soon as the best complete plan is known. With ``lower`` missing (0) they still
return the exact answer, running more stages.
"""
from __future__ import annotations

import heapq
from typing import Callable, Optional, Sequence

Cost = Callable[[int, int], int]


def _zero(a: int, b: int) -> int:
    return 0


def _memo(cost: Cost) -> Cost:
    """``cost`` asked at most once per stage."""
    seen: dict[tuple[int, int], int] = {}

    def once(a: int, b: int) -> int:
        if (a, b) not in seen:
            seen[a, b] = cost(a, b)
        return seen[a, b]
    return once


def choose_splits(nodes: Sequence[int], cost: Cost, budget: int, disk: Optional[Callable[[int], int]] = None,
                  disk_budget: Optional[int] = None,
                  lower: Optional[Cost] = None) -> Optional[tuple[tuple[int, ...], int, int]]:
    """The best split set over boundaries ``nodes`` (sorted, first = 0, last = len): (split points, peak, disk).

    Minimises, lexicographically, (number of stages, largest ``cost(a, b)``, sum of ``disk(split)``, split
    points) subject to every ``cost(a, b) <= budget`` and total disk <= ``disk_budget``; None when nothing
    is feasible. Label setting (A* on that key, a label per path): a stage [a, b) enters the queue with
    an optimistic key - stages so far plus the fewest stages left if every stage whose lower bound fits
    did, and ``max(peak so far, lower(a, b))`` - and is run (``cost``) only when it reaches the front; a
    label popped at a boundary that an earlier popped label beats on (stages, peak, disk) is dropped. The
    first complete label popped is optimal.
    """
    disk, lower, cost = disk or (lambda b: 0), lower or _zero, _memo(cost)
    first, end = nodes[0], nodes[-1]
    fits = {a: [b for b in nodes if b > a and lower(a, b) <= budget] for a in nodes}  # may fit
    togo = _stages_to_end(nodes, fits)  # at least this many more stages from each boundary
    # entries: (stages so far + at least to go, peak key, disk, path, exact, stages, peak before the last stage)
    heap: list[tuple[int, int, int, tuple[int, ...], bool, int, int]] = [(togo[first], 0, 0, (first,), True, 0, 0)]
    popped: dict[int, list[tuple[int, int, int]]] = {}
    while heap:
        bound, peak, used, path, exact, stages, before = heapq.heappop(heap)
        a = path[-1]
        if not exact:  # the stage [path[-2], a) reaches the front: run it
            c = cost(path[-2], a)
            if c <= budget:
                heapq.heappush(heap, (bound, max(before, c), used, path, True, stages, before))
            continue
        if a == end:
            return path[1:-1], peak, used
        seen = popped.setdefault(a, [])
        if any(s <= stages and p <= peak and d <= used for s, p, d in seen):
            continue
        seen.append((stages, peak, used))
        extra = disk(a) if a != first else 0
        if disk_budget is not None and used + extra > disk_budget:
            continue
        for b in fits[a]:
            if togo[b] < len(nodes):
                heapq.heappush(heap, (stages + 1 + togo[b], max(peak, lower(a, b)), used + extra, path + (b,), False,
                                      stages + 1, peak))
    return None


def _stages_to_end(nodes: Sequence[int], fits: dict[int, list[int]]) -> dict[int, int]:
    """Fewest stages from each boundary to the end if every stage that may fit did (``len(nodes)``: none)."""
    togo = {nodes[-1]: 0}
    for a in reversed(nodes[:-1]):
        togo[a] = min((1 + togo[b] for b in fits[a]), default=len(nodes))
    return togo


def min_feasible_budget(nodes: Sequence[int], cost: Cost, lower: Optional[Cost] = None) -> tuple[int, tuple[int, int]]:
    """The smallest budget any split set fits (min over paths of the max stage cost), and its largest stage.

    Bottleneck shortest path, lazy the same way as :func:`choose_splits`: a stage is run only when its
    optimistic key reaches the front of the queue.
    """
    lower, cost = lower or _zero, _memo(cost)
    first, end = nodes[0], nodes[-1]
    # entries: (bottleneck key, lazy, boundary, stage that sets the bottleneck, stage start, bottleneck before)
    heap: list[tuple[int, bool, int, tuple[int, int], int, int]] = [(0, False, first, (0, 0), first, 0)]
    done: set[int] = set()
    while heap:
        key, lazy, b, worst, a, before = heapq.heappop(heap)
        if lazy:
            c = cost(a, b)
            heapq.heappush(heap, (max(before, c), False, b, worst if before >= c else (a, b), a, before))
            continue
        if b in done:
            continue
        done.add(b)
        if b == end:
            return key, worst
        for n in nodes:
            if n > b and n not in done:
                heapq.heappush(heap, (max(key, lower(b, n)), True, n, worst, b, key))
    raise ValueError(f"nodes must run from {first} to {end} with at least two boundaries, got {list(nodes)}")
