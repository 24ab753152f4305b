"""One direction of one TCP stream, rebuilt by stream offset.

Theory of operation: `buf` holds the contiguous bytes from `base`; segments
beyond the end wait in `ooo`, a sorted list of non-overlapping pieces.  The
first copy of a byte wins (as in Wireshark's Follow TCP Stream and, for
in-order data, the Linux receiver); a later copy that disagrees is counted
as a conflict.  Bytes below `base` were already consumed (compared or
written out) and are ignored.  Memory is what is buffered, never what was
seen.
"""

from __future__ import annotations

import bisect
from typing import Final

_NO_PIECES: Final[list[tuple[int, bytes]]] = []
_NO_STARTS: Final[list[int]] = []
"""Shared by every buffer with nothing out of order (nearly all of them): two lists fewer
per stream to allocate, to keep in memory and for the collector to walk (four per TCP
flow).  Never mutated: _insert_ooo gives a buffer lists of its own before its first
piece; clearing or popping an empty list changes nothing."""


class StreamBuffer:
    """Contiguous bytes from `base`, plus out-of-order pieces beyond them."""

    __slots__ = (
        "base", "buf", "conflicts", "first_conflict", "last_conflict", "ooo", "ooo_bytes",
        "ooo_starts",
    )

    def __init__(self, base: int = 0) -> None:
        self.base = base
        self.buf = bytearray()
        self.ooo: list[tuple[int, bytes]] = _NO_PIECES
        self.ooo_starts: list[int] = _NO_STARTS
        self.ooo_bytes = 0
        self.conflicts = 0
        self.first_conflict: int | None = None
        self.last_conflict: int | None = None

    @property
    def end(self) -> int:
        """Offset just past the contiguous data."""
        return self.base + len(self.buf)

    @property
    def buffered(self) -> int:
        """Bytes held in memory (contiguous and out of order)."""
        return len(self.buf) + self.ooo_bytes

    def reset(self, base: int) -> None:
        """Forget everything and continue at `base`."""
        self.base = base
        self.buf.clear()
        self.ooo.clear()
        self.ooo_starts.clear()
        self.ooo_bytes = 0

    def skip_to(self, pos: int) -> None:
        """Forget every byte before offset `pos`; keep what lies beyond it."""
        if pos <= self.base:
            return
        drop = min(pos - self.base, len(self.buf))
        del self.buf[:drop]
        self.base += drop
        if self.base < pos:  # past the contiguous bytes: restart at pos with what is beyond
            self.base = pos
            pieces = [(start, data) for start, data in self.ooo if start + len(data) > pos]
            self.ooo.clear()
            self.ooo_starts.clear()
            self.ooo_bytes = 0
            for start, data in pieces:
                self.add(start, data)

    def consume(self, n: int) -> None:
        """Drop the first n contiguous bytes (they were compared or written)."""
        del self.buf[:n]
        self.base += n

    def add(self, start: int, data: bytes | memoryview) -> None:
        """Insert data at stream offset `start`; the first copy of a byte wins."""
        end = self.base + len(self.buf)
        if start != end:
            stop = start + len(data)
            if stop <= self.base:
                return
            if start < self.base:
                data = data[self.base - start :]
                start = self.base
            if start > end:
                self._insert_ooo(start, data)
                return
            if start < end:
                overlap = min(stop, end) - start
                at = start - self.base
                self._check(start, data[:overlap], self.buf[at : at + overlap])
                if stop <= end:
                    return
                data = data[overlap:]
                start = end
        ooo_starts = self.ooo_starts
        if ooo_starts and start + len(data) > ooo_starts[0]:
            cut = ooo_starts[0] - start
            self.buf += data[:cut]
            self._insert_ooo(ooo_starts[0], data[cut:])
        else:
            self.buf += data
        if ooo_starts and ooo_starts[0] <= self.base + len(self.buf):
            self._merge()

    def _check(self, start: int, new: bytes | memoryview, old: bytes | bytearray) -> None:
        if new != old:
            self.conflicts += 1
            at = start + next(i for i in range(len(old)) if new[i] != old[i])
            self.last_conflict = at
            if self.first_conflict is None:
                self.first_conflict = at

    def _insert_ooo(self, start: int, data: bytes | memoryview) -> None:
        """Keep only the parts of data that no earlier piece covers."""
        stop = start + len(data)
        i = bisect.bisect_right(self.ooo_starts, start) - 1
        if i < 0:
            i = 0
        pos = start
        new_pieces: list[tuple[int, bytes]] = []
        while pos < stop:
            if i < len(self.ooo):
                p_start, p_data = self.ooo[i]
                p_stop = p_start + len(p_data)
            else:
                p_start = p_stop = stop
            if p_stop <= pos:
                i += 1
                continue
            if p_start > pos:
                gap_stop = min(p_start, stop)
                new_pieces.append((pos, bytes(data[pos - start : gap_stop - start])))
                pos = gap_stop
                continue
            covered_stop = min(p_stop, stop)
            self._check(
                pos, data[pos - start : covered_stop - start],
                p_data[pos - p_start : covered_stop - p_start],
            )
            pos = covered_stop
            i += 1
        if new_pieces and self.ooo is _NO_PIECES:
            self.ooo, self.ooo_starts = [], []
        for piece in new_pieces:
            j = bisect.bisect_left(self.ooo_starts, piece[0])
            self.ooo.insert(j, piece)
            self.ooo_starts.insert(j, piece[0])
            self.ooo_bytes += len(piece[1])

    def _merge(self) -> None:
        """Move out-of-order pieces that now touch the contiguous end into buf.

        Pieces never overlap each other or the contiguous data (add() keeps
        it so), so the first piece starts exactly at the end when it touches.
        """
        while self.ooo and self.ooo_starts[0] == self.base + len(self.buf):
            p_data = self.ooo.pop(0)[1]
            self.ooo_starts.pop(0)
            self.ooo_bytes -= len(p_data)
            self.buf += p_data
