"""Fast synthetic frames (struct-built) for tests and benchmarks.

Scapy is the reference generator for golden captures; this module exists
because benchmarks need hundreds of thousands of frames in seconds.  Frames
carry valid IPv4 header checksums; TCP/UDP checksums are left zero, as
with checksum offload, which the core never looks at.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from colo_proxy.core.packet import TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN

GUEST_MAC = b"\x52\x54\x00\x12\x34\x56"
CLIENT_MAC = b"\x52\x54\x00\xab\xcd\xef"


def ipv4_checksum(header: bytes) -> int:
    """RFC 1071 checksum of an IPv4 header."""
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def ipv4_frame(src: bytes, dst: bytes, proto: int, l4: bytes, ident: int = 0, ttl: int = 64,
               vlan: tuple[int, ...] = (), src_mac: bytes = GUEST_MAC,
               dst_mac: bytes = CLIENT_MAC) -> bytes:
    """An Ethernet/IPv4 frame around an L4 payload."""
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident & 0xFFFF, 0x4000, ttl,
                       proto, 0, src, dst)
    head = head[:10] + struct.pack("!H", ipv4_checksum(head)) + head[12:]
    eth = dst_mac + src_mac
    for vid in vlan:
        eth += struct.pack("!HH", 0x8100, vid)
    return eth + b"\x08\x00" + head + l4


def tcp_segment(sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"",
                window: int = 65535, options: bytes = b"") -> bytes:
    """A TCP header (checksum zero) plus payload."""
    if len(options) % 4:
        options += b"\x00" * (4 - len(options) % 4)
    doff = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                       doff << 4, flags, window, 0, 0) + options + payload


def udp_datagram(sport: int, dport: int, payload: bytes, csum: int = 0) -> bytes:
    """A UDP header and payload (checksum 0: none)."""
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), csum) + payload


def syn_options(mss: int = 1460, wscale: int = 7, sack: bool = True, ts: bool = True) -> bytes:
    """SYN options in the order Linux sends them."""
    out = struct.pack("!BBH", 2, 4, mss)
    if sack:
        out += b"\x04\x02"
    if ts:
        out += struct.pack("!BBII", 8, 10, 1, 0)
    out += b"\x01" + struct.pack("!BBB", 3, 3, wscale)
    return out


@dataclass
class TcpServerStream:
    """What a guest TCP server sends on one connection: SYN-ACK, data, FIN."""

    src: bytes = bytes((10, 0, 0, 1))
    dst: bytes = bytes((10, 0, 0, 2))
    sport: int = 80
    dport: int = 40000
    isn: int = 1000
    client_isn: int = 5000
    vlan: tuple[int, ...] = ()

    def synack(self, **opts: int | bool) -> bytes:
        seg = tcp_segment(self.sport, self.dport, self.isn, self.client_isn + 1,
                          TCP_SYN | TCP_ACK, options=syn_options(**opts))  # type: ignore[arg-type]
        return ipv4_frame(self.src, self.dst, 6, seg, vlan=self.vlan)

    def data(self, offset: int, payload: bytes, ack_offset: int = 0, flags: int = 0,
             ident: int = 0) -> bytes:
        """A segment carrying payload at stream offset `offset`."""
        seg = tcp_segment(self.sport, self.dport, self.isn + 1 + offset,
                          self.client_isn + 1 + ack_offset, TCP_ACK | TCP_PSH | flags, payload)
        return ipv4_frame(self.src, self.dst, 6, seg, ident=ident, vlan=self.vlan)

    def fin(self, offset: int, ack_offset: int = 0) -> bytes:
        seg = tcp_segment(self.sport, self.dport, self.isn + 1 + offset,
                          self.client_isn + 1 + ack_offset, TCP_ACK | TCP_FIN)
        return ipv4_frame(self.src, self.dst, 6, seg, vlan=self.vlan)

    def ack(self, offset: int, ack_offset: int) -> bytes:
        seg = tcp_segment(self.sport, self.dport, self.isn + 1 + offset,
                          self.client_isn + 1 + ack_offset, TCP_ACK)
        return ipv4_frame(self.src, self.dst, 6, seg, vlan=self.vlan)
