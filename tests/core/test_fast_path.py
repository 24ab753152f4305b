"""The fast paths' inlined pieces stay equal to the code they copy."""

from __future__ import annotations

import struct
from itertools import product

import pytest

from colo_proxy.core import fastparse
from colo_proxy.core.config import Config
from colo_proxy.core.fastparse import _FAST, FAST_FIELDS
from colo_proxy.core.flows import FlowKey
from colo_proxy.core.proxy import Proxy
from colo_proxy.core.reassembly import StreamBuffer
from colo_proxy.core.seq import MASK32, unwrap
from colo_proxy.core.tcp import TcpFlow

KEY: FlowKey = (6, (), b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", 80, 5555)
ISNS = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 123456789]
NEARS = [0, 1, 1448, 2**31 - 5, 2**32 + 7, 5 * 2**32 + 3]
DELTAS = [-(2**31), -(2**31) + 1, -1449, -1, 0, 1, 1447, 2**31 - 2, 2**31 - 1]
PAYLOAD = b"x" * 8


def flow_at(isn: int, peer_isn: int, near: int, ack_near: int, secondary: bool) -> TcpFlow:
    flow = TcpFlow(KEY, 0.0)
    for side in (flow.pri, flow.sec):
        side.isn, side.peer_isn = isn, peer_isn
        side.stream = StreamBuffer(near)
        side.ack_max = ack_near
    flow.space_ok = secondary
    return flow


@pytest.mark.parametrize(("isn", "near"), list(product(ISNS, NEARS)))
def test_inlined_unwrap_in_fast_primary_is_seq_unwrap(isn: int, near: int) -> None:
    host = Proxy(Config())
    peer_isn = (isn * 7 + 3) & MASK32
    for delta in DELTAS:
        seq = (isn + 1 + near + delta) & MASK32
        ack = (peer_isn + 1 + near + delta) & MASK32
        flow = flow_at(isn, peer_isn, near, near, secondary=False)
        flow.fast_primary(host, PAYLOAD, seq, ack, 0, len(PAYLOAD), (PAYLOAD, 0), 8, 0.0)
        entry = flow.queue[-1]
        assert entry.start == unwrap(seq - isn - 1, near)
        assert entry.ack == unwrap(ack - peer_isn - 1, near)


@pytest.mark.parametrize(("isn", "near"), list(product(ISNS, NEARS)))
def test_inlined_unwrap_in_fast_secondary_is_seq_unwrap(isn: int, near: int) -> None:
    host = Proxy(Config())
    peer_isn = (isn * 7 + 3) & MASK32
    for delta in DELTAS:
        seq = (isn + 1 + near + delta) & MASK32
        ack = (peer_isn + 1 + near + delta) & MASK32
        flow = flow_at(isn, peer_isn, near, near, secondary=True)
        flow.sec.high = 0
        flow.fast_secondary(host, PAYLOAD, seq, ack, 0, len(PAYLOAD), 0.0)
        off = unwrap(seq - isn - 1, near)
        assert flow.sec.high == max(0, off + len(PAYLOAD))
        assert flow.sec.ack_max == max(near, unwrap(ack - peer_isn - 1, near))


def test_the_fast_parse_is_the_named_field_table() -> None:
    """feed_many's unpack yields the table's named fields, in order, at their offsets."""
    names = [name for _, name in FAST_FIELDS if name]
    assert names == ["etype", "vihl", "total", "frag", "proto", "key", "seq", "ack", "doff",
                     "flags"]
    assert _FAST.size == 14 + 20 + 14
    frame = bytes(range(_FAST.size))
    values = dict(zip(names, _FAST.unpack(frame), strict=True))
    assert values["etype"] == struct.unpack_from("!H", frame, 12)[0]
    assert values["proto"] == frame[14 + 9]
    assert values["key"] == frame[14 + 12 : 14 + 24]
    assert values["seq"] == struct.unpack_from("!I", frame, 38)[0]
    assert values["flags"] == frame[47]


def test_the_fast_offsets_are_the_named_field_table() -> None:
    """feed_many reads each field at its OFF_* offset: the table's offset of that field."""
    at = 0
    offsets = {}
    for code, name in FAST_FIELDS:
        if name:
            offsets[name] = at
        at += struct.calcsize("!" + code)
    assert offsets == {
        "etype": fastparse.OFF_ETYPE, "vihl": fastparse.OFF_VIHL, "total": fastparse.OFF_TOTAL,
        "frag": fastparse.OFF_FRAG, "proto": fastparse.OFF_PROTO, "key": fastparse.OFF_KEY,
        "seq": fastparse.OFF_SEQ, "ack": fastparse.OFF_ACK, "doff": fastparse.OFF_DOFF,
        "flags": fastparse.OFF_FLAGS,
    }
    assert offsets["seq"] - offsets["key"] == fastparse.KEY_LEN


def test_the_shared_empty_lists_stay_empty() -> None:
    """Empty flows share tcpside.NO_TIMES/NO_STASH and reassembly's _NO_PIECES/_NO_STARTS;
    out-of-order bytes, unmatched secondary bytes and stashed segments must each get a
    list of their own, or one flow's would show up in every other."""
    from colo_proxy.core import reassembly, tcpside
    from colo_proxy.core.events import Side
    from colo_proxy.testing.synth import TcpServerStream

    proxy = Proxy(Config())
    pri, sec = TcpServerStream(isn=1000), TcpServerStream(isn=900000)
    proxy.feed(Side.SECONDARY, sec.synack(), 0.0)
    proxy.feed(Side.SECONDARY, sec.data(0, b"first"), 0.0)  # the primary's ISN unknown
    (flow,) = proxy.table.flows.values()
    assert isinstance(flow, TcpFlow)
    assert flow.stash and tcpside.NO_STASH == []
    proxy.feed(Side.PRIMARY, pri.synack(), 0.0)  # replays the stash: "first" unmatched
    proxy.feed(Side.PRIMARY, pri.data(10, b"gap"), 0.0)  # out of order
    assert flow.pri.stream.ooo and flow.sec_times
    for shared in (tcpside.NO_TIMES, tcpside.NO_STASH, reassembly._NO_PIECES,
                   reassembly._NO_STARTS):
        assert shared == []


def test_the_parse_knows_which_build_runs_it() -> None:
    """feed_many unpacks with _FAST when interpreted, reads bytes in place when compiled:
    the flag it asks must say which build this module really is."""
    from colo_proxy.core import compiled_modules

    assert (not compiled_modules()["colo_proxy.core.fastparse"]) == fastparse.INTERPRETED
