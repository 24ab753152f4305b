"""Zero-copy parsing of what a guest sends: Ethernet, 802.1Q/QinQ, IPv4, IPv6.

Everything works on offsets into the caller's buffer; nothing is copied
until the comparison needs bytes.  A frame that cannot be parsed yields a
reason string instead of raising: guest traffic is hostile input, and the
caller decides (and documents) what happens to it.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple, final

ETH_IPV4: Final = 0x0800
ETH_IPV6: Final = 0x86DD
ETH_ARP: Final = 0x0806
VLAN_TPIDS: Final = frozenset((0x8100, 0x88A8, 0x9100))
MAX_VLAN_TAGS: Final = 3

PROTO_ICMP: Final = 1
PROTO_IGMP: Final = 2
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ICMPV6: Final = 58
IPV6_EXT_HEADERS: Final = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options
IPV6_FRAGMENT: Final = 44
IPV6_AH: Final = 51
IPV6_NO_NEXT: Final = 59
MAX_IPV6_EXT: Final = 8

# ICMPv6 types that follow timers and caches, not the application (NDP, MLD):
# two VMs send them at different moments, so they are passed, not compared.
ICMPV6_UNCOMPARED: Final = frozenset((130, 131, 132, 133, 134, 135, 136, 137, 143))

TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10

_U16: Final = struct.Struct("!H")
_IPV4: Final = struct.Struct("!BBHHHBBH4s4s")
_IPV6: Final = struct.Struct("!IHBB16s16s")
_TCP: Final = struct.Struct("!HHIIBB")
_UDP: Final = struct.Struct("!HHH")

# Reasons a frame is passed through without comparison (not malformed).
ARP: Final = "arp"
NON_IP: Final = "non_ip"
NDP_MLD: Final = "icmpv6_ndp_mld"
IGMP: Final = "igmp"
PASS_REASONS: Final = frozenset((ARP, NON_IP, NDP_MLD, IGMP))


class IpPacket(NamedTuple):
    """An IP datagram located inside a buffer (offsets, not copies)."""

    vlan: tuple[int, ...]
    version: int
    src: bytes
    dst: bytes
    proto: int
    l4: int
    """Start of the L4 header (or of this fragment's payload)."""
    l4_end: int
    """End of the IP payload; Ethernet padding beyond it is ignored."""
    frag_id: int
    """Fragment identification, -1 when the datagram is not fragmented."""
    frag_off: int
    """Byte offset of this fragment within the original payload."""
    more_frags: bool


@final
class TcpHeader:
    """The TCP fields the comparison needs.

    A slotted class, not a NamedTuple: compiled, building one is a native call (a
    NamedTuple's __new__ is interpreted code, and every new connection builds two)."""

    __slots__ = ("ack", "dport", "flags", "options", "payload", "seq", "sport")

    def __init__(
        self, sport: int, dport: int, seq: int, ack: int, flags: int, options: int, payload: int
    ) -> None:
        self.sport = sport
        self.dport = dport
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.options = options
        """Offset of the options (header start + 20)."""
        self.payload = payload
        """Offset of the payload."""


def parse_ip(data: bytes, off: int) -> IpPacket | str:
    """Locate the IP datagram in an Ethernet frame starting at `off`."""
    n = len(data)
    if off < 0 or n - off < 14:
        return "runt"
    ethertype = _U16.unpack_from(data, off + 12)[0]
    pos = off + 14
    vlan: tuple[int, ...] = ()
    while ethertype in VLAN_TPIDS:
        if len(vlan) >= MAX_VLAN_TAGS:
            return "vlan_too_deep"
        if n - pos < 4:
            return "vlan_truncated"
        vlan = (*vlan, _U16.unpack_from(data, pos)[0] & 0x0FFF)
        ethertype = _U16.unpack_from(data, pos + 2)[0]
        pos += 4
    if ethertype == ETH_IPV4:
        return _parse_ipv4(data, pos, vlan)
    if ethertype == ETH_IPV6:
        return _parse_ipv6(data, pos, vlan)
    if ethertype == ETH_ARP:
        return ARP
    return NON_IP


def _parse_ipv4(data: bytes, pos: int, vlan: tuple[int, ...]) -> IpPacket | str:
    if len(data) - pos < 20:
        return "ipv4_truncated"
    vihl, _tos, total, ident, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(data, pos)
    if vihl >> 4 != 4:
        return "ipv4_bad_version"
    hlen = (vihl & 0x0F) * 4
    if hlen < 20:
        return "ipv4_bad_header_length"
    if total < hlen:
        return "ipv4_bad_total_length"
    end = pos + total
    if end > len(data):
        return "ipv4_truncated"
    more = bool(frag & 0x2000)
    frag_off = (frag & 0x1FFF) * 8
    if more or frag_off:
        return IpPacket(vlan, 4, src, dst, proto, pos + hlen, end, ident, frag_off, more)
    return IpPacket(vlan, 4, src, dst, proto, pos + hlen, end, -1, 0, False)


def _parse_ipv6(data: bytes, pos: int, vlan: tuple[int, ...]) -> IpPacket | str:
    if len(data) - pos < 40:
        return "ipv6_truncated"
    vtcfl, plen, nxt, _hlim, src, dst = _IPV6.unpack_from(data, pos)
    if vtcfl >> 28 != 6:
        return "ipv6_bad_version"
    if plen == 0:
        return "ipv6_jumbo_or_empty"
    end = pos + 40 + plen
    if end > len(data):
        return "ipv6_truncated"
    cur = pos + 40
    frag_id, frag_off, more = -1, 0, False
    for _ in range(MAX_IPV6_EXT):
        if nxt in IPV6_EXT_HEADERS:
            if end - cur < 8:
                return "ipv6_bad_extension"
            nxt, hlen = data[cur], (data[cur + 1] + 1) * 8
        elif nxt == IPV6_AH:
            if end - cur < 8:
                return "ipv6_bad_extension"
            nxt, hlen = data[cur], (data[cur + 1] + 2) * 4
        elif nxt == IPV6_FRAGMENT:
            if end - cur < 8 or frag_id != -1:
                return "ipv6_bad_fragment"
            field = _U16.unpack_from(data, cur + 2)[0]
            frag_off, more = field & 0xFFF8, bool(field & 1)
            frag_id = int.from_bytes(data[cur + 4 : cur + 8], "big")
            nxt, hlen = data[cur], 8
        else:
            break
        if end - cur < hlen:
            return "ipv6_bad_extension"
        cur += hlen
    else:
        return "ipv6_too_many_extensions"
    if frag_id != -1 and not more and frag_off == 0:
        frag_id = -1  # an atomic fragment: a whole datagram in one piece
    return IpPacket(vlan, 6, src, dst, nxt, cur, end, frag_id, frag_off, more)


def parse_tcp(data: bytes, start: int, end: int) -> TcpHeader | str:
    """Read the TCP header at data[start:end]."""
    if end - start < 20:
        return "tcp_truncated"
    sport, dport, seq, ack, doff, flags = _TCP.unpack_from(data, start)
    hlen = (doff >> 4) * 4
    if hlen < 20 or start + hlen > end:
        return "tcp_bad_header_length"
    return TcpHeader(sport, dport, seq, ack, flags, start + 20, start + hlen)


def parse_udp(data: bytes, start: int, end: int) -> tuple[int, int, int, int] | str:
    """(sport, dport, payload start, payload end) of the UDP datagram."""
    if end - start < 8:
        return "udp_truncated"
    sport, dport, ulen = _UDP.unpack_from(data, start)
    if ulen < 8 or start + ulen > end:
        return "udp_bad_length"
    return sport, dport, start + 8, start + ulen


def tcp_syn_options(data: bytes, start: int, end: int) -> tuple[int, int, bool, bool]:
    """(MSS, window scale, SACK permitted, timestamps) of a SYN; -1 when absent.

    Only options that change how the peer behaves are returned: values that
    both stacks pick independently (timestamp values) are not compared.
    """
    mss, wscale, sack, ts = -1, -1, False, False
    i = start
    while i < end:
        kind = data[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end:
            break
        length = data[i + 1]
        if length < 2 or i + length > end:
            break
        if kind == 2 and length == 4:
            mss = _U16.unpack_from(data, i + 2)[0]
        elif kind == 3 and length == 3:
            wscale = data[i + 2]
        elif kind == 4:
            sack = True
        elif kind == 8:
            ts = True
        i += length
    return mss, wscale, sack, ts


def format_addr(version: int, addr: bytes) -> str:
    """Human-readable address for reports."""
    if version == 4:
        return ".".join(str(b) for b in addr)
    groups = [f"{int.from_bytes(addr[i:i + 2], 'big'):x}" for i in range(0, 16, 2)]
    return ":".join(groups)
