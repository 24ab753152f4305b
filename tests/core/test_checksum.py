"""Software checksum completion against scapy's own checksums."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet, Raw

from colo_proxy.core.checksum import checksum_ok, complete_checksum, ones_sum

ETH = Ether(src="52:54:00:00:00:01", dst="52:54:00:00:00:02")


def _csum_at(frame: bytes, pkt: Packet) -> int:
    """Offset of the L4 checksum field in a scapy-built frame."""
    layer = pkt[TCP] if TCP in pkt else pkt[UDP]
    start = len(frame) - len(bytes(layer))
    return start + (16 if isinstance(layer, TCP) else 6)


def _partial(pkt: Packet) -> tuple[bytes, bytes]:
    """(what offload leaves: some value in the checksum field, the correct frame)."""
    good = bytes(pkt)
    at = _csum_at(good, pkt)
    broken = good[:at] + b"\x12\x34" + good[at + 2 :]
    return broken, good


CASES = {
    "ipv4_tcp": ETH / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=80, dport=4000, seq=7)
    / Raw(b"hello world!"),
    "ipv4_tcp_odd": ETH / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(flags="PA") / Raw(b"odd"),
    "ipv4_udp": ETH / IP(src="10.9.8.7", dst="10.0.0.2") / UDP(sport=53, dport=5353)
    / Raw(b"x" * 101),
    "ipv4_tcp_options": ETH / IP(src="1.2.3.4", dst="5.6.7.8", options=b"\x01\x01\x01\x00")
    / TCP(options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 2))]) / Raw(b"abc"),
    "vlan_tcp": ETH / Dot1Q(vlan=10) / IP(src="10.0.0.1", dst="10.0.0.2") / TCP() / Raw(b"v"),
    "qinq_udp": ETH / Dot1Q(type=0x8100, vlan=5) / Dot1Q(vlan=7)
    / IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / Raw(b"qq"),
    "ipv6_tcp": ETH / IPv6(src="fd00::1", dst="fd00::2") / TCP() / Raw(b"six" * 50),
    "ipv6_hbh_udp": ETH / IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop()
    / UDP(sport=1, dport=2) / Raw(b"ext"),
    "padded_ipv4_udp": ETH / IP(src="10.0.0.1", dst="10.0.0.2") / UDP() / Raw(b"p"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_completes_to_scapys_checksum(name: str) -> None:
    broken, good = _partial(CASES[name])
    assert checksum_ok(broken) is False
    fixed = complete_checksum(broken)
    assert fixed == good
    assert checksum_ok(good) is True


def test_ethernet_padding_is_not_summed() -> None:
    broken, good = _partial(CASES["padded_ipv4_udp"])
    assert complete_checksum(broken + b"\xaa" * 20) == good + b"\xaa" * 20


def test_udp_zero_result_is_sent_as_ffff() -> None:
    # a two-byte payload chosen so that the checksum comes out as zero: it must read 0xffff
    base = ETH / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2, chksum=0)
    frame = bytes(base / Raw(b"\x00\x00"))
    pseudo = frame[26:34] + struct.pack("!xBH", 17, 10)
    word = ~ones_sum(pseudo + frame[34:]) & 0xFFFF
    frame = frame[:42] + struct.pack("!H", word)
    fixed = complete_checksum(frame)
    assert isinstance(fixed, bytes) and fixed[40:42] == b"\xff\xff"
    assert checksum_ok(fixed) is True


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\x00" * 10, "runt"),
        (bytes(ETH / Raw(b"\x00" * 50))[:12] + b"\x08\x06" + b"\x00" * 28, "not_ip"),
        (bytes(CASES["ipv4_tcp"])[:30], "ipv4_truncated"),
        (bytes(CASES["ipv6_tcp"])[:50], "ipv6_truncated"),
        (bytes(ETH / IP(src="1.1.1.1", dst="2.2.2.2", proto=1) / Raw(b"\x08\x00" + b"\x00" * 6)),
         "not_tcp_udp"),
        (bytes(ETH / IP(src="1.1.1.1", dst="2.2.2.2", flags="MF") / UDP() / Raw(b"a")),
         "fragment"),
        (bytes(ETH / IP(src="1.1.1.1", dst="2.2.2.2", proto=6) / Raw(b"\x00" * 10)),
         "l4_truncated"),
        (bytes(ETH)[:12] + b"\x81\x00\x00", "truncated_vlan"),
    ],
)
def test_frames_it_cannot_complete_name_the_reason(frame: bytes, reason: str) -> None:
    assert complete_checksum(frame) == reason


def test_ones_sum_matches_the_word_by_word_definition() -> None:
    data = bytes(range(256)) * 3 + b"\x07"
    words = [int.from_bytes(data[i : i + 2].ljust(2, b"\x00"), "big") for i in range(0, 769, 2)]
    total = 0
    for w in words:
        total += w
        total = (total & 0xFFFF) + (total >> 16)
    assert ones_sum(data) == total
    assert ones_sum(b"") == 0
    assert ones_sum(b"\xff\xff") == 0xFFFF


@settings(max_examples=200, deadline=None)
@given(
    payload=st.binary(max_size=1600),
    sport=st.integers(0, 65535),
    v6=st.booleans(),
    tcp=st.booleans(),
)
def test_any_payload_matches_scapy(payload: bytes, sport: int, v6: bool, tcp: bool) -> None:
    ip = IPv6(src="fd00::5", dst="fd00::9") if v6 else IP(src="10.1.2.3", dst="10.3.2.1")
    l4 = TCP(sport=sport, dport=80) if tcp else UDP(sport=sport, dport=53)
    broken, good = _partial(ETH / ip / l4 / Raw(payload))
    assert complete_checksum(broken) == good
