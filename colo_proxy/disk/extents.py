"""A sorted, non-overlapping map from disk byte ranges to positions in a log.

Every replication buffer is an append-only log plus one of these maps.  A
later write splits or replaces the ranges it covers, which is what makes
overlapping writes resolve last-writer-wins without ever rewriting a log.
Position ``ZERO`` marks a range that reads as zeros (WRITE_ZEROES, TRIM).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

ZERO = -1


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` disk bytes at ``offset`` stored at log position ``pos`` (or ZERO)."""

    offset: int
    length: int
    pos: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def _shift(pos: int, delta: int) -> int:
    return pos if pos == ZERO else pos + delta


class ExtentMap:
    """Parallel sorted lists; list slicing keeps inserts cheap for tens of thousands of ranges."""

    __slots__ = ("_ends", "_mapped", "_pos", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._pos: list[int] = []
        self._mapped = 0

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def mapped_bytes(self) -> int:
        """Disk bytes this map covers (each byte once, however often it was written)."""
        return self._mapped

    def insert(self, offset: int, length: int, pos: int) -> None:
        """Map [offset, offset+length) to ``pos``, replacing whatever covered it before."""
        if length <= 0:
            return
        end = offset + length
        starts, ends, poss = self._starts, self._ends, self._pos
        i = bisect_right(starts, offset) - 1
        if i < 0 or ends[i] <= offset:
            i += 1
        j = bisect_left(starts, end, lo=i)
        new_s: list[int] = []
        new_e: list[int] = []
        new_p: list[int] = []
        removed = 0
        if i < j:
            removed = sum(ends[k] - starts[k] for k in range(i, j))
            if starts[i] < offset:
                new_s.append(starts[i])
                new_e.append(offset)
                new_p.append(poss[i])
        # Merge with a left neighbour that this write continues (sequential writes).
        if not new_s and i > 0 and ends[i - 1] == offset and (
            poss[i - 1] == pos == ZERO
            or (pos != ZERO and poss[i - 1] != ZERO
                and poss[i - 1] + (ends[i - 1] - starts[i - 1]) == pos)
        ):
            i -= 1
            removed += ends[i] - starts[i]
            new_s.append(starts[i])
            new_e.append(end)
            new_p.append(poss[i])
        else:
            new_s.append(offset)
            new_e.append(end)
            new_p.append(pos)
        if i < j and ends[j - 1] > end:
            last = j - 1
            new_s.append(end)
            new_e.append(ends[last])
            new_p.append(_shift(poss[last], end - starts[last]))
        starts[i:j] = new_s
        ends[i:j] = new_e
        poss[i:j] = new_p
        self._mapped += sum(e - s for s, e in zip(new_s, new_e, strict=True)) - removed

    def lookup(self, offset: int, length: int) -> Iterator[tuple[int, int, int | None]]:
        """Yield (offset, length, pos) covering the range in order; pos None means unmapped."""
        end = offset + length
        starts, ends, poss = self._starts, self._ends, self._pos
        i = bisect_right(starts, offset) - 1
        if i < 0 or ends[i] <= offset:
            i += 1
        cur = offset
        n = len(starts)
        while cur < end:
            if i >= n or starts[i] >= end:
                yield cur, end - cur, None
                return
            if starts[i] > cur:
                yield cur, starts[i] - cur, None
                cur = starts[i]
            stop = min(ends[i], end)
            yield cur, stop - cur, _shift(poss[i], cur - starts[i])
            cur = stop
            i += 1

    def extents(self) -> list[Extent]:
        """Every mapped range in disk order."""
        return [Extent(s, e - s, p)
                for s, e, p in zip(self._starts, self._ends, self._pos, strict=True)]


def compact(extents: list[Extent]) -> list[Extent]:
    """Lay extents out back to back (data extents only use log space), merging neighbours.

    This is the journal layout: the data of every non-zero extent, in disk order.
    """
    out: list[Extent] = []
    cursor = 0
    for ext in extents:
        pos = ZERO if ext.pos == ZERO else cursor
        if ext.pos != ZERO:
            cursor += ext.length
        if out and out[-1].end == ext.offset and (
            (out[-1].pos == ZERO and pos == ZERO)
            or (out[-1].pos != ZERO and pos != ZERO and out[-1].pos + out[-1].length == pos)
        ):
            prev = out.pop()
            out.append(Extent(prev.offset, prev.length + ext.length, prev.pos))
        else:
            out.append(Extent(ext.offset, ext.length, pos))
    return out


def data_bytes(extents: list[Extent]) -> int:
    """Log bytes a list of extents needs (zero extents need none)."""
    return sum(e.length for e in extents if e.pos != ZERO)
