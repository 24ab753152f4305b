"""Complete the TCP/UDP checksum of a frame whose sender left it to the hardware.

Why: a frame read from a packet socket on a veth or tap whose peer offloads
checksums (``TP_STATUS_CSUMNOTREADY``) carries only the pseudo-header sum in
its checksum field.  Forwarded as is, the receiving stack drops it.  The
checksum is recomputed from scratch (pseudo-header plus segment), so the
value the sender left there does not matter.

The one's-complement sum of 16-bit words equals the big-endian integer of the
bytes modulo 0xFFFF (2**16 is 1 modulo 0xFFFF), which lets ``int.from_bytes``
do the summing in C.
"""

from __future__ import annotations

import struct
from typing import Final

_VLAN_TPIDS: Final = (0x8100, 0x88A8, 0x9100)
_IPV6_EXT: Final = (0, 43, 60)  # hop-by-hop, routing, destination options
_TCP: Final = 6
_UDP: Final = 17
_CSUM_AT: Final = {_TCP: 16, _UDP: 6}
_U16: Final = struct.Struct("!H")


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit one's-complement sum of ``data`` (odd lengths padded with a zero byte)."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    total = int.from_bytes(data, "big") % 0xFFFF
    return total or (0xFFFF if any(data) else 0)


CSUM_MOD: Final = 0xFFFF
"""Ones'-complement sums are sums mod 0xFFFF (2**16 == 1 there), so whole
32-bit fields and addresses can be added without splitting them into words."""


def tcp_pseudo_sum(src: bytes, dst: bytes, tcp_len: int) -> int:
    """The TCP pseudo-header's ones'-complement sum, mod 0xFFFF (IPv4 and IPv6 alike)."""
    return (int.from_bytes(src, "big") + int.from_bytes(dst, "big") + _TCP + tcp_len) % CSUM_MOD


def tcp_checksum_partial(
    data: bytes | bytearray, src: bytes, dst: bytes, l4: int, l4_end: int, csum: int
) -> bool:
    """True when the checksum field holds only the pseudo-header sum (offload pending).

    Such a field must not be updated for header changes: the device sums the
    new words itself.  A complete checksum equals that sum by chance once in
    65535 frames, so a match is confirmed by checking that the field is not a
    valid full checksum.
    """
    pseudo = tcp_pseudo_sum(src, dst, l4_end - l4)
    if csum % CSUM_MOD != pseudo:
        return False
    return (pseudo + ones_sum(memoryview(data)[l4:l4_end])) % CSUM_MOD != 0


def updated_checksum(csum: int, delta: int) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), with `delta` = sum of (m' - m)."""
    folded = ((csum ^ 0xFFFF) + delta) % CSUM_MOD
    return 0xFFFF - (folded or 0xFFFF)  # a nonzero sum folds to 0xFFFF, never to 0


def _l4_location(frame: bytes | bytearray) -> tuple[int, int, bytes, int] | str:
    """(L4 start, L4 length, pseudo-header without length/proto, protocol), or why not."""
    at = 12
    if len(frame) < 14:
        return "runt"
    (etype,) = _U16.unpack_from(frame, at)
    while etype in _VLAN_TPIDS:
        at += 4
        if len(frame) < at + 2:
            return "truncated_vlan"
        (etype,) = _U16.unpack_from(frame, at)
    ip = at + 2
    if etype == 0x0800:
        if len(frame) < ip + 20:
            return "ipv4_truncated"
        ihl = (frame[ip] & 0x0F) * 4
        (total,) = _U16.unpack_from(frame, ip + 2)
        (frag,) = _U16.unpack_from(frame, ip + 6)
        if frame[ip] >> 4 != 4 or ihl < 20 or total < ihl or len(frame) < ip + total:
            return "ipv4_truncated"
        if frag & 0x3FFF:
            return "fragment"
        return ip + ihl, total - ihl, bytes(frame[ip + 12 : ip + 20]), frame[ip + 9]
    if etype == 0x86DD:
        if len(frame) < ip + 40:
            return "ipv6_truncated"
        (payload,) = _U16.unpack_from(frame, ip + 4)
        end = ip + 40 + payload
        if len(frame) < end:
            return "ipv6_truncated"
        nxt, l4 = frame[ip + 6], ip + 40
        while nxt in _IPV6_EXT:
            if end < l4 + 8:
                return "ipv6_truncated"
            nxt, l4 = frame[l4], l4 + (frame[l4 + 1] + 1) * 8
        if l4 > end:
            return "ipv6_truncated"
        return l4, end - l4, bytes(frame[ip + 8 : ip + 40]), nxt
    return "not_ip"


def complete_checksum(frame: bytes) -> bytes | str:
    """``frame`` with its TCP or UDP checksum computed; a reason string when it cannot be.

    Reasons (the caller forwards the frame unchanged and counts the reason):
    ``runt``, ``truncated_vlan``, ``ipv4_truncated``, ``ipv6_truncated``,
    ``not_ip``, ``fragment``, ``not_tcp_udp``, ``l4_truncated``.
    """
    where = _l4_location(frame)
    if isinstance(where, str):
        return where
    l4, length, addresses, proto = where
    at = _CSUM_AT.get(proto)
    if at is None:
        return "not_tcp_udp"
    if length < at + 2:
        return "l4_truncated"
    out = bytearray(frame)
    out[l4 + at : l4 + at + 2] = b"\x00\x00"
    pseudo = addresses + struct.pack("!IxxxB", length, proto)
    total = ones_sum(pseudo + out[l4 : l4 + length])
    csum = ~total & 0xFFFF
    if proto == _UDP and csum == 0:
        csum = 0xFFFF  # zero means "no checksum" in UDP
    _U16.pack_into(out, l4 + at, csum)
    return bytes(out)


def checksum_ok(frame: bytes) -> bool | None:
    """Whether a frame's TCP/UDP checksum verifies (None: not a checksummable frame)."""
    where = _l4_location(frame)
    if isinstance(where, str) or where[3] not in _CSUM_AT:
        return None
    l4, length, addresses, proto = where
    if length < _CSUM_AT[proto] + 2:
        return None
    if proto == _UDP and frame[l4 + 6 : l4 + 8] == b"\x00\x00":
        return True  # UDP over IPv4 may go without a checksum
    pseudo = addresses + struct.pack("!IxxxB", length, proto)
    return ones_sum(pseudo + frame[l4 : l4 + length]) == 0xFFFF
