"""IP fragment reassembly, one table per side.

Two guests may fragment the same datagram differently (different MTU paths,
offload settings), so comparison happens on whole datagrams.  Every limit
is explicit: fragments per datagram, bytes held, and age.  A datagram that
is given up returns its frames to the caller, which decides their fate
(the primary's are passed through uncompared, so nothing is lost).
"""

from __future__ import annotations

from typing import Generic, TypeVar

R = TypeVar("R")

MAX_GIVEN_UP = 4096
"""Datagrams remembered as given up, so their later fragments pass at once."""

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
        self.overlaps = 0
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
        dgram.bytes += len(piece)
        self.held_bytes += len(piece)
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
        if len(self._given_up) >= MAX_GIVEN_UP:
            del self._given_up[next(iter(self._given_up))]
        self._given_up[key] = dgram.first_seen
        return reason, dgram.rels

    def oldest(self) -> float | None:
        """When the oldest incomplete datagram arrived, if any."""
        return min((d.first_seen for d in self._table.values()), default=None)

    def expire(self, now: float) -> list[R]:
        """Give up datagrams older than the timeout; returns their frames."""
        out: list[R] = []
        for key in [k for k, d in self._table.items() if now - d.first_seen > self.timeout]:
            out.extend(self._give_up(key, "")[1])
        for key in [k for k, t in self._given_up.items() if now - t > 2 * self.timeout]:
            del self._given_up[key]
        return out

    def clear(self) -> list[R]:
        """Forget every incomplete datagram; returns their frames."""
        out = [rel for dgram in self._table.values() for rel in dgram.rels]
        self._table.clear()
        self.held_bytes = 0
        return out
