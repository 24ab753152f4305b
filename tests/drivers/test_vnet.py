"""virtio_net_hdr frames: the header codec, the V2 slot parser, and real super-frames on a veth.

The codec and parser run on built bytes; the veth tests (root) send a TCP
super-frame out of a vnet port and read the kernel's own super-frames and
open checksums back in, so the layout is the kernel's, not ours.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from colo_proxy.core.checksum import checksum_ok, complete_checksum
from colo_proxy.core.framing import Frame
from colo_proxy.drivers import vnet
from colo_proxy.drivers.afpacket import (
    TP_STATUS_COPY,
    TP_STATUS_CSUMNOTREADY,
    TP_STATUS_GSO_TCP,
    TP_STATUS_USER,
    TP_STATUS_VLAN_VALID,
    PacketPort,
    PortStats,
    parse_slots_vnet,
    vnet_supported,
)
from tests.drivers.test_afpacket import SRC, Veth, ns_udp_socket, peer_socket, veth
from tests.fakes import until

__all__ = ["veth"]  # the fixture, shared

scapy_all = pytest.importorskip("scapy.all")


def tcp_frame(payload: bytes, seq: int = 1000) -> bytes:
    frame = (scapy_all.Ether(src="52:54:00:00:00:01", dst="52:54:00:00:00:02")
             / scapy_all.IP(src="10.231.0.2", dst="10.231.0.9")
             / scapy_all.TCP(sport=80, dport=40000, flags="PA", seq=seq, ack=7) / payload)
    return bytes(frame)


def open_checksum(frame: bytes) -> bytes:
    """``frame`` as a sender with checksum offload hands it over: the pseudo-header sum only."""
    ihl = (frame[14] & 0x0F) * 4
    length = len(frame) - 14 - ihl
    pseudo = frame[26:34] + struct.pack("!xBH", 6, length)
    total = int.from_bytes(pseudo, "big") % 0xFFFF
    l4 = 14 + ihl
    return frame[: l4 + 16] + struct.pack("!H", total or 0xFFFF) + frame[l4 + 18 :]


# ---- the header ---------------------------------------------------------------------------


def test_header_packs_and_parses_in_the_kernels_layout() -> None:
    h = vnet.VnetHeader(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 66, 1448, 34, 16)
    raw = h.pack()
    assert raw == bytes([1, 1]) + struct.pack("=HHHH", 66, 1448, 34, 16)
    assert len(raw) == vnet.VNET_LEN and vnet.parse(raw) == h
    assert h.is_super and h.needs_csum
    assert not vnet.parse(vnet.ZERO).is_super and not vnet.parse(vnet.ZERO).needs_csum
    assert vnet.VnetHeader(gso_type=vnet.GSO_TCPV4 | vnet.GSO_ECN).is_super


def test_a_vlan_tag_put_back_moves_the_checksum_start_and_header_length() -> None:
    h = vnet.VnetHeader(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 66, 1448, 34, 16).pack()
    assert vnet.parse(vnet.shifted(h, 4))[2:] == (70, 1448, 38, 16)
    plain = vnet.VnetHeader().pack()
    assert vnet.shifted(plain, 4) == plain  # fields that are not set stay 0


def test_plain_strips_the_header_and_completes_an_open_checksum() -> None:
    whole = tcp_frame(b"x" * 3000)
    opened = open_checksum(whole)
    assert checksum_ok(opened) is False
    header = vnet.VnetHeader(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16).pack()
    assert vnet.plain(header + opened, vnet.VNET_LEN) == whole
    assert vnet.plain(vnet.ZERO + whole, vnet.VNET_LEN) == whole
    assert vnet.plain(whole, 0) is whole


# ---- the slot parser ----------------------------------------------------------------------

SLOT, MAC = 2048, 76


def ring_of(entries: list[tuple[bytes, bytes, int, int, int]]) -> bytearray:
    """V2 slots: (header, frame, tp_len, tp_status, tci); the frame cut to the slot."""
    ring = bytearray(len(entries) * SLOT + SLOT)
    for i, (header, frame, length, status, tci) in enumerate(entries):
        at = i * SLOT
        data = frame[: SLOT - MAC]
        struct.pack_into("=IIIHHIIHH", ring, at, status, length, len(data), MAC, MAC + 14, 0,
                         0, tci, 0)
        ring[at + MAC - vnet.VNET_LEN : at + MAC] = header
        ring[at + MAC : at + MAC + len(data)] = data
    return ring


def test_parse_slots_vnet_takes_super_frames_open_checksums_and_copies_in_order() -> None:
    small = open_checksum(tcp_frame(b"a" * 100))
    big = open_checksum(tcp_frame(b"b" * 20000, seq=1100))
    gso = vnet.VnetHeader(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16).pack()
    csum = vnet.VnetHeader(vnet.F_NEEDS_CSUM, 0, 0, 0, 34, 16).pack()
    udp_gso = vnet.VnetHeader(vnet.F_NEEDS_CSUM, vnet.GSO_UDP_L4, 42, 1000, 34, 6).pack()
    tagged = tcp_frame(b"c" * 10)
    ring = ring_of([
        (csum, small, len(small), TP_STATUS_USER | TP_STATUS_CSUMNOTREADY, 0),
        (gso, big, len(big), TP_STATUS_USER | TP_STATUS_COPY | TP_STATUS_CSUMNOTREADY
         | TP_STATUS_GSO_TCP, 0),
        (gso, big, len(big), TP_STATUS_USER | TP_STATUS_GSO_TCP, 0),  # cut, no copy: dropped
        (udp_gso, small, len(small), TP_STATUS_USER, 0),  # UDP GSO: dropped
        (vnet.ZERO, tagged, len(tagged), TP_STATUS_USER | TP_STATUS_VLAN_VALID, 0x2064),
        (vnet.ZERO, small, len(small), 0, 0),  # still the kernel's
    ])
    copies = [gso + big]
    stats, out = PortStats(), []
    head = parse_slots_vnet(memoryview(ring), 0, 6, SLOT, stats, out, ring,  # type: ignore[arg-type]
                            lambda: copies.pop(0))
    assert head == 5 and not copies
    assert out == [
        (csum + small, vnet.VNET_LEN),
        (gso + big, vnet.VNET_LEN),
        (vnet.ZERO + tagged[:12] + b"\x81\x00\x20\x64" + tagged[12:], vnet.VNET_LEN),
    ]
    assert (stats.super_frames_in, stats.super_frames_copied, stats.csum_partial_in) == (1, 1, 2)
    assert (stats.truncated_dropped, stats.gso_dropped, stats.vlan_reinserted) == (1, 1, 1)
    assert [struct.unpack_from("=I", ring, i * SLOT)[0] for i in range(5)] == [0] * 5


def test_a_copy_that_does_not_match_its_slot_is_dropped_not_misplaced() -> None:
    frame = tcp_frame(b"d" * 3000)
    ring = ring_of([(vnet.ZERO, frame, len(frame), TP_STATUS_USER | TP_STATUS_COPY, 0)])
    stats, out = PortStats(), []
    parse_slots_vnet(memoryview(ring), 0, 1, SLOT, stats, out, ring,  # type: ignore[arg-type]
                     lambda: vnet.ZERO + frame[:100])
    assert out == [] and stats.truncated_dropped == 1


# ---- a real veth ---------------------------------------------------------------------------


def vnet_port(v: Veth, got: list[Frame]) -> PacketPort:
    if not vnet_supported():
        pytest.skip("this kernel takes no virtio_net_hdr on packet rings")
    port = PacketPort("test", v.host, got.extend, vnet=True)
    port.open()
    port.start()
    return port


def test_a_super_frame_sent_on_a_vnet_port_leaves_whole_with_its_open_checksum(
    veth: Veth,
) -> None:
    """20 KB of TCP in one frame (GSO TCPv4, NEEDS_CSUM), between two small ones, in order."""
    big = open_checksum(tcp_frame(b"e" * 20000, seq=5000))
    small = [tcp_frame(b"f" * 10, seq=1), tcp_frame(b"g" * 10, seq=2)]
    gso = vnet.VnetHeader(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 54, 1448, 34, 16).pack()

    async def main() -> None:
        got: list[Frame] = []
        port = vnet_port(veth, got)
        peer = peer_socket(veth)
        port.send([(small[0], 0), (gso + big, vnet.VNET_LEN), (vnet.ZERO + small[1],
                                                                 vnet.VNET_LEN)])
        received: list[bytes] = []
        while len(received) < 3:
            frame = await asyncio.get_running_loop().run_in_executor(None, peer.recv, 65536)
            if frame[6:12] == SRC or frame[:6] == bytes.fromhex("525400000002"):
                received.append(frame)
        counters = port.counters()
        port.close()
        peer.close()
        # a packet socket on the peer sees the super-frame as the veth carries it: whole
        assert received == [small[0], big, small[1]]
        assert complete_checksum(received[1]) == tcp_frame(b"e" * 20000, seq=5000)
        assert counters["super_frames_out"] == 1 and counters["frames_out"] == 3
        assert counters["send_oversize"] == 0 and counters["send_errors"] == 0

    asyncio.run(main())


def test_a_vnet_port_reads_open_checksums_and_drops_udp_gso(veth: Veth) -> None:
    """The namespace's UDP: an open checksum arrives flagged; a UDP GSO frame is counted."""
    got: list[Frame] = []

    async def main() -> None:
        port = vnet_port(veth, got)
        udp = ns_udp_socket(veth)
        udp.sendto(b"open checksum" * 20, ("10.231.0.9", 9))
        udp.setsockopt(socket.SOL_UDP, 103, 1000)  # UDP_SEGMENT
        udp.sendto(b"\x01" * 4000, ("10.231.0.9", 9))
        udp.setsockopt(socket.SOL_UDP, 103, 0)
        udp.sendto(b"small", ("10.231.0.9", 9))
        udp.close()
        await until(lambda: any(d.endswith(b"small") for d, _ in got), "the last datagram")
        stats = port.stats
        port.close()
        frames = [(d, o) for d, o in got if d[o + 23 : o + 24] == b"\x11"]
        first = frames[0]
        assert first[1] == vnet.VNET_LEN and vnet.parse(first[0]).needs_csum
        assert checksum_ok(first[0][vnet.VNET_LEN:]) is False  # left open, as the sender did
        assert checksum_ok(vnet.plain(*first)) is True
        assert stats.csum_partial_in >= 1
        if len(frames) == 6:
            pytest.skip("this kernel segmented the UDP GSO send itself")
        assert stats.gso_dropped == 1 and len(frames) == 2

    asyncio.run(main())
