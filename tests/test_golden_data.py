"""Checks of the golden capture data itself (pcaps/<case>/), without colo-proxy.

The expectations in expected.json are re-derived here from the pcaps with an independent,
deliberately naive reader (struct parsing, whole-capture reassembly, no timing): frame counts,
which frames are guest output, the payload divergence offsets (first differing byte of the two
reassembled guest streams), close/handshake/timeout/ack positions and unmatched datagrams.
The generator is checked to be deterministic by regenerating every case into memory.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import itertools
import json
import struct
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PCAPS = ROOT / "pcaps"
LAB_CASES = {"redis-real", "redis-real-diverge"}  # tools/lab_capture.py (root, real stacks)
# tools/lab_capture_indep.py: independent recordings of real servers (root, real stacks).
INDEP_LAB_CASES = {"nginx-real", "nginx-real-swapped", "redis-real-multi", "lossy-real",
                   # tools/lab_capture_noise.py: real servers with real noise (issues 11, 14).
                   "nginx-date", "nginx-twin", "tls-real", "redis-time", "bulk-real"}
KINDS = {"payload", "length", "close", "handshake", "udp", "icmp", "other", "timeout", "ack"}
REASONS = {"divergence", "timeout", "hold_limit", "flow_table", "flush"}
WRAP = 2**32
# A secondary segment whose offset from the secondary's ISN is beyond this was sent after a
# checkpoint, with the primary's sequence numbers (the generator keeps the ISNs far apart).
MAX_STREAM = 1 << 22


def load_tool(name: str) -> ModuleType:
    path = ROOT / "tools" / f"{name}.py"
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # the tools import each other
    spec = importlib.util.spec_from_file_location(f"_golden_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return load_tool("gen_golden")


def case_dirs() -> list[str]:
    return sorted(p.name for p in PCAPS.iterdir() if (p / "expected.json").exists())


# --------------------------------------------------------------------------- naive reader


def read_pcap(path: Path) -> list[tuple[int, bytes]]:
    return read_pcap_bytes(path.read_bytes())


def read_pcap_bytes(data: bytes) -> list[tuple[int, bytes]]:
    """(microsecond timestamp, frame) records of a little-endian microsecond libpcap file."""
    magic, _vmaj, _vmin, _tz, _sig, _snap, linktype = struct.unpack_from("<IHHiIII", data)
    assert magic == 0xA1B2C3D4, "not a little-endian microsecond pcap"
    assert linktype == 1, f"link type {linktype}, expected Ethernet"
    out, pos = [], 24
    while pos < len(data):
        sec, usec, incl, _orig = struct.unpack_from("<IIII", data, pos)
        out.append((sec * 1_000_000 + usec, data[pos + 16 : pos + 16 + incl]))
        pos += 16 + incl
    assert pos == len(data), "truncated record"
    return out


@dataclass
class L3:
    vlans: tuple[int, ...]
    src: str
    dst: str
    proto: int
    frag: tuple[Any, int, bool] | None  # (datagram key, byte offset, more fragments)
    payload: bytes


def parse_l3(frame: bytes) -> L3 | None:
    etype, pos, vlans = struct.unpack_from("!H", frame, 12)[0], 14, []
    while etype in (0x8100, 0x88A8):
        vlans.append(struct.unpack_from("!H", frame, pos)[0] & 0xFFF)
        etype = struct.unpack_from("!H", frame, pos + 2)[0]
        pos += 4
    if etype == 0x0800:
        ihl = (frame[pos] & 0xF) * 4
        total, ident, fl = struct.unpack_from("!HHH", frame, pos + 2)
        proto = frame[pos + 9]
        src = str(ipaddress.IPv4Address(frame[pos + 12 : pos + 16]))
        dst = str(ipaddress.IPv4Address(frame[pos + 16 : pos + 20]))
        body = frame[pos + ihl : pos + total]  # IP length, never the frame length (padding)
        off, more = (fl & 0x1FFF) * 8, bool(fl & 0x2000)
        frag = ((tuple(vlans), src, dst, proto, ident), off, more) if off or more else None
        return L3(tuple(vlans), src, dst, proto, frag, body)
    if etype == 0x86DD:
        plen, nh = struct.unpack_from("!HB", frame, pos + 4)
        src = str(ipaddress.IPv6Address(frame[pos + 8 : pos + 24]))
        dst = str(ipaddress.IPv6Address(frame[pos + 24 : pos + 40]))
        body = frame[pos + 40 : pos + 40 + plen]
        frag = None
        while nh in (0, 43, 60, 44):
            if nh == 44:
                fo, ident = struct.unpack_from("!HI", body, 2)
                frag = ((tuple(vlans), src, dst, body[0], ident), fo & 0xFFF8, bool(fo & 1))
                nh, body = body[0], body[8:]
            else:
                nh, body = body[0], body[(body[1] + 1) * 8 :]
        return L3(tuple(vlans), src, dst, nh, frag, body)
    return None


def datagrams(frames: list[tuple[int, bytes]]) -> list[L3]:
    """Whole IP datagrams (fragments reassembled, in order of completion)."""
    out: list[L3] = []
    pending: dict[Any, dict[int, tuple[bytes, bool]]] = defaultdict(dict)
    for _ts, frame in frames:
        l3 = parse_l3(frame)
        if l3 is None:
            continue
        if l3.frag is None:
            out.append(l3)
            continue
        key, off, more = l3.frag
        pending[key][off] = (l3.payload, more)
        pieces, pos, whole = sorted(pending[key].items()), 0, b""
        for o, (part, m) in pieces:
            if o != pos:
                break
            whole, pos = whole + part, pos + len(part)
            if not m:
                out.append(L3(l3.vlans, l3.src, l3.dst, l3.proto, None, whole))
                del pending[key]
                break
    assert not pending, "incomplete fragmented datagram in a golden capture"
    return out


@dataclass
class TcpSide:
    isn: int | None = None
    peer_isn: int | None = None
    syn_opts: tuple[Any, ...] | None = None
    segs: list[tuple[int, int, int, bytes]] = field(default_factory=list)  # seq, ack, flags, data
    own_ack: list[int] = field(default_factory=list)


def syn_options(opts: bytes) -> tuple[Any, ...]:
    mss = ws = None
    sack = ts = False
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        length = opts[i + 1]
        if kind == 2:
            mss = struct.unpack_from("!H", opts, i + 2)[0]
        elif kind == 3:
            ws = opts[i + 2]
        elif kind == 4:
            sack = True
        elif kind == 8:
            ts = True
        i += length
    return (mss, ws, sack, ts)


@dataclass
class Side:
    tcp: dict[Any, TcpSide]
    dgrams: Counter[tuple[Any, bytes]]
    output_frames: int


def guest_output(path: Path, guest: str | None) -> Side:
    frames = read_pcap(path)
    out = [(ts, f) for ts, f in frames
           if guest is None or (l3 := parse_l3(f)) is None or l3.src == guest]
    tcp: dict[Any, TcpSide] = defaultdict(TcpSide)
    dgrams: Counter[tuple[Any, bytes]] = Counter()
    for d in datagrams(out):
        if d.proto == 6:
            sport, dport, seq, ack, offs, flags = struct.unpack_from("!HHIIBB", d.payload)
            key = (d.vlans, d.src, sport, d.dst, dport)
            side = tcp[key]
            hdr = (offs >> 4) * 4
            if flags & 0x02:
                side.isn = seq
                side.syn_opts = syn_options(d.payload[20:hdr])
            if flags & 0x10 and side.peer_isn is None:
                side.peer_isn = (ack - 1) % WRAP
            side.segs.append((seq, ack, flags, d.payload[hdr:]))
        elif d.proto == 17:
            sport, dport, ulen = struct.unpack_from("!HHH", d.payload)
            dgrams[(("udp", d.vlans, d.src, sport, d.dst, dport), d.payload[8:ulen])] += 1
        elif d.proto in (1, 58):
            ident = struct.unpack_from("!H", d.payload, 4)[0]
            icmp_key = ("icmp", d.vlans, d.src, d.dst, ident)
            dgrams[(icmp_key, d.payload[:2] + d.payload[4:])] += 1  # checksum ignored
        else:
            dgrams[(("other", d.vlans, d.src, d.dst, d.proto), d.payload)] += 1
    return Side(dict(tcp), dgrams, len(out))


@dataclass
class Stream:
    data: bytearray = field(default_factory=bytearray)
    have: bytearray = field(default_factory=bytearray)
    frames: list[tuple[int, int, int]] = field(default_factory=list)  # (offset, end, ack off)
    close: tuple[str, int] | None = None
    max_ack: int = -1

    def put(self, off: int, data: bytes) -> None:
        end = off + len(data)
        if end > len(self.data):
            grow = end - len(self.data)
            self.data += bytes(grow)
            self.have += bytes(grow)
        for i, b in enumerate(data):
            if self.have[off + i]:
                assert self.data[off + i] == b, f"one side resent different bytes at {off + i}"
            self.data[off + i], self.have[off + i] = b, 1


def stream(side: TcpSide, base: TcpSide | None) -> Stream:
    """Reassemble one side; frames out of range of its own ISN use ``base``'s (rebase)."""
    s = Stream()
    assert side.isn is not None and side.peer_isn is not None
    for seq, ack, flags, data in side.segs:
        if flags & 0x02:
            continue
        off = (seq - side.isn - 1) % WRAP
        ack_off = (ack - side.peer_isn - 1) % WRAP
        if off > MAX_STREAM and base is not None and base.isn is not None:
            off = (seq - base.isn - 1) % WRAP
        assert off <= MAX_STREAM, "segment outside the stream"
        s.put(off, data)
        s.frames.append((off, off + len(data), ack_off))
        s.max_ack = max(s.max_ack, ack_off)
        if flags & 0x05 and s.close is None:
            s.close = ("rst" if flags & 0x04 else "fin", off + len(data))
    return s


def derive_divergences(pri: Side, sec: Side) -> list[tuple[str, int | None]]:
    """What a correct comparison must report, derived from the data alone (unordered)."""
    found: list[tuple[str, int | None]] = []
    for key, p in pri.tcp.items():
        s_side = sec.tcp.get(key)
        if s_side is None or s_side.isn is None:
            found.append(("timeout", 0))
            continue
        if p.syn_opts != s_side.syn_opts:
            found.append(("handshake", 0))
        ps, ss = stream(p, None), stream(s_side, p)
        n = min(len(ps.data), len(ss.data))
        diff = next((i for i in range(n)
                     if ps.have[i] and ss.have[i] and ps.data[i] != ss.data[i]), None)
        if diff is not None:
            found.append(("payload", diff))
            continue
        if ps.close is not None and ps.close != ss.close:
            found.append(("close", ps.close[1]))
            continue
        covered = len(ss.have) if all(ss.have) else ss.have.index(0)
        uncovered = [o for o, e, _ in ps.frames if e > max(o, covered)]  # data not matched
        if uncovered:
            found.append(("timeout", uncovered[0]))
            continue
        ahead = [o for o, _, a in ps.frames if a > ss.max_ack]
        if ahead:
            found.append(("ack", ahead[0]))
    unmatched = pri.dgrams - sec.dgrams
    for (key, _payload), n in unmatched.items():
        found += [(key[0], None)] * n
    return sorted(found, key=lambda d: (d[0], -1 if d[1] is None else d[1]))


# --------------------------------------------------------------------------- tests


def test_case_directories_match_the_generator(gen: ModuleType) -> None:
    assert set(case_dirs()) == set(gen.CASES) | LAB_CASES | INDEP_LAB_CASES


def test_readme_lists_every_case() -> None:
    readme = (PCAPS / "README.md").read_text()
    for name in case_dirs():
        assert f"`{name}`" in readme, name


def independent(name: str) -> bool:
    """Cases recorded as two independent runs (issue 9): they state a clock offset."""
    return "clock_offset" in json.loads((PCAPS / name / "expected.json").read_text())


@pytest.mark.parametrize("name", [n for n in case_dirs() if not independent(n)])
def test_case_files_and_expectations(name: str) -> None:
    directory = PCAPS / name
    for fname in ("primary.pcap", "secondary.pcap", "expected.json"):
        assert (directory / fname).is_file(), fname
    exp = json.loads((directory / "expected.json").read_text())
    assert list(exp) == ["description", "args", "primary_frames", "secondary_frames",
                         "released_frames", "held_frames", "divergences",
                         "checkpoint_reasons"]
    assert isinstance(exp["description"], str) and exp["description"]
    assert isinstance(exp["args"], list) and all(isinstance(a, str) for a in exp["args"])
    for d in exp["divergences"]:
        assert set(d) == {"kind", "offset"} and d["kind"] in KINDS
        tcp_kind = d["kind"] in {"payload", "length", "close", "handshake", "timeout", "ack"}
        assert isinstance(d["offset"], int) if tcp_kind else d["offset"] is None
    assert all(r in REASONS for r in exp["checkpoint_reasons"])
    assert exp["held_frames"] == 0

    primary, secondary = read_pcap(directory / "primary.pcap"), read_pcap(
        directory / "secondary.pcap")
    assert len(primary) == exp["primary_frames"]
    assert len(secondary) == exp["secondary_frames"]
    for frames in (primary, secondary):
        times = [ts for ts, _ in frames]
        assert times == sorted(times), "frames out of time order"
        if frames:
            assert times[-1] - times[0] < 2_000_000, "keep cases inside 2 s"

    args = exp["args"]
    guest = args[args.index("--guest") + 1] if "--guest" in args else None
    pri = guest_output(directory / "primary.pcap", guest)
    sec = guest_output(directory / "secondary.pcap", guest)
    assert exp["released_frames"] == pri.output_frames
    expected = sorted(((d["kind"], d["offset"]) for d in exp["divergences"]),
                      key=lambda d: (d[0], -1 if d[1] is None else d[1]))
    assert derive_divergences(pri, sec) == expected
    kinds = {d["kind"] for d in exp["divergences"]}
    want = (["timeout"] if kinds & {"timeout", "ack"} else ["divergence"]) if kinds else []
    assert exp["checkpoint_reasons"] == want


@pytest.mark.parametrize("name", sorted(set(case_dirs()) - LAB_CASES - INDEP_LAB_CASES))
def test_generator_is_deterministic(gen: ModuleType, name: str) -> None:
    files = gen.case_files(gen.build(name))
    for fname, content in files.items():
        assert (PCAPS / name / fname).read_bytes() == content, f"{name}/{fname} is stale"


def test_generator_is_idempotent(gen: ModuleType, tmp_path: Path) -> None:
    assert gen.main(["--out", str(tmp_path), "--case", "sample", "--case", "vlan"]) == 0
    first = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert len(first) == 6
    assert gen.write_case(gen.build("sample"), tmp_path) == []
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == first


def test_lab_resp_parser_and_time_shift() -> None:
    lab = load_tool("lab_capture")
    assert lab.resp_reply_end(b"+OK\r\n") == 5
    assert lab.resp_reply_end(b"$5\r\nhel") is None
    assert lab.resp_reply_end(b"*2\r\n$1\r\na\r\n:7\r\nX") == 15
    assert lab.resp_reply_end(b"$-1\r\n") == 5
    data = (PCAPS / "redis-real" / "secondary.pcap").read_bytes()
    shifted = lab.shift_pcap(lab.shift_pcap(data, -1_500_000), 1_500_000)
    assert shifted == data
    frames, moved = read_pcap(PCAPS / "redis-real" / "secondary.pcap"), read_pcap_bytes(
        lab.shift_pcap(data, -250))
    assert [ts - 250 for ts, _ in frames] == [ts for ts, _ in moved]


def test_lab_capture_streams_agree_apart_from_the_seeded_key() -> None:
    """The real captures come from different stacks: ISNs differ, the bytes do not."""
    for name in sorted(LAB_CASES):
        pri = guest_output(PCAPS / name / "primary.pcap", "10.77.0.1")
        sec = guest_output(PCAPS / name / "secondary.pcap", "10.77.0.1")
        (key,) = pri.tcp
        assert pri.tcp[key].isn != sec.tcp[key].isn
        assert pri.tcp[key].peer_isn != sec.tcp[key].peer_isn


def lab_available(*extra: str) -> str | None:
    """Why the real-stack capture cannot run here (None when it can)."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "tcpdump", "redis-server", "redis-cli", *extra):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    probe = "colo-golden-probe"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "cannot create network namespaces"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.mark.integration
def test_lab_capture_reproduces_the_committed_verdicts(tmp_path: Path) -> None:
    """A fresh real-stack capture reaches the same verdicts as the committed one."""
    reason = lab_available()
    if reason is not None:
        pytest.skip(reason)
    lab = load_tool("lab_capture")
    assert lab.main(["--out", str(tmp_path), "--ns-prefix", "t-"]) == 0
    for name in sorted(LAB_CASES):
        fresh = json.loads((tmp_path / name / "expected.json").read_text())
        committed = json.loads((PCAPS / name / "expected.json").read_text())
        assert fresh["divergences"] == committed["divergences"]
        assert fresh["checkpoint_reasons"] == committed["checkpoint_reasons"]
        pri = guest_output(tmp_path / name / "primary.pcap", "10.77.0.1")
        sec = guest_output(tmp_path / name / "secondary.pcap", "10.77.0.1")
        assert fresh["released_frames"] == pri.output_frames
        expected = [(d["kind"], d["offset"]) for d in fresh["divergences"]]
        assert derive_divergences(pri, sec) == expected


# --------------------------------------------------------------------------- independent recordings
#
# Issue 9's contract (pcaps/README.md): the secondary goes on in its own sequence space;
# connections are paired by client address and port; offset 0 is the first byte after the
# SYN (the first byte seen when the capture starts mid-connection); one payload divergence
# per maximal differing run, one length divergence when the lengths differ; one udp
# divergence per unmatched datagram.

INDEP_KEYS = ["description", "args", "primary_frames", "secondary_frames", "released_frames",
              "held_frames", "divergences", "divergence_order", "checkpoint_reasons",
              "clock_offset", "clock_offset_tolerance"]
INDEP_CASES = [n for n in case_dirs() if independent(n)]


@dataclass
class Conn:
    """One guest -> client TCP direction, reassembled naively by sequence number."""

    base: int | None = None  # sequence number of offset 0
    data: bytearray = field(default_factory=bytearray)
    have: bytearray = field(default_factory=bytearray)
    segs: list[tuple[int, int, int]] = field(default_factory=list)  # (time us, offset, end)


def indep_tcp(path: Path, guest: str | None) -> dict[tuple[str, int], Conn]:
    """(client address, client port) -> the guest's reassembled output on that connection."""
    conns: dict[tuple[str, int], Conn] = defaultdict(Conn)
    for ts, frame in read_pcap(path):
        l3 = parse_l3(frame)
        if l3 is None or l3.proto != 6 or (guest is not None and l3.src != guest):
            continue
        assert l3.frag is None
        _sport, dport, seq, _ack, offs, flags = struct.unpack_from("!HHIIBB", l3.payload)
        payload = l3.payload[(offs >> 4) * 4 :]
        c = conns[(l3.dst, dport)]
        if flags & 0x02:
            c.base = (seq + 1) % WRAP
            continue
        if c.base is None:  # mid-stream: the first segment seen starts the stream
            c.base = seq
        off = (seq - c.base) % WRAP
        assert off < 1 << 24, "segment outside the stream (a rebase?)"
        if not payload:  # pure ACKs and the FIN (after which seq is one past the end)
            continue
        end = off + len(payload)
        if end > len(c.data):
            c.data += bytes(end - len(c.data))
            c.have += bytes(end - len(c.have))
        for i, b in enumerate(payload, off):
            assert not c.have[i] or c.data[i] == b, "a retransmission changed a byte"
            c.data[i], c.have[i] = b, 1
        c.segs.append((ts, off, end))
    for key, c in conns.items():
        assert all(c.have), f"{path.name} {key}: a hole in the guest's stream"
    return dict(conns)


def naive_runs(a: bytes, b: bytes) -> list[tuple[str, int | None]]:
    n = min(len(a), len(b))
    diff = [a[i] != b[i] for i in range(n)]
    runs: list[tuple[str, int | None]] = [
        ("payload", i) for i in range(n) if diff[i] and (i == 0 or not diff[i - 1])]
    return runs + ([("length", n)] if len(a) != len(b) else [])


def carried_at(c: Conn, off: int) -> int:
    """Capture time of the first segment carrying stream offset ``off`` (else the last)."""
    return next((ts for ts, o, e in c.segs if o <= off < e), c.segs[-1][0] if c.segs else 0)


def sort_divs(divs: list[tuple[str, int | None]]) -> list[tuple[str, int | None]]:
    return sorted(divs, key=lambda d: (d[0], -1 if d[1] is None else d[1]))


@pytest.mark.parametrize("name", INDEP_CASES)
def test_independent_case_expectations(name: str) -> None:
    """Counts, clock offset and divergences of an independent pair, re-derived naively."""
    directory = PCAPS / name
    exp = json.loads((directory / "expected.json").read_text())
    assert [k for k in INDEP_KEYS if k in exp] == list(exp), "unknown or misplaced keys"
    assert set(INDEP_KEYS) - set(exp) <= {"divergence_order", "checkpoint_reasons"}
    assert exp.get("divergence_order", "time") in ("any", "time")
    assert exp["held_frames"] == 0 and exp["clock_offset_tolerance"] <= 0.05
    for d in exp["divergences"]:
        assert set(d) == {"kind", "offset"} and d["kind"] in {"payload", "length", "udp"}
        assert d["offset"] is None if d["kind"] == "udp" else d["offset"] >= 0
    args = exp["args"]
    guest = args[args.index("--guest") + 1] if "--guest" in args else None
    primary, secondary = (read_pcap(directory / f) for f in ("primary.pcap", "secondary.pcap"))
    assert (len(primary), len(secondary)) == (exp["primary_frames"], exp["secondary_frames"])
    for frames in (primary, secondary):
        assert [ts for ts, _ in frames] == sorted(ts for ts, _ in frames)
    # The first frame of each file is the same event (a SYN / SYN-ACK / first datagram).
    offset_us = round(exp["clock_offset"] * 1_000_000)
    assert abs(secondary[0][0] - primary[0][0] - offset_us) <= exp["clock_offset_tolerance"] * 1e6
    assert guest_output(directory / "primary.pcap", guest).output_frames == exp[
        "released_frames"]

    pri, sec = indep_tcp(directory / "primary.pcap", guest), indep_tcp(
        directory / "secondary.pcap", guest)
    assert set(pri) == set(sec), "every connection is on both sides"
    timed: list[tuple[int, tuple[str, int | None]]] = []
    for key in pri:
        for kind, off in naive_runs(bytes(pri[key].data), bytes(sec[key].data)):
            assert off is not None
            when = max(carried_at(pri[key], off), carried_at(sec[key], off) - offset_us)
            timed.append((when, (kind, off)))
    pdg = guest_output(directory / "primary.pcap", guest).dgrams
    sdg = guest_output(directory / "secondary.pcap", guest).dgrams
    for (key, _payload), n in (pdg - sdg).items():
        timed += [(-1, (key[0], None))] * n
    assert not sdg - pdg or pdg - sdg, "an unmatched secondary datagram without its pair"
    got = [(d["kind"], d["offset"]) for d in exp["divergences"]]
    assert sort_divs(got) == sort_divs([d for _, d in timed])
    if "checkpoint_reasons" in exp:
        # Each real divergence is its own checkpoint: in time order, >= 0.5 s apart.
        assert exp["checkpoint_reasons"] == ["divergence"] * len(got)
        tcp_times = sorted(t for t, _ in timed if t >= 0)
        assert all(b - a >= 500_000 for a, b in itertools.pairwise(tcp_times))
        if exp.get("divergence_order", "time") == "time":
            assert got == [d for _, d in sorted(timed)]


@pytest.mark.parametrize("name", INDEP_CASES)
def test_independent_case_agrees_with_tshark(name: str) -> None:
    """Wireshark's reassembly (tshark follow) reaches the same TCP divergences."""
    import shutil

    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed")
    follow = load_tool("tshark_follow")
    directory = PCAPS / name
    exp = json.loads((directory / "expected.json").read_text())
    args = exp["args"]
    guest = args[args.index("--guest") + 1] if "--guest" in args else "10.0.0.1"
    divs, _summary = follow.expected_divergences(directory / "primary.pcap",
                                                 directory / "secondary.pcap", guest)
    tcp = [d for d in exp["divergences"] if d["kind"] != "udp"]
    assert sorted(divs, key=follow.sort_key) == sorted(tcp, key=follow.sort_key)


def test_stream_divergence_rule() -> None:
    """The contract's rule as the tools apply it, against the naive one here."""
    follow = load_tool("tshark_follow")
    cases = [(b"abcdef", b"abcdef"), (b"abcdef", b"aXcdYY"), (b"abc", b"abcd"),
             (b"abXd", b"abYdZ"), (b"", b"x"), (b"xy", b"yx")]
    for a, b in cases:
        want = naive_runs(a, b)
        assert [(d["kind"], d["offset"]) for d in follow.stream_divergences(a, b)] == want
    assert naive_runs(b"abcdef", b"aXcdYY") == [("payload", 1), ("payload", 4)]


def test_indep_lab_workload_is_deterministic() -> None:
    """Same files except big.bin's one byte; per-connection ports pinned and distinct."""
    lab = load_tool("lab_capture_indep")
    pri, sec = lab.web_files("pri"), lab.web_files("sec")
    assert pri.keys() == sec.keys()
    diff = [k for k in pri if pri[k] != sec[k]]
    assert diff == ["big.bin"]
    assert [i for i, (x, y) in enumerate(zip(pri["big.bin"], sec["big.bin"], strict=True))
            if x != y] == [lab.BIG_FLIP]
    for variant in lab.VARIANTS:
        _port, conns = lab.plan(variant)
        ports = [c.port for c in conns]
        assert len(set(ports)) == len(ports)
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcX"
    assert lab.http_response_end(resp) == len(resp) - 1
    assert lab.http_response_end(resp[:-3]) is None


@pytest.mark.integration
def test_indep_lab_capture_reproduces_the_committed_verdicts(tmp_path: Path) -> None:
    """Fresh independent recordings reach the committed verdicts (nginx: up to Date bytes)."""
    reason = lab_available("tc", "tshark", "nginx")
    if reason is not None:
        pytest.skip(reason)
    lab = load_tool("lab_capture_indep")
    assert lab.main(["--out", str(tmp_path), "--ns-prefix", "gd9t-"]) == 0
    for name in ("redis-real-multi", "lossy-real"):
        fresh = json.loads((tmp_path / name / "expected.json").read_text())
        assert fresh["divergences"] == []
        pri = indep_tcp(tmp_path / name / "primary.pcap", "10.77.0.1")
        sec = indep_tcp(tmp_path / name / "secondary.pcap", "10.77.0.1")
        assert {k: bytes(c.data) for k, c in pri.items()} == {
            k: bytes(c.data) for k, c in sec.items()}
    fresh = json.loads((tmp_path / "nginx-real" / "expected.json").read_text())
    pri = indep_tcp(tmp_path / "nginx-real" / "primary.pcap", "10.77.0.1")
    sec = indep_tcp(tmp_path / "nginx-real" / "secondary.pcap", "10.77.0.1")
    found = []
    for key in pri:
        a, b = bytes(pri[key].data), bytes(sec[key].data)
        for _kind, off in naive_runs(a, b):
            assert off is not None
            line_start = a.rfind(b"\r\n", 0, off) + 2
            found.append(("payload", off))
            big_flip = a.find(b"\r\n\r\n") + 4 + lab.BIG_FLIP  # on the big.bin connection
            assert a.startswith(b"Date: ", line_start) or off == big_flip, (key, off)
    assert sort_divs(found) == sort_divs(
        [(d["kind"], d["offset"]) for d in fresh["divergences"]])
    swapped = json.loads((tmp_path / "nginx-real-swapped" / "expected.json").read_text())
    assert swapped["divergences"] == fresh["divergences"]
    assert swapped["clock_offset"] == -fresh["clock_offset"]
