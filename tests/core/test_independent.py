"""Two independent recordings of the same servers: what replay must conclude.

Each side has its own ISNs, segmentation and clock; after a simulated
checkpoint the recorded secondary goes on in its own sequence space.  A
region that differs is reported once, at its first differing byte, and
nothing else is.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from colo_proxy.core.config import Config
from colo_proxy.drivers.pcap import PcapWriter
from colo_proxy.drivers.replay import Replay, ReplayResult
from colo_proxy.synth import TcpServerStream

GUEST, CLIENT = bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2))
REQUEST = b"GET /file HTTP/1.1\r\nHost: guest\r\n\r\n"


def recording(data: list[bytes], isn: int, client_isn: int, t0: float, rng: random.Random,
              ports: tuple[int, ...]) -> list[tuple[float, bytes]]:
    """One side's capture: per connection (one every 0.5 s) a request in, a SYN-ACK, the
    connection's data cut at random and sent over up to 0.2 s, then a FIN."""
    frames: list[tuple[float, bytes]] = []
    for n, (port, body) in enumerate(zip(ports, data, strict=True)):
        t = t0 + 0.5 * n
        srv = TcpServerStream(isn=(isn + n * 7919) % 2**32, client_isn=client_isn, dport=port)
        cli = TcpServerStream(src=CLIENT, dst=GUEST, sport=port, dport=80, isn=client_isn,
                              client_isn=srv.isn)
        frames.append((t, srv.synack()))
        frames.append((t + 0.001, cli.data(0, REQUEST)))
        t += 0.002
        off = 0
        while off < len(body):
            size = rng.randint(1, 1460)
            t += rng.uniform(0.0001, 0.2 * min(size, len(body) - off) / len(body))
            frames.append((t, srv.data(off, body[off:off + size], len(REQUEST))))
            off += size
        frames.append((t + 0.001, srv.fin(len(body), len(REQUEST))))
    return frames


def write(path: Path, frames: list[tuple[float, bytes]]) -> str:
    w = PcapWriter(path)
    for ts, f in sorted(frames, key=lambda x: x[0]):
        w.write(ts, f)
    w.close()
    return str(path)


def replay(pri: list[tuple[float, bytes]], sec: list[tuple[float, bytes]], latency: float,
           config: Config | None = None) -> ReplayResult:
    with tempfile.TemporaryDirectory() as tmp:
        p = write(Path(tmp) / "p.pcap", pri)
        s = write(Path(tmp) / "s.pcap", sec)
        return Replay(config or Config(), latency).run(p, s, GUEST)


@settings(max_examples=100, deadline=None)
@given(
    st.binary(min_size=64, max_size=8000),
    st.data(),
    st.integers(0, 2**32 - 1), st.integers(2**20, 2**32 - 2**20),
    st.sampled_from([-60.0, -5.0, -2.5, 0.0, 0.7, 2.5, 5.0, 60.0]),
    st.sampled_from([0.0, 0.02, 0.3]),
    st.integers(0, 2**31),
    st.integers(0, 2),
)
def test_one_flipped_region_is_one_divergence_at_its_first_byte(
    data: bytes, draw: st.DataObject, isn_p: int, delta: int, offset: float, latency: float,
    seed: int, which: int,
) -> None:
    """Any segmentation, ISNs, clock offset and checkpoint latency: one divergence, at the flip.

    Independent servers pick unrelated ISNs; two within a MiB of each other would look like
    one sequence space (a pair behind QEMU's rewriter), so the draw keeps them apart.
    """
    isn_s = (isn_p + delta) % 2**32
    start = draw.draw(st.integers(0, len(data) - 1))
    length = draw.draw(st.integers(1, min(16, len(data) - start)))
    bad = bytearray(data)
    for i in range(start, start + length):
        bad[i] ^= draw.draw(st.integers(1, 255))
    rng = random.Random(seed)
    ports = (40000, 40001, 40002)
    sec_data = [data, data, data]
    sec_data[which] = bytes(bad)
    pri = recording([data, data, data], isn_p, 5000, 1_700_000_000.0, rng, ports)
    sec = recording(sec_data, isn_s, 9000, 1_700_000_000.0 + offset, rng, ports)
    res = replay(pri, sec, latency)
    kinds = [(d.kind.value, d.offset, d.flow) for d in res.divergences]
    assert kinds == [("payload", start, f"TCP 10.0.0.1:80 > 10.0.0.2:{ports[which]}")]
    assert res.held_frames == 0 and res.flushed_frames == 0
    assert res.alignment is not None and abs(res.alignment.applied - offset) < 1e-3
