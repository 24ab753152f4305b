"""What Proxy.feed_many reads from a frame in one struct unpack, and its masks.

The table names every field of the Ethernet/IPv4/TCP prefix the inline fast
path needs; `tests/core/test_fast_path.py` pins it to the offsets it names.
"""

from __future__ import annotations

import struct
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
