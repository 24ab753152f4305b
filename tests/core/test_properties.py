"""Properties: how bytes are cut, ordered or repeated never changes a verdict."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from colo_proxy.synth import TcpServerStream
from tests.core.harness import P, S, run


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
    r = run(merged)
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
    r = run([(P, p.synack()), (S, s.synack())] + [(P, f) for f in pri] + [(S, f) for f in sec])
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
    """Untagged IPv4 takes the fast path; a VLAN tag forces the general one."""
    data, isn_p, isn_s, seed, reorder_p, reorder_s = case
    bad = bytearray(data)
    if flip is not None and flip < len(data):
        bad[flip] ^= 0xFF
    outcomes = []
    for vlan in ((), (7,)):
        rng = random.Random(seed)
        p = TcpServerStream(isn=isn_p, vlan=vlan)
        s = TcpServerStream(isn=isn_s, vlan=vlan)
        pri = [*cut(p, data, rng, reorder_p), p.fin(len(data))]
        sec = [*cut(s, bytes(bad), rng, reorder_s), s.fin(len(data))]
        r = run([(P, p.synack()), (S, s.synack())] + [(P, f) for f in pri]
                + [(S, f) for f in sec], end_time=4.0)
        outcomes.append(
            (r.kinds, [len(f) - 4 * len(vlan) for f in r.released], r.proxy.held_frames())
        )
    assert outcomes[0] == outcomes[1]
