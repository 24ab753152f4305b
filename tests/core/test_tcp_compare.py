"""Table-driven TCP comparison cases, each at several ISNs (wraparound included)."""

from __future__ import annotations

import random

import pytest

from colo_proxy.core.config import Config
from colo_proxy.core.packet import TCP_ACK, TCP_RST
from colo_proxy.core.tcp import TcpFlow
from colo_proxy.testing.synth import TcpServerStream, ipv4_frame, tcp_segment
from tests.core.harness import C, P, S, both_paths, make_proxy, run

pytestmark = pytest.mark.usefixtures(both_paths.__name__)

ISNS = [0, 1, 2**32 - 1, 2**32 - 11, 123456789]
PAYLOAD = random.Random(3).randbytes(30000)


def segments(st: TcpServerStream, data: bytes, size: int, start: int = 0) -> list[bytes]:
    return [st.data(start + o, data[o:o + size]) for o in range(0, len(data), size)]


def pair(isn: int, delta: int = 77777) -> tuple[TcpServerStream, TcpServerStream]:
    return TcpServerStream(isn=isn), TcpServerStream(isn=(isn + delta) % 2**32)


@pytest.mark.parametrize("isn", ISNS)
def test_same_bytes_different_segmentation_and_isn_agree(isn: int) -> None:
    p, s = pair(isn)
    pri = [p.synack(), *segments(p, PAYLOAD, 1448), p.fin(len(PAYLOAD))]
    sec = [s.synack(), *segments(s, PAYLOAD, 536), s.fin(len(PAYLOAD))]
    r = run([(P, f) for f in pri] + [(S, f) for f in sec])
    assert r.divergences == []
    assert r.released == pri
    assert r.proxy.held_frames() == 0


@pytest.mark.parametrize("isn", ISNS)
@pytest.mark.parametrize("flip", [0, 1, 1447, 1448, 20000, 29999])
def test_flipped_byte_found_at_exact_offset(isn: int, flip: int) -> None:
    p, s = pair(isn)
    bad = bytearray(PAYLOAD)
    bad[flip] ^= 0x5A
    pri = [p.synack(), *segments(p, PAYLOAD, 1448)]
    sec = [s.synack(), *segments(s, bytes(bad), 1000)]
    r = run([(P, f) for f in pri] + [(S, f) for f in sec])
    assert r.kinds == [("payload", flip)]
    assert [q.reason.value for q in r.requests] == ["divergence"]
    # Frames wholly before the flipped byte went out; none at or after it did.
    released_bytes = sum(len(f) - 54 for f in r.released[1:])
    assert released_bytes == (flip // 1448) * 1448
    assert r.divergences[0].primary[0] == PAYLOAD[flip]
    assert r.divergences[0].secondary[0] == bad[flip]


def test_nothing_released_before_secondary_catches_up() -> None:
    p, s = pair(5)
    pri = [p.synack(), *segments(p, PAYLOAD[:5000], 1000)]
    sec = [s.synack(), *segments(s, PAYLOAD[:2500], 500)]
    r = run([(P, f) for f in pri] + [(S, f) for f in sec])
    assert r.released == pri[:3]  # SYN-ACK and the two frames covering bytes 0..2000
    assert r.proxy.held_frames() == 3


def test_ack_gate_holds_until_secondary_acks() -> None:
    p, s = pair(9)
    r = run([
        (P, p.synack()), (S, s.synack()),
        (P, p.data(0, b"hello", ack_offset=100)),
        (S, s.data(0, b"hello", ack_offset=40)),
    ])
    assert len(r.released) == 1  # the SYN-ACK only: the primary acked more
    r.proxy.feed(S, s.ack(5, 100), 1.0)
    r.collect()
    assert len(r.released) == 2
    assert r.divergences == []


def test_ack_gate_timeout_reports_kind_ack() -> None:
    p, s = pair(9)
    r = run([
        (P, p.synack()), (S, s.synack()),
        (P, p.data(0, b"hello", ack_offset=100)),
        (S, s.data(0, b"hello", ack_offset=40)),
    ], end_time=4.0)
    assert r.kinds == [("ack", 0)]
    assert [q.reason.value for q in r.requests] == ["timeout"]


def test_handshake_option_mismatch() -> None:
    p, s = pair(1)
    r = run([(P, p.synack(wscale=7)), (S, s.synack(wscale=9))])
    assert r.kinds == [("handshake", 0)]
    assert "wscale 7 vs 9" in r.divergences[0].detail
    assert r.released == []


def test_timestamp_values_and_window_are_not_compared() -> None:
    p, s = pair(1)
    pri = [p.synack(), p.data(0, b"x" * 100)]
    sec = [s.synack(), s.data(0, b"x" * 100)]
    sec[1] = sec[1][:48] + b"\x10\x00" + sec[1][50:]  # different TCP window
    r = run([(P, f) for f in pri] + [(S, f) for f in sec])
    assert r.divergences == [] and len(r.released) == 2


def test_fin_versus_rst_is_a_close_divergence() -> None:
    p, s = pair(1)
    rst = s.data(100, b"", flags=TCP_RST)
    r = run([(P, p.synack()), (S, s.synack()), (P, p.data(0, b"a" * 100)),
             (S, s.data(0, b"a" * 100)), (P, p.fin(100)), (S, rst)])
    assert r.kinds == [("close", 100)]
    assert len(r.released) == 2  # the FIN stays held


def test_fin_matched_releases_fin() -> None:
    p, s = pair(1)
    r = run([(P, p.synack()), (S, s.synack()), (P, p.data(0, b"a" * 100)),
             (P, p.fin(100)), (S, s.data(0, b"a" * 100)), (S, s.fin(100))])
    assert r.divergences == [] and len(r.released) == 3


def test_secondary_sends_more_before_fin_is_length() -> None:
    p, s = pair(1)
    r = run([(P, p.synack()), (S, s.synack()), (P, p.data(0, b"a" * 100)), (P, p.fin(100)),
             (S, s.data(0, b"a" * 150))])
    assert r.kinds == [("length", 100)]


def test_secondary_silent_times_out_once() -> None:
    p, _ = pair(1)
    r = run([(P, p.synack()), (P, p.data(0, b"z" * 10))], end_time=5.0, auto_checkpoint=False)
    assert r.kinds == [("timeout", 0)]
    assert [q.reason.value for q in r.requests] == ["timeout"]
    assert 3.0 < r.requests[0].time <= 3.2


@pytest.mark.parametrize("primary_synack", [True, False])
def test_primary_silent_times_out_on_the_secondarys_output(primary_synack: bool) -> None:
    """Unmatched secondary bytes (buffered, or stashed before the primary's ISN) time out."""
    p, s = pair(1)
    events = [(P, p.synack())] if primary_synack else []
    events += [(S, s.synack()), (S, s.data(0, b"q" * 10))]
    r = run(events, end_time=5.0)
    assert [(d.kind.value, d.detail) for d in r.divergences] == [
        ("timeout", "secondary output unmatched")
    ]
    assert 3.0 < r.requests[0].time <= 3.2


def test_checkpoint_releases_held_and_rebases_onto_primary() -> None:
    p, s = pair(1000)
    bad = bytearray(PAYLOAD[:4000])
    bad[10] ^= 1
    r = run([(P, p.synack()), (S, s.synack()), (P, p.data(0, PAYLOAD[:4000])),
             (S, s.data(0, bytes(bad)))])
    assert r.kinds == [("payload", 10)]
    r.proxy.checkpoint_started(1.0)
    r.proxy.checkpoint_done(1.2)
    r.collect()
    assert len(r.released) == 2 and r.proxy.held_frames() == 0
    # After the checkpoint the secondary speaks with the primary's sequence numbers.
    s_after = TcpServerStream(isn=p.isn)
    r.proxy.feed(P, p.data(4000, PAYLOAD[4000:6000]), 2.0)
    r.proxy.feed(S, s_after.data(4000, PAYLOAD[4000:6000]), 2.0)
    r.collect()
    assert len(r.released) == 3 and len(r.divergences) == 1


def test_reordered_and_duplicated_segments_agree() -> None:
    p, s = pair(2**32 - 3)
    pri = [p.synack(), *segments(p, PAYLOAD, 1448)]
    sec_segs = segments(s, PAYLOAD, 700)
    rng = random.Random(5)
    sec_segs = sec_segs + rng.sample(sec_segs, 10)
    rng.shuffle(sec_segs)
    r = run([(P, f) for f in pri] + [(S, s.synack())] + [(S, f) for f in sec_segs])
    assert r.divergences == [] and r.released == pri


def test_midstream_pickup_assumes_shared_sequence_space() -> None:
    p = TcpServerStream(isn=42)
    r = run([(P, p.data(5000, b"q" * 300)), (S, p.data(5000, b"q" * 300))])
    assert r.divergences == [] and len(r.released) == 1


def test_hold_limit_forces_checkpoint() -> None:
    p, _ = pair(1)
    cfg = Config(max_hold_bytes=10_000)
    r = run([(P, p.synack()), *((P, f) for f in segments(p, PAYLOAD[:20000], 1448))], cfg)
    assert [q.reason.value for q in r.requests] == ["hold_limit"]
    assert r.proxy.counters["hold_limit_hits"] == 1


def test_checkpoints_are_rate_limited() -> None:
    flows = [TcpServerStream(dport=d) for d in (1, 2)]
    cfg = Config(min_checkpoint_interval=0.5)
    r = run([(P, flows[0].data(0, b"a")), (S, flows[0].data(0, b"b"))], cfg)
    r.proxy.checkpoint_started(0.01)
    r.proxy.checkpoint_done(0.02)
    r.proxy.feed(P, flows[1].data(0, b"a"), 0.1)
    r.proxy.feed(S, flows[1].data(0, b"c"), 0.1)
    r.collect()
    assert len(r.requests) == 1 and r.proxy.state.value == "deferred"
    r.proxy.tick(0.3)
    r.collect()
    assert len(r.requests) == 1
    r.proxy.tick(0.52)
    r.collect()
    assert [q.time for q in r.requests][1] == pytest.approx(0.52)


def test_divergence_during_checkpoint_asks_again_afterwards() -> None:
    a, b = TcpServerStream(dport=1), TcpServerStream(dport=2)
    r = run([(P, a.data(0, b"a")), (S, a.data(0, b"b"))], Config(min_checkpoint_interval=0))
    r.proxy.checkpoint_started(0.1)
    r.proxy.feed(P, b.data(0, b"a"), 0.15)
    r.proxy.feed(S, b.data(0, b"c"), 0.15)
    r.collect()
    assert len(r.requests) == 1
    r.proxy.checkpoint_done(0.2)
    r.collect()
    assert len(r.requests) == 2 and r.requests[1].time == 0.2


def test_vlan_separates_flows() -> None:
    from colo_proxy.testing.synth import ipv4_frame, tcp_segment

    def frame(vlan: tuple[int, ...], payload: bytes) -> bytes:
        seg = tcp_segment(80, 1000, 11, 21, 0x18, payload)
        return ipv4_frame(bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2)), 6, seg, vlan=vlan)

    r = run([(P, frame((10,), b"aa")), (S, frame((20,), b"aa")), (S, frame((10, 5), b"aa"))])
    assert r.released == [] and r.proxy.stats()["flows"] == 3
    r.proxy.feed(S, frame((10,), b"aa"), 1.0)
    r.collect()
    assert len(r.released) == 1


def test_overlap_with_different_bytes_within_one_side_is_reported() -> None:
    p, s = pair(1)
    r = run([(P, p.synack()), (S, s.synack()), (P, p.data(0, b"a" * 100)),
             (P, p.data(50, b"b" * 100)), (S, s.data(0, b"a" * 150))])
    conflicts = r.proxy.overlap_conflicts
    assert [(c.side, c.offset) for c in conflicts] == [("primary", 50)]
    # The first copy was compared: the secondary's "a"s at 50..100 match it, then
    # bytes 100..150 differ ("b" from the primary's second segment vs "a").
    assert r.kinds == [("payload", 100)]


def test_secondary_running_far_ahead_forces_a_checkpoint() -> None:
    p, s = pair(1)
    cfg = Config(max_sec_buffer_bytes=5000)
    r = run([(P, p.synack()), (S, s.synack()), *((S, f) for f in segments(s, PAYLOAD, 1000))],
            cfg)
    assert [q.reason.value for q in r.requests] == ["hold_limit"]
    assert r.proxy.counters["secondary_buffer_limit_hits"] >= 1


@pytest.mark.parametrize("isn", ISNS)
def test_one_wild_sequence_number_does_not_shift_later_segments(isn: int) -> None:
    p, s = pair(isn)
    wild = p.data(2**31 + 12345, b"?" * 10)
    pri = [p.synack(), p.data(0, PAYLOAD[:1000]), wild, p.data(1000, PAYLOAD[1000:2000])]
    sec = [s.synack(), s.data(0, PAYLOAD[:2000])]
    r = run([(P, f) for f in pri] + [(S, f) for f in sec])
    assert r.divergences == []
    assert pri[3] in r.released and pri[1] in r.released


@pytest.mark.parametrize("isn", ISNS)
@pytest.mark.parametrize("secondary_first", [False, True])
def test_secondary_renumbered_by_filter_rewriter(isn: int, secondary_first: bool) -> None:
    """filter-rewriter keeps the secondary's SYN-ACK ISN but renumbers later segments."""
    p, s_own = pair(isn, delta=987654321)
    s_rewritten = TcpServerStream(isn=p.isn)  # data segments in the primary's space
    pri = [(P, p.synack()), *((P, f) for f in segments(p, PAYLOAD[:6000], 1448)),
           (P, p.fin(6000))]
    sec = [(S, s_own.synack()), *((S, f) for f in segments(s_rewritten, PAYLOAD[:6000], 1000)),
           (S, s_rewritten.fin(6000))]
    r = run(sec + pri if secondary_first else pri + sec)
    assert r.divergences == []
    assert r.released == [f for _, f in pri]
    assert r.proxy.counters["tcp_secondary_in_primary_sequence_space"] == 1


def test_rewritten_space_still_finds_a_flipped_byte() -> None:
    p, s_own = pair(5, delta=1 << 30)
    s_rewritten = TcpServerStream(isn=p.isn)
    bad = bytearray(PAYLOAD[:5000])
    bad[4321] ^= 2
    r = run([(S, s_own.synack()), *((S, f) for f in segments(s_rewritten, bytes(bad), 700)),
             (P, p.synack()), *((P, f) for f in segments(p, PAYLOAD[:5000], 1448))])
    assert r.kinds == [("payload", 4321)]


@pytest.mark.parametrize("primary_first", [True, False])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_long_queues_release_in_order_across_compactions(primary_first: bool, seed: int) -> None:
    """Hundreds of held frames (or unmatched secondary segments) leave a run at a time.

    The queue and the secondary's arrival times are lists with a head index
    that are compacted past 64 entries; whichever side runs ahead, every
    primary frame comes out once, in order, and the totals return to zero.
    """
    rng = random.Random(seed)
    p, s = pair(seed * 1000)
    chunk = 7
    pf = [(P, f) for f in segments(p, PAYLOAD[:700 * chunk], chunk)]
    sf = [(S, f) for f in segments(s, PAYLOAD[:700 * chunk], chunk)]
    ahead, behind = (pf, sf) if primary_first else (sf, pf)
    proxy = make_proxy(Config(max_hold_frames=10**6))
    proxy.feed_many(P, [(p.synack(), 0)], 0.0)
    proxy.feed_many(S, [(s.synack(), 0)], 0.0)
    out = proxy.take_output()
    released = [d[o:] for d, o in out.released]
    divergences = out.divergences
    proxy.feed_many(ahead[0][0], [(f, 0) for _, f in ahead], 0.0)
    i = 0
    while i < len(behind):
        n = rng.choice([1, 1, 2, 3, 50, 120])
        proxy.feed_many(behind[0][0], [(f, 0) for _, f in behind[i:i + n]], 0.0)
        out = proxy.take_output()
        released += [d[o:] for d, o in out.released]
        divergences += out.divergences
        i += n
        flow = next(iter(proxy.table.flows.values()))
        if isinstance(flow, TcpFlow) and flow.sec_times:  # the oldest time kept is unmatched
            assert flow.sec_times[flow.th][0] > flow.pri.stream.base
    assert released == [p.synack()] + [f for _, f in pf]
    assert divergences + proxy.take_output().divergences == []
    stats = proxy.stats()
    assert (stats["held_frames"], stats["held_bytes"], stats["holding_flows"]) == (0, 0, 0)
    assert not proxy.busy()


def test_the_scan_watches_only_flows_that_owe_output() -> None:
    """Timeouts check watched flows; finished flows leave the watch list, and the
    slower sweep re-watches a flow a hook missed, so its timeout is late, not lost."""
    flows = [pair(i * 7919) for i in range(20)]
    proxy = make_proxy(Config())
    for p, s in flows:
        p.dport = s.dport = 40000 + len(proxy.table.flows)
        for side, f in ((P, p.synack()), (S, s.synack()), (P, p.data(0, b"ok")),
                        (S, s.data(0, b"ok"))):
            proxy.feed(side, f, 0.0)
    proxy.tick(0.2)
    assert proxy.table.watch == {} and len(proxy.table.flows) == 20  # nothing owed, nothing watched
    p, _ = flows[0]
    proxy.feed(P, p.data(2, b"held"), 0.3)
    assert list(proxy.table.watch) == [proxy.table.flows[next(iter(proxy.table.flows))]]
    proxy.table.watch.clear()  # as if a hook had been missed
    now = 0.3
    while not proxy.take_output().divergences:
        now += 0.1
        proxy.tick(now)
        assert now < 6.0, "the timeout was lost"
    assert now > 3.3


SLOW_SWEEP = Config(flow_idle_timeout=1000.0, closed_flow_timeout=1000.0)
"""The slow sweep (which would re-watch any flow owing output) runs only every 100 s."""


@pytest.mark.parametrize(("case", "detail"), [
    ("primary SYN-ACK held", "primary output unmatched"),
    ("primary data held", "primary output unmatched"),
    ("secondary data buffered", "secondary output unmatched"),
    ("secondary data stashed", "secondary output unmatched"),
    ("secondary data out of order", "secondary output unmatched"),
])
def test_each_way_of_owing_output_is_watched_at_once(case: str, detail: str) -> None:
    """Each hook that starts watching a flow, checked alone: the output arrives after a
    scan found the flow owing nothing, and still times out on time."""
    p, s = pair(5)
    events = {
        "primary SYN-ACK held": [(P, p.synack())],
        "primary data held": [(P, p.synack()), (S, s.synack()), (P, p.data(0, b"x"))],
        "secondary data buffered": [(P, p.synack()), (S, s.synack()), (S, s.data(0, b"x"))],
        "secondary data stashed": [(S, s.synack()), (S, s.data(0, b"x"))],
        "secondary data out of order": [(P, p.synack()), (S, s.synack()), (S, s.data(5, b"x"))],
    }[case]
    step = 0.25  # a scan between any two events; the first one also sweeps
    r = run([(C, p.synack()), *events], config=SLOW_SWEEP, step=step, end_time=5.0)
    arrival = step * len(events)
    assert [(d.kind.value, d.detail) for d in r.divergences] == [("timeout", detail)]
    assert arrival + 3.0 < r.requests[0].time <= arrival + 3.3


@pytest.mark.parametrize("refused_by", ["secondary", "primary"])
def test_rst_answering_a_syn_is_a_divergence_at_once(refused_by: str) -> None:
    """One guest accepts the connection, the other refuses it: no 3 s wait for a timeout."""
    p, s = pair(7)
    refuser = s if refused_by == "secondary" else p
    rst = ipv4_frame(refuser.src, refuser.dst, 6, tcp_segment(
        refuser.sport, refuser.dport, 0, refuser.client_isn + 1, TCP_RST | TCP_ACK))
    accept = p.synack() if refused_by == "secondary" else s.synack()
    events = [(P, accept), (S, rst)] if refused_by == "secondary" else [(S, accept), (P, rst)]
    r = run(events)
    assert [(d.kind.value, d.offset) for d in r.divergences] == [("close", 0)]
    assert f"{refused_by} answered the SYN with RST" in r.divergences[0].detail
    assert r.requests and r.requests[0].time < 0.01


def test_primary_bytes_for_a_silent_secondary_stay_bounded_across_checkpoints() -> None:
    """A secondary that never sends its copy: the primary's bytes are not kept for ever."""
    cfg = Config(max_sec_buffer_bytes=10_000, secondary_after_checkpoint="continues")
    proxy = make_proxy(cfg)
    p, s = pair(3)
    proxy.feed(P, p.synack(), 0.0)
    proxy.feed(S, s.synack(), 0.0)
    for i in range(50):
        proxy.feed(P, p.data(i * 1000, bytes(1000)), 0.01 * i)
        if i % 10 == 9:
            proxy.checkpoint_started(0.01 * i)
            proxy.checkpoint_done(0.01 * i)
    flow = next(iter(proxy.table.flows.values()))
    assert isinstance(flow, TcpFlow) and flow.pri.stream.buffered <= 10_000
    assert proxy.stats()["tcp_bytes_left_uncompared_over_limit"] == 40_000
