"""Property: no primary byte is released before its flow's rule allows it.

Random rule sets over a few ports, random connections whose secondary copy
agrees or not, random interleavings and checkpoints.  The oracle is written
here, independently of the core: a frame released outside a checkpoint must
belong to a passthrough flow, or to a compared flow whose secondary already
sent the same bytes at the same offsets; an mc flow's frames go out only at
checkpoints.  The core may be stricter (cool-downs, the VM in MC, an early
notice), never looser.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo_proxy.core.config import Config
from colo_proxy.core.rules import FlowRule
from colo_proxy.testing.synth import TcpServerStream
from tests.core.harness import P, S, both_paths, make_proxy

pytestmark = pytest.mark.usefixtures(both_paths.__name__)

PORTS = (80, 443, 8080, 9000)
MODES = ("compare", "mc", "mask", "passthrough")
TLS = b"\x16\x03\x03\x00\x20"

rules_st = st.lists(
    st.tuples(st.sampled_from(MODES), st.one_of(st.none(), st.sampled_from(PORTS))),
    max_size=4,
)
conn_st = st.tuples(
    st.sampled_from(PORTS),
    st.binary(min_size=1, max_size=300),
    st.one_of(st.none(), st.integers(0, 299)),  # a flipped byte in the secondary's copy
    st.booleans(),  # TLS-looking first bytes
    st.sampled_from([50, 100, 1000]),
)


def rule_class(rules: list[tuple[str, int | None]], port: int) -> str:
    for mode, rport in rules:
        if rport is None or rport == port:
            return mode
    return "compare"


@settings(max_examples=120, deadline=None)
@given(rules=rules_st, conns=st.lists(conn_st, min_size=1, max_size=5),
       order=st.randoms(use_true_random=False),
       burst=st.integers(1, 3), mode=st.sampled_from(["auto", "colo", "mc"]))
def test_nothing_is_released_before_its_rule_allows(
    rules: list[tuple[str, int | None]], conns: list[tuple[int, bytes, int | None, bool, int]],
    order: object, burst: int, mode: str,
) -> None:
    import random
    assert isinstance(order, random.Random)
    cfg = Config(flow_rules=tuple(FlowRule(m, port=p) for m, p in rules),
                 checkpoint_burst=burst, min_checkpoint_interval=0.05, mode=mode,
                 flow_divergence_limit=2)
    proxy = make_proxy(cfg)
    pri_data: dict[int, bytes] = {}
    sec_data: dict[int, bytes] = {}
    sec_sent: dict[int, int] = {}
    klass: dict[int, str] = {}
    queues: list[list[tuple[str, int, bytes, int]]] = []
    for i, (port, payload, flip, tls, seg) in enumerate(conns):
        cport = 40000 + i
        data = (TLS + payload) if tls else payload
        sec = bytearray(data)
        if flip is not None and flip < len(sec):
            sec[flip] ^= 0x41
        pri_data[cport], sec_data[cport], sec_sent[cport] = data, bytes(sec), 0
        klass[cport] = rule_class(rules, port)
        p = TcpServerStream(sport=port, dport=cport, isn=1000 + i)
        s = TcpServerStream(sport=port, dport=cport, isn=777777 + i)
        pq = [("P", cport, p.synack(), 0)] + [
            ("P", cport, p.data(o, data[o:o + seg]), o + len(data[o:o + seg]))
            for o in range(0, len(data), seg)]
        sq = [("S", cport, s.synack(), 0)] + [
            ("S", cport, s.data(o, bytes(sec[o:o + seg])), o + len(sec[o:o + seg]))
            for o in range(0, len(sec), seg)]
        queues += [pq, sq]
    now = 0.0
    while any(queues):
        q = order.choice([q for q in queues if q])
        side, cport, frame, upto = q.pop(0)
        now += 0.01
        if side == "S":
            sec_sent[cport] = max(sec_sent[cport], upto)
        proxy.feed(P if side == "P" else S, frame, now)
        out = proxy.take_output()
        for data, offset in out.released:
            check_release(data[offset:], klass, pri_data, sec_data, sec_sent)
        if out.requests and order.random() < 0.7:
            proxy.checkpoint_started(now)
            proxy.checkpoint_done(now + 0.001)  # releases anything: allowed
            proxy.take_output()
        proxy.tick(now)
        for data, offset in proxy.take_output().released:
            check_release(data[offset:], klass, pri_data, sec_data, sec_sent)


def check_release(frame: bytes, klass: dict[int, str], pri: dict[int, bytes],
                  sec: dict[int, bytes], sent: dict[int, int]) -> None:
    """A frame released outside a checkpoint: its rule must allow it now."""
    cport = struct.unpack_from("!H", frame, 36)[0]
    flags = frame[47]
    plen = len(frame) - 34 - (frame[46] >> 4) * 4
    mode = klass[cport]
    if mode == "passthrough" or flags & 0x02:
        return  # passthrough; a SYN-ACK (the handshake is compared separately)
    assert mode != "mc", f"mc flow {cport} released outside a checkpoint"
    seq = struct.unpack_from("!I", frame, 38)[0]
    isn = 1000 + cport - 40000
    off = (seq - isn - 1) % 2**32
    assert off + plen <= sent[cport], "released before the secondary sent it"
    assert pri[cport][off:off + plen] == sec[cport][off:off + plen], "released differing bytes"
