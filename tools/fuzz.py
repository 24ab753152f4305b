#!/usr/bin/env python3
"""Fuzz every parser a guest or a peer can reach, and print executions and time per target.

    tools/fuzz.py                        # every target, 2,000 inputs each
    tools/fuzz.py --examples 50000 core  # one target, a long run
    tools/fuzz.py --seconds 600          # each target for 10 minutes

Each target takes one ``bytes`` input (libFuzzer style, so any engine can drive it)
and checks the invariant the issue states: every input parses or is reported as
malformed, with no other exception, no hang and bounded memory; every primary
frame fed to the core is released exactly once (after a final checkpoint), or
dropped and counted at the flow table's hard cap (``admission_refused_*``).
Inputs are drawn by hypothesis: raw bytes, and mutations (bit flips, overwrites,
insertions, cuts, splices) of seeds that are valid for the target, so the search
starts deep inside each format.  A failing input is written to
``tests/fuzz/corpus/<target>/`` as a regression test (tests/fuzz replays them all).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import logging
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from colo_proxy.core.config import Config  # noqa: E402
from colo_proxy.core.events import Side  # noqa: E402
from colo_proxy.core.fragments import FRAGMENT_OVERHEAD, FragmentTable  # noqa: E402
from colo_proxy.core.framing import NET_BUFSIZE, FrameDecoder, encode_frames  # noqa: E402
from colo_proxy.core.packet import IpPacket, parse_ip, parse_tcp, parse_udp  # noqa: E402
from colo_proxy.core.proxy import Proxy  # noqa: E402
from colo_proxy.core.reassembly import StreamBuffer  # noqa: E402
from colo_proxy.disk import nbd_proto  # noqa: E402
from colo_proxy.disk.qmp_proto import MAX_MESSAGE, CommandSpec, Param, QmpSession  # noqa: E402
from colo_proxy.drivers.pcap import PcapWriter, read_frames  # noqa: E402
from colo_proxy.errors import InputError  # noqa: E402
from colo_proxy.testing.synth import TcpServerStream, ipv4_frame  # noqa: E402

CORPUS = ROOT / "tests" / "fuzz" / "corpus"

# -- input helpers -----------------------------------------------------------------------


class Cursor:
    """Reads structure out of a fuzz input; past the end it yields zeros."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            self.pos += 1
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


def chunks(data: bytes) -> list[bytes]:
    """Split `data` where its own bytes say (so every split point gets tried)."""
    out, pos = [], 0
    while pos < len(data):
        n = 1 + data[pos] % 61
        out.append(data[pos:pos + n])
        pos += n
    return out


# -- targets -----------------------------------------------------------------------------


def target_packet(data: bytes) -> None:
    """The frame parser: a result or a reason string, never an exception."""
    for off in (0, min(4, len(data))):
        ip = parse_ip(data, off)
        if isinstance(ip, str):
            continue
        assert isinstance(ip, IpPacket)
        assert off <= ip.l4 <= ip.l4_end <= len(data), ip
        for parse in (parse_tcp, parse_udp):
            res = parse(data, ip.l4, ip.l4_end)
            assert res is not None


def _program(data: bytes) -> list[tuple[int, bytes]]:
    """A core input: records of [op][len:2][frame]; op's low 2 bits pick the side
    (0 primary, 1 secondary, 2 client, 3 tick), the rest a time step."""
    cur, out = Cursor(data), []
    while not cur.done and len(out) < 400:
        op = cur.byte()
        n = int.from_bytes(cur.take(2), "big") % 2048
        out.append((op, cur.take(n)))
    return out


def encode_program(events: list[tuple[int, bytes]]) -> bytes:
    return b"".join(bytes([op]) + len(f).to_bytes(2, "big") + f for op, f in events)


def refused(proxy: Proxy) -> int:
    """Primary frames of new flows dropped at the flow table's hard cap."""
    return proxy.counters["admission_refused_primary_frames"]


SMALL = Config(max_flows=8, max_hold_frames=64, max_hold_bytes=64 << 10, max_fragments=4,
               max_fragment_bytes=8 * FRAGMENT_OVERHEAD + 4096, datagram_reorder_window=4,
               max_sec_buffer_bytes=16 << 10, max_flow_hold_bytes=32 << 10)


def target_core(data: bytes) -> None:
    """Frames from both sides (and client input) into the core, with ticks and
    checkpoints; every primary frame fed comes out exactly once, nothing else does."""
    for config in (Config(), SMALL):
        proxy = Proxy(config)
        fed: Counter[bytes] = Counter()
        out: Counter[bytes] = Counter()
        now = 0.0
        for op, frame in _program(data):
            side = op & 3
            now += (op >> 2) * 0.05
            if side == 3:
                proxy.tick(now)
                if op & 0x80 and proxy.state.value == "requested":
                    proxy.checkpoint_started(now)
                    proxy.checkpoint_done(now)
                continue
            proxy.feed((Side.PRIMARY, Side.SECONDARY, Side.CLIENT)[side], frame, now)
            if side == 0:
                fed[frame] += 1
            for d, o in proxy.take_output().released:
                out[d[o:]] += 1
            # every primary frame fed so far is released, counted as held, or refused
            # at the flow table's hard cap (dropped and counted)
            assert fed.total() == out.total() + proxy.held_frames() + refused(proxy), \
                proxy.stats()
        proxy.tick(now + 1000.0)
        proxy.checkpoint_started(now + 1000.0)
        proxy.checkpoint_done(now + 1000.0)
        for d, o in proxy.take_output().released:
            out[d[o:]] += 1
        assert proxy.held_frames() == 0, proxy.stats()
        assert not out - fed, proxy.stats()  # nothing released that was not fed
        assert fed.total() == out.total() + refused(proxy), (fed.total(), out.total(),
                                                              proxy.stats())


def target_fragments(data: bytes) -> None:
    """Random fragments into a small table: memory within its limit after every add,
    every fragment handed back exactly once (whole, given up, expired or cleared)."""
    table: FragmentTable[int] = FragmentTable(4, 6 * FRAGMENT_OVERHEAD + 2000, 5.0)
    cur, back, n, now = Cursor(data), Counter[int](), 0, 0.0
    while not cur.done:
        op = cur.byte()
        now += (op >> 6) * 2.0
        if op & 0x30 == 0x30:
            back.update(table.expire(now))
            continue
        key = ((), 4, b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", 17, op & 3)
        offset = (cur.byte() % 8) * 8
        piece = bytes(8 * (cur.byte() % 6))
        res = table.add(key, offset, bool(op & 8), piece, n, now)
        n += 1
        if res is not None:
            back.update(res[1])
        assert 0 <= table.held_bytes <= table.max_bytes
        assert table.held_rels * FRAGMENT_OVERHEAD <= table.max_bytes
        assert table.held_rels == n - sum(back.values())
    back.update(table.clear())
    assert back == Counter(range(n))


def target_reassembly(data: bytes) -> None:
    """One TCP direction rebuilt from segments at arbitrary offsets, checked against a
    model where the first copy of each byte wins: the contiguous bytes, what is
    buffered out of order, and which conflict is reported first."""
    buf = StreamBuffer(0)
    model: dict[int, int] = {}
    first_conflict: int | None = None
    cur = Cursor(data)
    while not cur.done:
        op = cur.byte()
        if op & 0xC0 == 0xC0:
            n = min(op & 0x3F, len(buf.buf))
            buf.consume(n)
            for off in range(buf.base - n, buf.base):
                model.pop(off, None)
            continue
        start = max(0, buf.base + (op & 0x3F) * 4 - 16)
        seg = cur.take(cur.byte() % 40)
        diff = [start + i for i, b in enumerate(seg)
                if start + i >= buf.base and model.get(start + i, b) != b]
        if diff and first_conflict is None:
            first_conflict = min(diff)
        for i, b in enumerate(seg):
            if start + i >= buf.base:
                model.setdefault(start + i, b)
        buf.add(start, seg)
        end = buf.base
        while end in model:
            end += 1
        assert bytes(buf.buf) == bytes(model[o] for o in range(buf.base, end))
        assert buf.ooo_bytes == sum(1 for o in model if o > end)
        starts = [s for s, _ in buf.ooo]
        assert starts == sorted(starts) == buf.ooo_starts
        assert all(a + len(d) <= b for (a, d), (b, _) in zip(buf.ooo, buf.ooo[1:],
                                                               strict=False))
        assert buf.first_conflict == first_conflict


def target_framing(data: bytes) -> None:
    """QEMU's record framing: any split gives the same frames; errors are reported,
    the pending buffer stays within one record."""
    for vnet in (False, True):
        whole = FrameDecoder(vnet)
        want = whole.feed(data)
        split = FrameDecoder(vnet)
        got = []
        for part in chunks(data):
            got += split.feed(part)
            assert split.pending_bytes <= NET_BUFSIZE + 8 + 61
        assert got == want
        assert (whole.error is None) == (split.error is None)


def target_pcap(data: bytes) -> None:
    """Capture files: frames or an InputError naming the file, nothing else."""
    with tempfile.NamedTemporaryFile(suffix=".pcap") as fh:
        # b"\x1f\x00" + capture: the capture gzipped (raw gzip bytes pass as they are)
        payload = gzip.compress(data[2:], mtime=0) if data[:2] == b"\x1f\x00" else data
        fh.write(payload)
        fh.flush()
        try:
            for ts, frame in read_frames(fh.name):
                assert isinstance(ts, float) and isinstance(frame, bytes)
        except InputError:
            pass


_EXPORTS = {"replication": nbd_proto.ExportInfo("replication", 1 << 20)}


def target_nbd(data: bytes) -> None:
    """The NBD server protocol, fed in pieces: events or a close, bounded buffers."""
    limit = nbd_proto.MAX_REQUEST + nbd_proto.MAX_OPTION + 64
    for tls in (False, True):
        conn = nbd_proto.NbdServerConnection(_EXPORTS, "replication", tls=tls)
        for part in chunks(data):
            for ev in conn.receive_data(part):
                if isinstance(ev, nbd_proto.Request):
                    # FLUSH's range is unused (the spec reserves it): anything else fits
                    assert (ev.command is nbd_proto.Command.FLUSH
                            or ev.offset + ev.length <= 1 << 20)
                    assert conn.export is not None and (conn.tls_active or not tls)
                elif isinstance(ev, nbd_proto.StartTls):
                    assert tls
                    conn.tls_started()
            conn.data_to_send()
            assert conn.buffered <= limit


_SPECS = {"colo-disk-checkpoint": CommandSpec({"epoch": Param("int")}),
          "query-colo-disk": CommandSpec(), "quit": CommandSpec()}


def target_qmp(data: bytes) -> None:
    """The QMP session: replies or a close, never an exception, bounded buffering."""
    session = QmpSession(_SPECS)
    for part in chunks(data):
        for ev in session.receive_data(part):
            if not hasattr(ev, "error"):
                session.result(ev, {})  # type: ignore[arg-type]
        session.data_to_send()
        assert len(session._scanner.buf) <= MAX_MESSAGE


# -- seeds -------------------------------------------------------------------------------


def _udp(payload: bytes, ident: int = 0, frag: int = 0) -> bytes:
    l4 = struct.pack("!HHHH", 7000, 9, 8 + len(payload), 0) + payload
    frame = ipv4_frame(bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2)), 17, l4, ident=ident)
    return frame[:20] + struct.pack("!H", frag) + frame[22:] if frag else frame


def _tcp_frames() -> list[bytes]:
    p = TcpServerStream(isn=10)
    return [p.synack(), p.data(0, b"hello " * 40), p.data(240, b"world"), p.data(0, b"x" * 8)]


def _capture(frames: list[bytes], ng: bool = False) -> bytes:
    if ng:
        import dpkt

        buf = io.BytesIO()
        w = dpkt.pcapng.Writer(buf)
        for i, f in enumerate(frames):
            w.writepkt(f, ts=1.0 + i)
        return buf.getvalue()
    with tempfile.NamedTemporaryFile() as fh:
        w2 = PcapWriter(fh.name)
        for i, f in enumerate(frames):
            w2.write(1.0 + i, f)
        w2.close()
        return Path(fh.name).read_bytes()


def seeds() -> dict[str, list[bytes]]:
    tcp = _tcp_frames()
    s = TcpServerStream(isn=99999)
    sec = [s.synack(), s.data(0, b"hello " * 40), s.data(240, b"world")]
    frag = [_udp(b"f" * 64, ident=3, frag=0x2000), _udp(b"g" * 16, ident=3, frag=9)]
    many = [_udp(b"m" * 30, ident=7, frag=0x2000 | i) for i in range(6)]
    flows = [TcpServerStream(isn=5, dport=41000 + i).synack() for i in range(12)]
    core = [
        encode_program([(0, f) for f in many] + [(1, many[0]), (0x83, b""), (0xFF, b"")]),
        encode_program([(0, f) for f in flows] + [(1, flows[0]), (0x43, b""), (0x83, b"")]),
        encode_program([(0, _udp(b"x" * 40, ident=9, frag=0x2000)), (0xFF, b""), (0xFF, b""),
                        (0, _udp(b"x" * 8, ident=9, frag=5)), (1, _udp(b"y"))]),
        encode_program([(0, tcp[0]), (1, sec[0]), (4, tcp[1]), (5, sec[1]), (0, tcp[2]),
                        (1, sec[2]), (0x83, b""), (0, tcp[3])]),
        encode_program([(0, _udp(b"a")), (1, _udp(b"a")), (0, _udp(b"b")), (0x7F, b""),
                        (0, frag[0]), (1, frag[0]), (0, frag[1]), (2, _udp(b"client"))]),
    ]
    records = encode_frames([(f, 0) for f in tcp], False)
    nbd_go = (struct.pack(">I", 3) + struct.pack(">QII", nbd_proto.IHAVEOPT, nbd_proto.OPT_GO,
                                                 4 + 11 + 2) + struct.pack(">I", 11)
              + b"replication" + struct.pack(">H", 0))
    nbd_req = struct.pack(">IHHQQI", nbd_proto.REQUEST_MAGIC, 0, 1, 7, 0, 16) + b"w" * 16
    return {
        "packet": [*tcp, *frag, _udp(b"u"), bytes(14)],
        "core": core,
        "fragments": [bytes([8, 0, 3, 0, 3, 2]), bytes([8, 0, 1, 9, 1, 1, 0x70, 8, 1, 0, 0xF0]),
                      bytes([8, 0, 5, 8, 1, 5, 8, 2, 5, 8, 3, 5, 8, 4, 5, 1, 4, 5])],
        "reassembly": [bytes([4, 8]) + b"abcdefgh" + bytes([0, 4]) + b"abcd" + bytes([8, 4])
                       + b"wxyz" + bytes([0xC3, 6, 8]) + b"ABCDEFGH"],
        "framing": [records, encode_frames([(f, 0) for f in tcp], True)],
        "pcap": [_capture(tcp), _capture(tcp, ng=True), b"\x1f\x00" + _capture(tcp)],
        "nbd": [nbd_go + nbd_req, nbd_go],
        "qmp": [b'{"execute": "qmp_capabilities"}{"execute": "colo-disk-checkpoint", '
                b'"arguments": {"epoch": 1}, "id": [1]}'],
    }


TARGETS: dict[str, Callable[[bytes], None]] = {
    "packet": target_packet, "core": target_core, "fragments": target_fragments,
    "reassembly": target_reassembly, "framing": target_framing, "pcap": target_pcap,
    "nbd": target_nbd, "qmp": target_qmp,
}


@st.composite
def mutated(draw: st.DrawFn, seed_list: list[bytes]) -> bytes:
    """A seed with a few mutations: flips, overwrites, inserts, cuts, splices."""
    data = bytearray(draw(st.sampled_from(seed_list)))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 4))
        at = draw(st.integers(0, len(data)))
        if kind == 0 and data:
            i = min(at, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == 1 and data:
            i = min(at, len(data) - 1)
            data[i] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif kind == 2:
            data[at:at] = draw(st.binary(max_size=16))
        elif kind == 3:
            del data[at:at + draw(st.integers(1, 64))]
        else:
            other = draw(st.sampled_from(seed_list))
            cut = draw(st.integers(0, len(other)))
            data[at:] = other[cut:]
    return bytes(data)


def inputs(name: str) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=512), mutated(seeds()[name]))


# -- running -----------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    executions: int
    seconds: float
    findings: list[str]


def save_crasher(name: str, data: bytes) -> Path:
    d = CORPUS / name
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"crash-{hashlib.sha1(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    return path


def run_target(name: str, examples: int, seconds: float | None = None,
               derandomize: bool = False, save: bool = True) -> Outcome:
    """Run one target; a failure is shrunk by hypothesis, saved, and reported."""
    fn = TARGETS[name]
    count = 0
    last: list[bytes] = []

    def body(data: bytes) -> None:
        nonlocal count
        count += 1
        last[:] = [data]
        fn(data)

    test = settings(max_examples=examples, deadline=None, database=None,
                    derandomize=derandomize,
                    suppress_health_check=list(HealthCheck))(given(inputs(name))(body))
    findings: list[str] = []
    start = time.perf_counter()
    rounds = 0
    while True:
        rounds += 1
        try:
            test()
        except Exception as err:  # the shrunk input is the last one that failed
            where = save_crasher(name, last[0]) if save and last else None
            findings.append(f"{type(err).__name__}: {str(err)[:200]} (saved {where})")
            break
        if seconds is None or time.perf_counter() - start >= seconds:
            break
    return Outcome(name, count, time.perf_counter() - start, findings)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", help=f"targets (default all: {', '.join(TARGETS)})")
    ap.add_argument("--examples", type=int, default=2000, help="inputs per round (2000)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="repeat rounds until each target ran this long")
    args = ap.parse_args(argv)
    names = args.targets or list(TARGETS)
    logging.getLogger("colo_proxy").setLevel(logging.ERROR)  # absurd inputs log warnings
    for n in names:
        if n not in TARGETS:
            ap.error(f"unknown target {n!r}")
    failed = 0
    print(f"{'target':<10} {'executions':>10} {'seconds':>8} {'exec/s':>8}  findings")
    for name in names:
        res = run_target(name, args.examples, args.seconds)
        rate = res.executions / res.seconds if res.seconds else 0.0
        print(f"{name:<10} {res.executions:>10} {res.seconds:>8.1f} {rate:>8.0f}  "
              f"{'; '.join(res.findings) or 'none'}", flush=True)
        failed += bool(res.findings)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
