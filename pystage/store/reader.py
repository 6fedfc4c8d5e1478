"""Read chunk-aligned row blocks through HDF5 into caller-owned buffers: ``verify()``'s reader (streams use scatter.py)."""
from __future__ import annotations

import hashlib
from typing import Optional

import h5py
import numpy as np

from pystage.store.errors import StoreCorruptError
from pystage.store.format import CHECKSUMS, FEATURES, LABELS, EntryMeta, chunk_checksum


class BlockReader:
    """One open entry file; ``read(start, stop, x, y, at)`` fills ``x[at:at + stop - start]`` and ``y[...]``."""

    def __init__(self, meta: EntryMeta, check: bool = False) -> None:
        self.meta, self.check = meta, check
        try:
            self.f = h5py.File(meta.path, "r", rdcc_nbytes=0)  # whole-chunk reads go straight to our buffers
            self.x, self.y = self.f[FEATURES].id, self.f[LABELS].id
            self.crcs: Optional[np.ndarray] = self.f[CHECKSUMS][()] if check else None  # (num_chunks, 2)
        except (OSError, KeyError) as e:
            raise StoreCorruptError(meta.path, "HDF5 structure", "a readable entry", f"{type(e).__name__}: {e}") from None
        self.xspace, self.yspace = self.x.get_space(), self.y.get_space()
        self._mspaces: dict[tuple[int, ...], h5py.h5s.SpaceID] = {}

    def read(self, start: int, stop: int, xbuf: np.ndarray, ybuf: np.ndarray, at: int = 0) -> None:
        """Rows ``[start, stop)`` into rows ``[at, at + stop - start)`` of ``xbuf`` and ``ybuf``."""
        n = stop - start
        try:
            for dsid, fspace, buf in ((self.x, self.xspace, xbuf), (self.y, self.yspace, ybuf)):
                dest = buf[at:at + n]  # a C-contiguous view: the whole memory space is selected (HDF5's fast path)
                rest = dest.shape[1:]
                fspace.select_hyperslab((start,) + (0,) * len(rest), dest.shape)
                mspace = self._mspaces.get(dest.shape) or self._mspaces.setdefault(dest.shape, h5py.h5s.create_simple(dest.shape))
                dsid.read(mspace, fspace, dest)
        except OSError as e:
            raise StoreCorruptError(self.meta.path, f"rows {start}:{stop}", "readable data", str(e)) from None
        if self.crcs is not None:
            self._verify(start, stop, xbuf[at:at + n], ybuf[at:at + n])

    def _verify(self, start: int, stop: int, x: np.ndarray, y: np.ndarray) -> None:
        """Compare the CRC of every chunk that lies wholly inside ``[start, stop)``."""
        cr, n = self.meta.chunk_rows, self.meta.num_rows
        first = -(-start // cr)
        for c in range(first, len(self.crcs)):  # type: ignore[arg-type]
            a, b = c * cr, min((c + 1) * cr, n)
            if b > stop:
                break
            got = chunk_checksum(x[a - start:b - start], y[a - start:b - start])
            if got != tuple(int(v) for v in self.crcs[c]):  # type: ignore[index]
                raise StoreCorruptError(self.meta.path, f"checksum of chunk {c} (rows {a}:{b})",
                                        tuple(int(v) for v in self.crcs[c]), got)  # type: ignore[index]

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()


def verify_checksums(meta: EntryMeta, block_rows: int) -> list[tuple[int, int, int]]:
    """Every chunk whose CRC does not match, as ``(chunk, first_row, stop_row)``."""
    reader = BlockReader(meta, check=False)
    bad: list[tuple[int, int, int]] = []
    try:
        crcs = reader.f[CHECKSUMS][()]
        cr = meta.chunk_rows
        block_rows = max(cr, block_rows // cr * cr)
        xbuf = np.empty((block_rows, *meta.feature_shape), meta.stored_dtype)
        ybuf = np.empty((block_rows, *meta.label_shape), meta.label_dtype)
        for start in range(0, meta.num_rows, block_rows):
            stop = min(start + block_rows, meta.num_rows)
            reader.read(start, stop, xbuf, ybuf)
            for a in range(start, stop, cr):
                b = min(a + cr, stop)
                if chunk_checksum(xbuf[a - start:b - start], ybuf[a - start:b - start]) != tuple(int(v) for v in crcs[a // cr]):
                    bad.append((a // cr, a, b))
    finally:
        reader.close()
    return bad


def content_digest(meta: EntryMeta) -> str:
    """BLAKE2b of an entry's geometry and its checksum table (32 hex digits); StoreCorruptError if unreadable."""
    try:
        with h5py.File(meta.path, "r") as f:
            crcs = np.ascontiguousarray(f[CHECKSUMS][()], dtype="<u4")
    except (OSError, KeyError) as e:
        raise StoreCorruptError(meta.path, "dataset '/checksums'", "readable", f"{type(e).__name__}: {e}") from None
    return digest_of(meta, crcs)


def digest_of(meta: EntryMeta, crcs: np.ndarray) -> str:
    """BLAKE2b of an entry's geometry and its checksum table ``(chunks, 2)``: the entry's content digest."""
    crcs = np.ascontiguousarray(crcs, dtype="<u4")
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((meta.num_rows, meta.feature_shape, str(meta.dtype), meta.stored_dtype.str, meta.label_shape,
                   meta.label_dtype.str, meta.chunk_rows)).encode())
    h.update(crcs.tobytes())
    return h.hexdigest()
