"""Held output records: one slotted object per primary frame or datagram waiting.

Typed records instead of lists read by numeric index, so mypy checks every
field and mypyc compiles field access to a struct load.
"""

from __future__ import annotations

from typing import Final, final

from colo_proxy.core.flows import Rel

NEED_NONE: Final = 0
NEED_HANDSHAKE: Final = 1
NEED_FIN: Final = 2
NEED_RST: Final = 3


@final
class HeldFrame:
    """A primary TCP segment in a flow's queue until it is safe to release."""

    __slots__ = ("ack", "end", "flen", "need", "plen", "rel", "start", "time")

    def __init__(
        self, end: int, ack: int, need: int, rel: Rel, time: float, start: int, plen: int,
        flen: int,
    ) -> None:
        self.end = end
        """Stream offset just past its payload."""
        self.ack = ack
        """Its ACK as an offset from the client's ISN (-1 without ACK)."""
        self.need = need
        """NEED_*: the close or handshake the secondary must match first."""
        self.rel = rel
        self.time = time
        """Arrival time (timeouts)."""
        self.start = start
        """Stream offset of its first payload byte."""
        self.plen = plen
        """Payload bytes (released payload counter)."""
        self.flen = flen
        """Frame bytes (hold limits)."""


@final
class HeldDatagram:
    """One side's datagram waiting for its partner (rel is None for the secondary's)."""

    __slots__ = ("content", "flen", "index", "matched", "rel", "time")

    def __init__(
        self, index: int, rel: Rel | None, time: float, content: bytes, flen: int
    ) -> None:
        self.index = index
        """Its number among the side's datagrams since the last checkpoint."""
        self.rel = rel
        self.time = time
        self.matched = False
        self.content = content
        self.flen = flen
