"""What Proxy.feed_many reads from a frame, where, and its masks.

The table names every field of the Ethernet/IPv4/TCP prefix the inline fast
path needs.  Compiled, feed_many reads each at its OFF_* offset (a byte read
is a load and a shift, where one struct unpack of the whole prefix cost a
tenth of a frame's instructions boxing ints into a tuple and unboxing them
again); interpreted (INTERPRETED), one unpack with _FAST is the cheaper way
(18 subscripts cost the pure core a third more per frame).  Both builds run
every test; `tests/core/test_fast_path.py` pins the offsets and _FAST to the
table.
"""

from __future__ import annotations

import struct
import types
from typing import Final

from colo_proxy.core.packet import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN

FAST_FIELDS: Final = (
    ("12x", ""),  # destination and source MAC
    ("H", "etype"),
    ("B", "vihl"),  # IPv4 version and header length: 0x45 on the fast path
    ("x", ""),  # DSCP/ECN
    ("H", "total"),  # IP total length
    ("xx", ""),  # identification
    ("H", "frag"),  # flags and fragment offset
    ("x", ""),  # TTL
    ("B", "proto"),
    ("xx", ""),  # header checksum
    ("12s", "key"),  # addresses and ports: the fast-path flow key
    ("I", "seq"),  # TCP sequence number; for UDP its high half is the UDP length
    ("I", "ack"),
    ("B", "doff"),  # TCP data offset (high nibble)
    ("B", "flags"),
)
"""What feed_many unpacks from an untagged IPv4 frame in one call, field by field;
the named fields are unpacked in this order."""
_FAST: Final = struct.Struct("!" + "".join(code for code, _ in FAST_FIELDS))
"""The table as one struct (what the offsets below are checked against)."""

OFF_ETYPE: Final = 12
OFF_VIHL: Final = 14
OFF_TOTAL: Final = 16
OFF_FRAG: Final = 20
OFF_PROTO: Final = 23
OFF_KEY: Final = 26
KEY_LEN: Final = 12
OFF_SEQ: Final = 38
OFF_ACK: Final = 42
OFF_DOFF: Final = 46
OFF_FLAGS: Final = 47
"""Offsets of the table's named fields from the frame's start (literals, so compiled
code folds them; the test derives them from FAST_FIELDS)."""


def _u32(data: bytes, at: int) -> int:
    """The big-endian 32-bit number at data[at:at + 4] (compiled: four loads and shifts)."""
    return data[at] << 24 | data[at + 1] << 16 | data[at + 2] << 8 | data[at + 3]


INTERPRETED: Final = isinstance(_u32, types.FunctionType)
"""Whether this module runs as Python bytecode (a compiled function is not a Python
function object): feed_many's choice between the two ways above."""

FAST_TCP_MASK: Final = TCP_ACK | TCP_SYN | TCP_RST
"""Segments whose flags under this mask are just ACK take the fast path (FIN allowed)."""
SYN_MASK: Final = TCP_FIN | TCP_SYN | TCP_RST
"""Under this mask, a plain SYN (or SYN-ACK) skips re-parsing (GeneralPath.tcp4_syn)."""
IP_FRAGMENT_MASK: Final = 0x3FFF
"""The IPv4 more-fragments flag and fragment offset: zero for a whole datagram."""
IPV4_NO_OPTIONS: Final = 0x45
ETH_IPV4: Final = 0x0800
MIN_FAST_FRAME: Final = 54
"""Ethernet, IPv4 and TCP headers without options."""
NEVER_FAST: Final = 1 << 62
"""A frame length no frame reaches: with fast_path off every frame goes general."""
