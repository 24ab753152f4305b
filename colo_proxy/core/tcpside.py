"""What one guest sent on one TCP flow: ISNs, positions, its stream, its close.

Shared by the comparison (tcp.py), the checkpoint handling (tcp_resync.py)
and the uncompared modes (tcp_uncompared.py).
"""

from __future__ import annotations

from typing import Final

from colo_proxy.core.packet import TcpHeader
from colo_proxy.core.reassembly import StreamBuffer

MIDSTREAM_FIT: Final = 1 << 20
"""A mid-stream side within this many bytes of the other's position shares its space."""

SynOptions = tuple[int, int, bool, bool]

Stash = list[tuple[TcpHeader, bytes, int, float]]
"""Secondary segments kept until the primary's ISN settles the sequence space."""

NO_TIMES: Final[list[tuple[int, float]]] = []
NO_STASH: Final[Stash] = []
"""A TcpFlow's sec_times and stash while empty (nearly always: see reassembly._NO_PIECES).
Never mutated: the two places that append give the flow a list of its own first."""

class TcpSide:
    """What one guest sent on this flow."""

    __slots__ = (
        "ack_max", "conflicts", "fin", "high", "isn", "peer_isn", "rst",
        "stream", "syn_opts",
    )

    def __init__(self) -> None:
        self.isn = -1
        """ISN (32-bit); byte at offset 0 has sequence number isn + 1.  -1: unknown."""
        self.peer_isn = -1
        """The client's ISN as this guest acknowledged it.  -1: unknown."""
        self.ack_max = -1
        self.high = 0
        """Highest stream offset this side sent data up to."""
        self.stream = StreamBuffer(0)
        self.fin: int | None = None
        self.rst: int | None = None
        self.syn_opts: SynOptions | None = None
        self.conflicts = 0
        """Conflicting overlaps already reported."""
