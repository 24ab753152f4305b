"""UDP, ICMP, other protocols and IP fragments."""

from __future__ import annotations

import struct

import pytest

from colo_proxy.core.config import Config
from colo_proxy.core.events import Side
from colo_proxy.testing.synth import ipv4_frame
from tests.core.harness import C, P, S, run

A, B = bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2))


def udp(payload: bytes, sport: int = 7000, dport: int = 9, csum: int = 0, ident: int = 0,
        ttl: int = 64) -> bytes:
    l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), csum) + payload
    return ipv4_frame(A, B, 17, l4, ident=ident, ttl=ttl)


def icmp_reply(payload: bytes, csum: int = 0, seq: int = 1) -> bytes:
    return ipv4_frame(A, B, 1, struct.pack("!BBHHH", 0, 0, csum, 7, seq) + payload)


def test_udp_reordered_within_window_agrees() -> None:
    pri = [udp(bytes([i]) * 100) for i in range(20)]
    sec = list(reversed(pri[:8])) + pri[8:]
    r = run([x for pair in zip([(P, f) for f in pri], [(S, f) for f in sec], strict=True)
             for x in pair])
    assert r.divergences == [] and sorted(r.released) == sorted(pri)
    assert r.proxy.held_frames() == 0


def test_udp_header_noise_is_ignored() -> None:
    r = run([(P, udp(b"x" * 50, csum=0x1234, ident=5, ttl=64)),
             (S, udp(b"x" * 50, csum=0, ident=999, ttl=63))])
    assert r.divergences == [] and len(r.released) == 1


def test_udp_payload_difference_is_found_by_the_window() -> None:
    cfg = Config(datagram_reorder_window=4)
    pri = [udp(bytes([i]) * 10) for i in range(10)]
    sec = list(pri)
    sec[2] = udp(b"\xee" * 10)
    r = run([x for pair in zip([(P, f) for f in pri], [(S, f) for f in sec], strict=True)
             for x in pair], cfg)
    assert r.kinds == [("udp", None)]
    assert r.divergences[0].primary == bytes([2]) * 10
    # Datagrams are released as matched (no head-of-line blocking) until the
    # window shows datagram 2 has no partner.
    assert sorted(f[-1] for f in r.released) == [0, 1, 3, 4, 5]


def test_icmp_checksum_and_rest_compared_correctly() -> None:
    r = run([(P, icmp_reply(b"ping", csum=1)), (S, icmp_reply(b"ping", csum=2))])
    assert r.divergences == [] and len(r.released) == 1
    r2 = run([(P, icmp_reply(b"ping", seq=1)), (S, icmp_reply(b"ping", seq=2)),
              (P, icmp_reply(b"ping", seq=3)), (S, icmp_reply(b"ping", seq=3))],
             Config(datagram_reorder_window=1))
    assert r2.kinds == [("icmp", None)]


def test_other_protocol_compared_on_ip_payload() -> None:
    gre = ipv4_frame(A, B, 47, b"\x00\x00\x08\x00payload", ident=1)
    gre2 = ipv4_frame(A, B, 47, b"\x00\x00\x08\x00payload", ident=2, ttl=3)
    r = run([(P, gre), (S, gre2)])
    assert r.divergences == [] and len(r.released) == 1


@pytest.mark.parametrize("side", [P, S])
def test_datagram_without_partner_times_out(side: Side) -> None:
    """On time although the slow sweep is 100 s away and a scan found the flow owing
    nothing just before: the lonely datagram itself makes the flow watched."""
    slow_sweep = Config(flow_idle_timeout=1000.0, closed_flow_timeout=1000.0)
    r = run([(C, udp(b"client")), (P, udp(b"first")), (S, udp(b"first")),
             (side, udp(b"lonely"))], config=slow_sweep, step=0.25, end_time=5.0)
    assert r.kinds == [("timeout", None)]
    assert 3.75 < r.requests[0].time <= 4.05


def fragments(payload: bytes, size: int, ident: int) -> list[bytes]:
    """IPv4 fragments of one UDP datagram, `size` payload bytes each (multiple of 8)."""
    l4 = struct.pack("!HHHH", 7000, 9, 8 + len(payload), 0) + payload
    out = []
    for off in range(0, len(l4), size):
        piece = l4[off:off + size]
        more = 0x2000 if off + size < len(l4) else 0
        frame = ipv4_frame(A, B, 17, piece, ident=ident)
        # patch flags/fragment offset (bytes 20-21 of the IP header)
        frame = frame[:20] + struct.pack("!H", more | (off // 8)) + frame[22:]
        out.append(frame)
    return out


def test_fragmented_differently_still_agrees() -> None:
    payload = bytes(range(256)) * 12
    pri = fragments(payload, 1480, 11)
    sec = fragments(payload, 512, 99)
    r = run([(P, f) for f in pri] + [(S, f) for f in reversed(sec)])
    assert r.divergences == []
    assert r.released == pri
    assert r.proxy.counters["ip_datagrams_reassembled"] == 2


def test_fragment_limit_passes_primary_through() -> None:
    payload = bytes(1000)
    pri = fragments(payload, 8, 1)
    r = run([(P, f) for f in pri], Config(max_fragments=4))
    assert r.proxy.malformed["ip_fragment_limit"] == 1
    # The given-up datagram's fragments, earlier and later ones, all went out uncompared.
    assert r.released == pri


def test_secondary_datagrams_without_primary_are_bounded() -> None:
    r = run([(S, udp(bytes([i]) * 100)) for i in range(30)], Config(max_sec_buffer_bytes=1000))
    assert [q.reason.value for q in r.requests] == ["hold_limit"]
