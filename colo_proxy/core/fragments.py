"""IP fragment reassembly, one table per side.

Two guests may fragment the same datagram differently (different MTU paths,
offload settings), so comparison happens on whole datagrams.  Every limit
is explicit: fragments per datagram, bytes held, and age.  A datagram that
is given up returns its frames to the caller, which decides their fate
(the primary's are passed through uncompared, so nothing is lost).

Bytes held count a fixed overhead per fragment on top of its payload (the
frame kept for release and the bookkeeping), so a flood of empty fragments
is bounded like any other.  The table is kept in arrival order, so expiry
and the oldest datagram look at the front only, never walk the whole table.
"""

from __future__ import annotations

from typing import Final, Generic, TypeVar

R = TypeVar("R")

MAX_GIVEN_UP = 4096
"""Datagrams remembered as given up, so their later fragments pass at once."""

FRAGMENT_OVERHEAD: Final = 256
"""Bytes counted per fragment besides its payload: headers of the frame kept for
release, the piece and the table's own records (measured: about 250 bytes)."""

FragKey = tuple[tuple[int, ...], int, bytes, bytes, int, int]


class _Datagram(Generic[R]):
    __slots__ = ("bytes", "first_seen", "pieces", "rels", "total")

    def __init__(self, now: float) -> None:
        self.pieces: list[tuple[int, bytes]] = []
        self.rels: list[R] = []
        self.total = -1
        self.bytes = 0
        self.first_seen = now


class FragmentTable(Generic[R]):
    """Collects fragments until a datagram is whole, within stated limits.

    `R` is whatever the caller wants back with the datagram (its frames).
    """

    def __init__(self, max_fragments: int, max_bytes: int, timeout: float) -> None:
        self.max_fragments = max_fragments
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.held_bytes = 0
        self.held_rels = 0
        """Fragments (frames) held in incomplete datagrams."""
        self.overlaps = 0
        self.examined = 0
        """Datagrams looked at by expiry (a measure of scan cost, for tests and stats)."""
        self._table: dict[FragKey, _Datagram[R]] = {}
        self._given_up: dict[FragKey, float] = {}

    def __len__(self) -> int:
        return len(self._table)

    def add(
        self, key: FragKey, offset: int, more: bool, piece: bytes, rel: R, now: float
    ) -> tuple[bytes, list[R]] | tuple[str, list[R]] | None:
        """Add one fragment.

        Returns (payload, rels) when the datagram is complete, (reason, rels)
        when it had to be given up, or None while it is still incomplete.
        """
        dgram = self._table.get(key)
        if dgram is None:
            if key in self._given_up:
                return "ip_fragment_of_given_up_datagram", [rel]
            dgram = self._table[key] = _Datagram(now)
        dgram.rels.append(rel)
        self.held_rels += 1
        if not more:
            stop = offset + len(piece)
            if dgram.total not in (-1, stop):
                return self._give_up(key, "ip_fragment_inconsistent_length")
            dgram.total = stop
        if offset + len(piece) > 65535 or (
            dgram.total != -1 and offset + len(piece) > dgram.total
        ):
            return self._give_up(key, "ip_fragment_beyond_end")
        dgram.pieces.append((offset, piece))
        cost = len(piece) + FRAGMENT_OVERHEAD
        dgram.bytes += cost
        self.held_bytes += cost
        if len(dgram.pieces) > self.max_fragments:
            return self._give_up(key, "ip_fragment_limit")
        if self.held_bytes > self.max_bytes:
            return self._give_up(key, "ip_fragment_memory")
        if dgram.total == -1:
            return None
        payload = self._assemble(dgram)
        if payload is None:
            return None
        del self._table[key]
        self.held_bytes -= dgram.bytes
        self.held_rels -= len(dgram.rels)
        return payload, dgram.rels

    def _assemble(self, dgram: _Datagram[R]) -> bytes | None:
        """The whole payload if the pieces cover it, first copy winning."""
        covered = 0
        overlapped = False
        for start, piece in sorted(dgram.pieces, key=lambda p: p[0]):
            if start > covered:
                return None
            if start < covered:
                overlapped = True
            covered = max(covered, start + len(piece))
        if covered < dgram.total:
            return None
        if overlapped:
            self.overlaps += 1
        out = bytearray(dgram.total)
        for start, piece in reversed(dgram.pieces):
            out[start : start + len(piece)] = piece
        return bytes(out)

    def _give_up(self, key: FragKey, reason: str) -> tuple[str, list[R]]:
        """Forget the datagram; its later fragments pass without being held."""
        dgram = self._table.pop(key)
        self.held_bytes -= dgram.bytes
        self.held_rels -= len(dgram.rels)
        if len(self._given_up) >= MAX_GIVEN_UP:
            del self._given_up[next(iter(self._given_up))]
        self._given_up[key] = dgram.first_seen
        return reason, dgram.rels

    def oldest(self) -> float | None:
        """When the oldest incomplete datagram arrived, if any (the first in order)."""
        for dgram in self._table.values():
            return dgram.first_seen
        return None

    def expire(self, now: float) -> list[R]:
        """Give up datagrams older than the timeout; returns their frames.

        Walks from the front (arrival order) and stops at the first young one,
        so a scan costs what expires plus one.
        """
        out: list[R] = []
        expired = []
        for k, d in self._table.items():
            self.examined += 1
            if now - d.first_seen <= self.timeout:
                break
            expired.append(k)
        for key in expired:
            out.extend(self._give_up(key, "")[1])
        stale = []
        for k, t in self._given_up.items():
            if now - t <= 2 * self.timeout:
                break
            stale.append(k)
        for key in stale:
            del self._given_up[key]
        return out

    def clear(self) -> list[R]:
        """Forget every incomplete datagram; returns their frames."""
        out = [rel for dgram in self._table.values() for rel in dgram.rels]
        self._table.clear()
        self.held_bytes = 0
        self.held_rels = 0
        return out
