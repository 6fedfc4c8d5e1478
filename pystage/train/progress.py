"""Progress bars for stage training: tqdm on a terminal, silent otherwise or when asked."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


class Progress:
    """``enabled=None`` shows bars only when stderr is a terminal."""

    def __init__(self, enabled: Optional[bool] = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def wrap(self, items: Iterable[T], desc: str = "", total: Optional[int] = None) -> Iterator[T]:
        if not self.enabled:
            yield from items
            return
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
