"""The ``virtio_net_hdr`` a packet socket with ``PACKET_VNET_HDR`` puts before each frame.

Why: with it, a GSO/GRO super-frame (up to 64 KiB, one TCP segment of many
MSS) is received whole with its ``gso_type``/``gso_size``, and a frame whose
checksum the sender left to the hardware with ``csum_start``/``csum_offset``;
sent with the same header, the kernel (or the receiving veth/tap's guest)
segments and checksums it.  The bridge keeps the header in front of the frame
and hands the core ``(header + frame, VNET_LEN)``: the core reads from the
offset, as it does for QEMU's vnet records, and releases the pair unchanged.

Layout (``struct virtio_net_hdr``, native byte order for packet sockets on a
little-endian host, which is all Linux runs this on): flags, gso_type (u8),
hdr_len, gso_size, csum_start, csum_offset (u16).
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from colo_proxy.core.checksum import complete_checksum, ones_sum

VNET_LEN: Final = 10
F_NEEDS_CSUM: Final = 1
F_DATA_VALID: Final = 2
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_UDP: Final = 3
GSO_TCPV6: Final = 4
GSO_UDP_L4: Final = 5
GSO_ECN: Final = 0x80
TCP_GSO: Final = frozenset((GSO_NONE, GSO_TCPV4, GSO_TCPV6))
"""gso_type values (ECN bit cleared) the bridge carries: none, or a TCP super-frame."""
ZERO: Final = bytes(VNET_LEN)
"""The header of a whole, checksummed frame (flags and gso_type 0)."""

_HDR: Final = struct.Struct("=BBHHHH")


class VnetHeader(NamedTuple):
    """One ``virtio_net_hdr``."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        return _HDR.pack(*self)

    @property
    def is_super(self) -> bool:
        """A GSO super-frame (to be segmented by whoever sends it on the wire)."""
        return self.gso_type & ~GSO_ECN != GSO_NONE

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & F_NEEDS_CSUM)


def parse(data: bytes | memoryview, at: int = 0) -> VnetHeader:
    """The header at ``data[at:at + VNET_LEN]``."""
    return VnetHeader(*_HDR.unpack_from(data, at))


def shifted(header: bytes, by: int) -> bytes:
    """``header`` for a frame ``by`` bytes longer before its L3 header (a VLAN tag put back).

    ``csum_start`` and ``hdr_len`` count from the frame's first byte; a tag
    inserted in front moves both.  Zero fields stay zero (not set).
    """
    h = parse(header)
    return h._replace(
        csum_start=h.csum_start + by if h.flags & F_NEEDS_CSUM else h.csum_start,
        hdr_len=h.hdr_len + by if h.hdr_len else 0,
    ).pack()


def plain(data: bytes, offset: int) -> bytes:
    """The bare Ethernet frame of ``(data, offset)``, its checksum completed if it was left open.

    For code that reads and rewrites frames without knowing the header (the
    bridge's sackers): a partial checksum would go wrong under an incremental
    update.  A super-frame's checksum is completed over the whole segment,
    which is what its header would make the segmentation compute anyway.
    """
    frame = data[offset:] if offset else data
    if offset == VNET_LEN and data[0] & F_NEEDS_CSUM:
        fixed = complete_checksum(frame)
        if isinstance(fixed, bytes):
            return fixed
    return frame


def reopened(frame: bytes) -> bytes:
    """An untagged IPv4 TCP ``frame`` whose checksum field holds the pseudo-header sum again.

    What a sender with checksum offload leaves there (and what a GSO super-frame's
    segmentation starts from): for a frame that was made whole by :func:`plain`,
    changed, and goes back out behind its ``NEEDS_CSUM`` header.  Other frames are
    returned as they are.
    """
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return frame
    ihl = (frame[14] & 0x0F) * 4
    length = int.from_bytes(frame[16:18], "big") - ihl
    at = 14 + ihl + 16
    if length < 20 or len(frame) < at + 2:
        return frame
    pseudo = ones_sum(frame[26:34] + struct.pack("!xBH", 6, length))
    return frame[:at] + struct.pack("!H", pseudo) + frame[at + 2 :]
