"""Release follows stream offsets: a lossy guest's recovery never deadlocks.

A simulated TCP sender per guest (retransmission timeout with back-off,
congestion window back to one segment after it, cumulative ACKs from the
client) runs through random losses before the proxy.  The client receives
only what the proxy releases and acknowledges what it got; both guests see
the client's ACKs, as in COLO.  Every byte must reach the client, with no
divergence and no timeout, whatever was lost on either side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo_proxy.core.config import Config
from colo_proxy.core.proxy import Proxy
from colo_proxy.testing.synth import TcpServerStream
from tests.core.harness import P, S

MSS = 100
SEGMENTS = 40
DATA = bytes((i * 7 + i // 100) % 256 for i in range(MSS * SEGMENTS))
TICK = 0.001


@dataclass
class Sender:
    """Just enough of a TCP sender: slow start, RTO with back-off, go-back-N after it."""

    stream: TcpServerStream
    losses: set[int]
    una: int = 0
    nxt: int = 0
    cwnd: int = 2
    rto: float = 0.2
    timer: float | None = None
    sent: int = 0

    def on_ack(self, acked: int, now: float) -> None:
        if acked > self.una:
            self.una = acked
            self.cwnd = min(self.cwnd + 1, 10)
            self.rto = 0.2
            self.timer = now + self.rto if self.una < len(DATA) else None

    def output(self, now: float) -> list[bytes]:
        if self.timer is not None and now >= self.timer:  # timeout: back to one segment
            self.nxt = self.una
            self.cwnd = 1
            self.rto = min(self.rto * 2, 1.0)
            self.timer = now + self.rto
        out = []
        while self.nxt < len(DATA) and self.nxt - self.una < self.cwnd * MSS:
            frame = self.stream.data(self.nxt, DATA[self.nxt:self.nxt + MSS])
            self.nxt += MSS
            if self.timer is None:
                self.timer = now + self.rto
            if self.sent not in self.losses:  # lost before the proxy: never fed
                out.append(frame)
            self.sent += 1
        return out


@dataclass
class Client:
    """Receives released frames; ACKs the contiguous bytes it holds."""

    isn: int
    got: dict[int, bytes] = field(default_factory=dict)
    nxt: int = 0

    def receive(self, frame: bytes) -> None:
        if frame[47] & 0x02:  # the SYN-ACK: nothing to reassemble
            return
        seq = int.from_bytes(frame[38:42], "big")
        payload = frame[54:]
        if payload:
            self.got.setdefault((seq - self.isn - 1) % 2**32, payload)
        while self.nxt in self.got:
            self.nxt += len(self.got[self.nxt])


losses = st.sets(st.integers(0, 80), max_size=10)


@settings(max_examples=60, deadline=None)
@given(losses, losses, st.integers(0, 2**32 - 1), st.integers(2**20, 2**32 - 2**20))
def test_lossy_senders_deliver_everything_without_timeouts(
    lost_p: set[int], lost_s: set[int], isn_p: int, delta: int,
) -> None:
    """ISNs a realistic distance apart: a secondary whose first data segment is lost is
    numbered by whichever ISN puts it nearer offset 0 (the rewriter check), which two
    ISNs a few segments apart would make ambiguous."""
    isn_s = (isn_p + delta) % 2**32
    proxy = Proxy(Config())
    pri = Sender(TcpServerStream(isn=isn_p), lost_p)
    sec = Sender(TcpServerStream(isn=isn_s), lost_s)
    client = Client(isn_p)
    proxy.feed(P, pri.stream.synack(), 0.0)
    proxy.feed(S, sec.stream.synack(), 0.0)
    now = 0.0
    divergences, requests = [], []
    while client.nxt < len(DATA) and now < 60:
        now += TICK
        proxy.feed_many(P, [(f, 0) for f in pri.output(now)], now)
        proxy.feed_many(S, [(f, 0) for f in sec.output(now)], now)
        proxy.tick(now)
        out = proxy.take_output()
        for data, offset in out.released:
            client.receive(data[offset:])
        divergences += out.divergences
        requests += out.requests
        pri.on_ack(client.nxt, now)
        sec.on_ack(client.nxt, now)
    assert divergences == []
    assert requests == []
    assert client.nxt == len(DATA), f"stalled at {client.nxt} of {len(DATA)} after {now:.1f} s"
    assert b"".join(client.got[o] for o in sorted(client.got)) == DATA


def test_a_retransmission_behind_matched_segments_goes_out() -> None:
    """The issue's case: segments 3-5 lost, 6-9 matched and waiting, 3 retransmitted."""
    proxy = Proxy(Config())
    p, s = TcpServerStream(isn=100), TcpServerStream(isn=9000)
    proxy.feed(P, p.synack(), 0.0)
    proxy.feed(S, s.synack(), 0.0)
    for i in range(10):
        proxy.feed(S, s.data(i * MSS, DATA[i * MSS:(i + 1) * MSS]), 0.01)
    for i in (0, 1, 2, 6, 7, 8, 9):
        proxy.feed(P, p.data(i * MSS, DATA[i * MSS:(i + 1) * MSS]), 0.02)
    out = proxy.take_output()
    assert len(out.released) == 4  # the SYN-ACK and segments 0-2
    divergences = out.divergences
    proxy.feed(P, p.data(3 * MSS, DATA[3 * MSS:4 * MSS]), 0.5)
    out = proxy.take_output()
    (retx,) = out.released
    divergences += out.divergences
    assert int.from_bytes(retx[0][38:42], "big") == (100 + 1 + 3 * MSS) % 2**32
    proxy.feed(P, p.data(4 * MSS, DATA[4 * MSS:6 * MSS]), 0.6)
    out = proxy.take_output()
    assert len(out.released) == 5  # 4-5, then 6-9 that waited for them
    divergences += out.divergences
    assert proxy.held_frames() == 0 and divergences == []


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
def test_a_retransmission_below_the_agreed_offset_goes_out(fast: bool) -> None:
    """Primary A, C, D; secondary A, C; primary B; secondary B (B and C go out); then the
    primary resends B and C (the client lost them): both must go out again, D still waiting.

    Found by the bridge's ring-overflow runs: the out-of-order scan was skipped because
    nothing it depended on (agreed offset, the secondary's ACK) had changed, though the
    queue had new entries.
    """
    p, s = TcpServerStream(isn=100), TcpServerStream(isn=90000)
    a, b, c, d = (bytes([65 + i]) * MSS for i in range(4))
    proxy = Proxy(Config(), fast_path=fast)
    released: list[bytes] = []
    now = 0.0

    def feed(side: object, frame: bytes) -> None:
        nonlocal now
        now += TICK
        proxy.feed(side, frame, now)  # type: ignore[arg-type]
        released.extend(x[o:] for x, o in proxy.take_output().released)

    feed(P, p.synack())
    feed(S, s.synack())
    data = dict(zip("ABCD", (a, b, c, d), strict=True))
    pri = {k: p.data(i * MSS, v) for i, (k, v) in enumerate(data.items())}
    sec = {k: s.data(i * MSS, v) for i, (k, v) in enumerate(data.items())}
    for frame in (pri["A"], pri["C"], pri["D"], sec["A"], sec["C"], pri["B"], sec["B"]):
        feed(P if frame in pri.values() else S, frame)
    assert sorted(released[1:]) == sorted([pri["A"], pri["B"], pri["C"]])
    again_b = p.data(MSS, b, ident=7)
    again_c = p.data(2 * MSS, c, ident=8)
    feed(P, again_b)
    feed(P, again_c)
    assert released[4:] == [again_b, again_c]
    assert pri["D"] not in released
