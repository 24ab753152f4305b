"""Properties: how bytes are cut, ordered or repeated never changes a verdict."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo_proxy.core.config import Config
from colo_proxy.core.events import Side
from colo_proxy.core.proxy import Proxy
from colo_proxy.testing.synth import TcpServerStream
from tests.core.harness import P, Run, S, both_paths, make_proxy, run

pytestmark = pytest.mark.usefixtures(both_paths.__name__)


def cut(st_: TcpServerStream, data: bytes, rng: random.Random, reorder: bool) -> list[bytes]:
    """Random segmentation, optional reordering and duplication."""
    frames = []
    off = 0
    while off < len(data):
        size = rng.randint(1, 1500)
        frames.append(st_.data(off, data[off:off + size]))
        off += size
    if reorder:
        frames += rng.sample(frames, min(len(frames), rng.randint(0, 5)))
        rng.shuffle(frames)
    return frames


COMPARE_ALL = Config(encrypted_flows="compare")
"""For the properties of comparison: a stream whose first bytes look like TLS or SSH
(hypothesis found b"SSH-") would otherwise run as an mc flow, uncompared and held."""

scenario = st.tuples(
    st.binary(min_size=1, max_size=6000),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**31),
    st.booleans(),
    st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(scenario)
def test_resegmenting_reordering_duplicating_never_diverges(
    case: tuple[bytes, int, int, int, bool, bool],
) -> None:
    data, isn_p, isn_s, seed, reorder_p, reorder_s = case
    rng = random.Random(seed)
    p, s = TcpServerStream(isn=isn_p), TcpServerStream(isn=isn_s)
    pri = [(P, f) for f in cut(p, data, rng, reorder_p)]
    sec = [(S, f) for f in cut(s, data, rng, reorder_s)]
    merged = [(P, p.synack()), (S, s.synack())]
    while pri or sec:  # random interleaving of the two sides
        src = pri if (pri and (not sec or rng.random() < 0.5)) else sec
        merged.append(src.pop(0))
    r = run(merged, COMPARE_ALL)
    assert r.divergences == []
    assert r.proxy.held_frames() == 0
    assert len(r.released) == 1 + sum(1 for side, _ in merged[2:] if side is P)


@settings(max_examples=150, deadline=None)
@given(scenario, st.data())
def test_single_flipped_byte_is_found_at_its_offset(
    case: tuple[bytes, int, int, int, bool, bool], draw: st.DataObject,
) -> None:
    data, isn_p, isn_s, seed, reorder_p, reorder_s = case
    flip = draw.draw(st.integers(0, len(data) - 1))
    mask = draw.draw(st.integers(1, 255))
    bad = bytearray(data)
    bad[flip] ^= mask
    rng = random.Random(seed)
    p, s = TcpServerStream(isn=isn_p), TcpServerStream(isn=isn_s)
    pri = cut(p, data, rng, reorder_p)
    sec = cut(s, bytes(bad), rng, reorder_s)
    r = run([(P, p.synack()), (S, s.synack())] + [(P, f) for f in pri] + [(S, f) for f in sec],
            COMPARE_ALL)
    assert r.kinds == [("payload", flip)]
    # No released primary frame carries the flipped offset.
    for frame in r.released[1:]:
        seq = int.from_bytes(frame[38:42], "big")
        start = (seq - isn_p - 1) % 2**32
        assert not start <= flip < start + len(frame) - 54


@settings(max_examples=100, deadline=None)
@given(scenario, st.one_of(st.none(), st.integers(0, 5999)))
def test_fast_path_and_general_path_agree(
    case: tuple[bytes, int, int, int, bool, bool], flip: int | None,
) -> None:
    """Proxy(fast_path=False) sends every frame down the general path; a VLAN tag
    also forces it.  Verdicts, released frames and what stays held are equal."""
    data, isn_p, isn_s, seed, reorder_p, reorder_s = case
    bad = bytearray(data)
    if flip is not None and flip < len(data):
        bad[flip] ^= 0xFF
    outcomes = []
    for fast, vlan in ((True, ()), (False, ()), (True, (7,))):
        rng = random.Random(seed)
        p = TcpServerStream(isn=isn_p, vlan=vlan)
        s = TcpServerStream(isn=isn_s, vlan=vlan)
        pri = [*cut(p, data, rng, reorder_p), p.fin(len(data))]
        sec = [*cut(s, bytes(bad), rng, reorder_s), s.fin(len(data))]
        r = Run(Proxy(Config(), fast_path=fast))
        now = 0.0
        for side, frame in ([(P, p.synack()), (S, s.synack())] + [(P, f) for f in pri]
                            + [(S, f) for f in sec]):
            r.proxy.feed(side, frame, now)
            r.collect()
            now += 0.001
        while now <= 4.0:
            r.proxy.tick(now)
            r.collect()
            now += 0.05
        outcomes.append(
            (r.kinds, [len(f) - 4 * len(vlan) for f in r.released], r.proxy.held_frames())
        )
    assert outcomes[0] == outcomes[1] == outcomes[2]


@settings(max_examples=100, deadline=None)
@given(st.lists(scenario, min_size=1, max_size=3), st.integers(0, 2**31), st.data())
def test_batches_give_the_same_outcome_as_single_frames(
    cases: list[tuple[bytes, int, int, int, bool, bool]], seed: int, draw: st.DataObject,
) -> None:
    """feed_many settles each flow once per batch; where batches end must not matter.

    Several flows (some with a flipped byte) are interleaved, then fed frame by
    frame and in random same-side runs: verdicts, each flow's released frames
    in order, and what stays held are equal.
    """
    rng = random.Random(seed)
    events: list[tuple[Side, bytes]] = []
    for n, (data, isn_p, isn_s, _, reorder_p, reorder_s) in enumerate(cases):
        p = TcpServerStream(isn=isn_p, dport=40000 + n)
        s = TcpServerStream(isn=isn_s, dport=40000 + n)
        bad = bytearray(data)
        if draw.draw(st.booleans()):
            bad[draw.draw(st.integers(0, len(data) - 1))] ^= 0x55
        flow = [(P, p.synack()), (S, s.synack())]
        flow += [(P, f) for f in [*cut(p, data, rng, reorder_p), p.fin(len(data))]]
        flow += [(S, f) for f in [*cut(s, bytes(bad), rng, reorder_s), s.fin(len(data))]]
        at = 0
        for side, frame in flow:  # random interleaving that keeps each flow's own order
            at = rng.randint(at, len(events))
            events.insert(at, (side, frame))
            at += 1
    single = run(events)
    batched = Run(make_proxy(Config()))
    i = 0
    while i < len(events):
        side = events[i][0]
        j = i
        while j < len(events) and events[j][0] is side and j - i < rng.randint(1, 64):
            j += 1
        batched.proxy.feed_many(side, [(f, 0) for _, f in events[i:j]], 0.0)
        batched.collect()
        i = j

    def per_flow(frames: list[bytes]) -> dict[bytes, list[bytes]]:
        out: dict[bytes, list[bytes]] = {}
        for f in frames:
            out.setdefault(f[34:38], []).append(f)  # keyed by the TCP ports
        return out

    assert sorted(single.kinds) == sorted(batched.kinds)
    assert per_flow(single.released) == per_flow(batched.released)
    assert single.proxy.held_frames() == batched.proxy.held_frames()
    for proxy in (single.proxy, batched.proxy):  # the totals agree with the flows
        flows = proxy.table.flows.values()
        stats = proxy.stats()
        assert stats["holding_flows"] == sum(1 for f in flows if f.held_frames)
        assert stats["held_frames"] == sum(f.held_frames for f in flows)
        assert stats["held_bytes"] == sum(f.held_bytes for f in flows)
