"""Hostile input never raises, is counted by reason, and follows the stated rule."""

from __future__ import annotations

import struct
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo_proxy.core.config import Config
from colo_proxy.core.datagram import DatagramFlow
from colo_proxy.core.events import Side
from colo_proxy.core.proxy import SETTLE_FLOWS, CoreFault, Proxy
from colo_proxy.core.tcp import TcpFlow
from colo_proxy.testing.synth import TcpServerStream, ipv4_frame
from tests.core.harness import P, S, run

GOOD = TcpServerStream().data(0, b"hello")


def test_truncations_are_counted_primary_passed_secondary_dropped() -> None:
    cuts = [0, 5, 13, 20, 33, 40, 53]
    r = run([(P, GOOD[:n]) for n in cuts] + [(S, GOOD[:n]) for n in cuts])
    assert len(r.released) == len(cuts)
    assert sum(r.proxy.malformed.values()) == 2 * len(cuts)
    assert r.proxy.counters["secondary_frames_dropped_uncompared"] == len(cuts)
    assert r.proxy.malformed["runt"] == 6
    assert r.proxy.malformed["ipv4_truncated"] == 8


def test_arp_passes_uncompared() -> None:
    arp = b"\xff" * 6 + b"\x52\x54\x00\x00\x00\x01" + b"\x08\x06" + bytes(28)
    r = run([(P, arp), (S, arp)])
    assert r.released == [arp] and r.proxy.uncompared["arp"] == 2
    assert not r.proxy.malformed


def test_bad_ip_lengths() -> None:
    bad_ihl = GOOD[:14] + b"\x43" + GOOD[15:]
    bad_total = GOOD[:16] + struct.pack("!H", 10) + GOOD[18:]
    bad_tcp_off = GOOD[:46] + b"\xf0" + GOOD[47:]
    r = run([(P, bad_ihl), (P, bad_total), (P, bad_tcp_off)])
    assert dict(r.proxy.malformed) == {
        "ipv4_bad_header_length": 1, "ipv4_bad_total_length": 1, "tcp_bad_header_length": 1,
    }


def test_ethernet_padding_is_not_payload() -> None:
    p = TcpServerStream()
    ack = p.ack(0, 0)
    r = run([(P, ack + b"\x00" * 6), (S, ack + b"\xaa" * 6)])
    assert r.divergences == [] and len(r.released) == 1


def test_vnet_offset_is_skipped() -> None:
    proxy = Proxy(Config())
    vnet = bytes(12)
    proxy.feed(Side.PRIMARY, vnet + GOOD, 0.0, 12)
    proxy.feed(Side.SECONDARY, vnet + GOOD, 0.0, 12)
    assert proxy.take_output().released == [(vnet + GOOD, 12)]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=120)), max_size=30))
def test_garbage_never_raises_and_primary_is_never_lost(frames: list[tuple[bool, bytes]]) -> None:
    proxy = Proxy(Config())
    primaries = 0
    for i, (is_primary, junk) in enumerate(frames):
        primaries += is_primary
        proxy.feed(Side.PRIMARY if is_primary else Side.SECONDARY, junk, i * 0.01)
    proxy.checkpoint_done(10.0)
    assert len(proxy.take_output().released) == primaries


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=60), st.integers(0, 200))
def test_garbage_behind_valid_headers_never_raises(tail: bytes, proto: int) -> None:
    frame = ipv4_frame(b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", proto, tail)
    proxy = Proxy(Config())
    proxy.feed(Side.PRIMARY, frame, 0.0)
    proxy.feed(Side.SECONDARY, frame, 0.0)
    proxy.checkpoint_done(1.0)
    assert len(proxy.take_output().released) == 1


def udp(payload: bytes) -> bytes:
    return struct.pack("!HHHH", 7000, 9, 8 + len(payload), 0) + payload


def poison(flow: TcpFlow) -> None:
    """Plant a bug in a flow that fails the same way pure and compiled (a TypeError
    when progress reads it), where monkeypatching a compiled class cannot."""
    flow.sec_times = [("bug", 0.0)]  # type: ignore[list-item]  (its own list: an empty
    # flow's is the shared tcpside.NO_TIMES)


def test_a_core_fault_names_the_frame_of_the_batch() -> None:
    proxy = Proxy(Config())
    key = b"\x0a\x00\x00\x01\x0a\x00\x00\x02"
    frames = [(ipv4_frame(key[:4], key[4:], 17, udp(b"x")), 0),
              (ipv4_frame(key[:4], key[4:], 17, udp(b"bad")), 0),
              (ipv4_frame(key[:4], key[4:], 17, udp(b"y")), 0)]
    proxy.feed_many(Side.PRIMARY, [frames[0], frames[2]], 0.0)
    (flow,) = proxy.table.flows.values()
    assert isinstance(flow, DatagramFlow)
    flow.pri_wait[b"bad"] = deque([object()])  # type: ignore[list-item]
    with pytest.raises(CoreFault) as info:
        proxy.feed_many(Side.SECONDARY, frames, 0.0)
    assert info.value.index == 1
    assert isinstance(info.value.__cause__, TypeError | AttributeError)


def test_a_fault_while_settling_the_batch_is_index_minus_one() -> None:
    """Comparison runs once per flow after the frames: its failure names no frame."""
    proxy = Proxy(Config())
    p, s = TcpServerStream(), TcpServerStream(isn=777)
    proxy.feed_many(Side.PRIMARY, [(p.synack(), 0)], 0.0)
    proxy.feed_many(Side.SECONDARY, [(s.synack(), 0)], 0.0)
    proxy.feed_many(Side.PRIMARY, [(p.data(0, b"x"), 0), (p.data(1, b"y"), 0)], 0.0)
    (flow,) = proxy.table.flows.values()
    assert isinstance(flow, TcpFlow)
    poison(flow)
    with pytest.raises(CoreFault) as info:
        proxy.feed_many(Side.SECONDARY, [(s.data(0, b"xy"), 0)], 0.0)
    assert info.value.index == -1 and isinstance(info.value.__cause__, TypeError)
    assert proxy.stats()["secondary_frames"] == 2


def test_a_settle_fault_mid_batch_loses_none_of_the_rest() -> None:
    """Past SETTLE_FLOWS owed flows the batch settles early; one flow's bug there
    must not stop the frames after it: all are fed, the others released, then -1."""
    proxy = Proxy(Config())
    n = SETTLE_FLOWS * 2 + 5
    pri = [TcpServerStream(dport=30000 + i) for i in range(n)]
    sec = [TcpServerStream(dport=30000 + i, isn=4242) for i in range(n)]
    proxy.feed_many(Side.PRIMARY, [(p.synack(), 0) for p in pri], 0.0)
    proxy.feed_many(Side.SECONDARY, [(s.synack(), 0) for s in sec], 0.0)
    proxy.feed_many(Side.PRIMARY, [(p.data(0, b"abc"), 0) for p in pri], 0.0)
    assert len(proxy.take_output().released) == n  # the SYN-ACKs
    (bad,) = [f for f in proxy.table.flows.values() if f.key[5] == 30003]
    assert isinstance(bad, TcpFlow)
    poison(bad)
    with pytest.raises(CoreFault) as info:
        proxy.feed_many(Side.SECONDARY, [(s.data(0, b"abc"), 0) for s in sec], 0.0)
    assert info.value.index == -1 and isinstance(info.value.__cause__, TypeError)
    assert len(proxy.take_output().released) == n - 1
