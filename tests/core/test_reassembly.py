"""StreamBuffer golden overlap tables (Suricata style) and reassembly properties.

The tables give, per case, the segments in arrival order as (offset, bytes) and
the expected reassembled stream under the first-copy-wins rule, the number of
conflicts and the offset of the first conflicting byte.  Every case is run
directly on StreamBuffer at base 0, and again through `colo-proxy streams` on a
synthetic capture whose ISN is 0, 1, 2**32-1 or 2**32-11 (the last two make the
raw sequence numbers wrap inside the handshake or inside the data).

Conflicts are counted once per overlapped region that differs: the part of a
segment that overlaps the contiguous data, and each queued out-of-order piece
it overlaps.
"""

from __future__ import annotations

import itertools
import json
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from colo_proxy.core.reassembly import StreamBuffer
from colo_proxy.drivers.pcap import PcapWriter
from colo_proxy.streams import write_streams

Segment = tuple[int, bytes]


@dataclass(frozen=True)
class Case:
    name: str
    segments: tuple[Segment, ...]
    stream: bytes
    conflicts: int
    first_conflict: int | None


def case(
    name: str, segs: list[Segment], stream: bytes, conflicts: int, first: int | None
) -> Case:
    return Case(name, tuple(segs), stream, conflicts, first)


# A = original copy, B/C = later copies.  "before"/"after" say where the later
# copy starts relative to the original; "ooo" = the original waits out of order.
OVERLAP_TABLE = [
    case("in_order", [(0, b"AAAA"), (4, b"BBBB")], b"AAAABBBB", 0, None),
    case("reversed", [(4, b"BBBB"), (0, b"AAAA")], b"AAAABBBB", 0, None),
    case("exact_same", [(0, b"AAAA"), (0, b"AAAA")], b"AAAA", 0, None),
    case("exact_differs", [(0, b"AAAA"), (0, b"BBBB")], b"AAAA", 1, 0),
    case("exact_differs_ooo", [(4, b"AAAA"), (4, b"BBBB"), (0, b"CCCC")], b"CCCCAAAA", 1, 4),
    case("exact_differs_late_byte", [(0, b"ABCD"), (0, b"ABCX")], b"ABCD", 1, 3),
    case("partial_after", [(0, b"AAAA"), (2, b"BBBB")], b"AAAABB", 1, 2),
    case("partial_after_same", [(0, b"AAAA"), (2, b"AABB")], b"AAAABB", 0, None),
    case("partial_after_ooo", [(2, b"AAAA"), (4, b"BBBB"), (0, b"CC")], b"CCAAAABB", 1, 4),
    case("partial_before_ooo", [(4, b"AAAA"), (2, b"BBBB"), (0, b"CC")], b"CCBBAAAA", 1, 4),
    case("partial_before_same", [(4, b"AAAA"), (2, b"BBAA"), (0, b"CC")], b"CCBBAAAA", 0, None),
    case("contained", [(0, b"AAAAAA"), (2, b"BB")], b"AAAAAA", 1, 2),
    case("contained_ooo", [(2, b"AAAAAA"), (4, b"BB"), (0, b"CC")], b"CCAAAAAA", 1, 4),
    case("containing_ooo", [(2, b"AA"), (0, b"BBBBBB")], b"BBAABB", 1, 2),
    case("containing_in_order", [(0, b"AA"), (2, b"CC"), (0, b"BBBBBB")], b"AACCBB", 1, 0),
    case("containing_same", [(2, b"AA"), (0, b"BBAABB")], b"BBAABB", 0, None),
    case(
        "spans_two_pieces",
        [(2, b"AA"), (6, b"CC"), (0, b"XXYYZZWW")], b"XXAAZZCC", 2, 2,
    ),
    case(
        "spans_buffer_and_piece",
        [(0, b"AAAA"), (6, b"CC"), (2, b"XXYYZZWW")], b"AAAAYYCCWW", 2, 2,
    ),
    case("same_start_longer", [(0, b"AA"), (0, b"AABBBB")], b"AABBBB", 0, None),
    case("same_start_longer_differs", [(0, b"AA"), (0, b"XABBBB")], b"AABBBB", 1, 0),
    case("same_end_ooo", [(4, b"AAAA"), (2, b"BBBBBB"), (0, b"CC")], b"CCBBAAAA", 1, 4),
    case("one_byte_keepalive", [(0, b"AAAA"), (3, b"X"), (4, b"BB")], b"AAAABB", 1, 3),
    case(
        "three_way",
        [(4, b"CCCC"), (2, b"BBBB"), (0, b"AAAAAAAAAA")], b"AABBCCCCAA", 3, 4,
    ),
]


def run_buffer(segments: tuple[Segment, ...] | list[Segment]) -> StreamBuffer:
    sb = StreamBuffer()
    for off, data in segments:
        sb.add(off, data)
    return sb


@pytest.mark.parametrize("c", OVERLAP_TABLE, ids=lambda c: c.name)
def test_overlap_table(c: Case) -> None:
    sb = run_buffer(c.segments)
    assert bytes(sb.buf) == c.stream
    assert sb.ooo == [] and sb.ooo_bytes == 0
    assert sb.conflicts == c.conflicts
    assert sb.first_conflict == c.first_conflict


@pytest.mark.parametrize("c", OVERLAP_TABLE, ids=lambda c: c.name)
def test_overlap_table_mirrored_in_memory_accounting(c: Case) -> None:
    """`buffered` and `end` track what is held, whatever the arrival order."""
    sb = StreamBuffer()
    for off, data in c.segments:
        sb.add(off, data)
        held = len(sb.buf) + sum(len(p) for _, p in sb.ooo)
        assert sb.buffered == held
        assert sb.end == sb.base + len(sb.buf)
        starts = [s for s, _ in sb.ooo]
        assert starts == sorted(starts) == sb.ooo_starts
        for (s1, p1), (s2, _) in itertools.pairwise(sb.ooo):
            assert s1 + len(p1) <= s2, "queued pieces never overlap"
        assert not sb.ooo or sb.ooo[0][0] > sb.end


def test_bytes_below_base_are_ignored() -> None:
    sb = StreamBuffer()
    sb.add(0, b"AAAA")
    sb.consume(4)
    sb.add(0, b"XXXXCC")  # differs only below base: consumed bytes are not compared
    assert (sb.base, bytes(sb.buf), sb.conflicts) == (4, b"CC", 0)
    sb.add(2, b"ZZ")
    assert (bytes(sb.buf), sb.conflicts) == (b"CC", 0)


def test_reset_forgets_pieces_and_continues() -> None:
    sb = StreamBuffer()
    sb.add(0, b"AA")
    sb.add(10, b"QQ")
    sb.reset(10)
    assert (sb.base, bytes(sb.buf), sb.ooo, sb.buffered) == (10, b"", [], 0)
    sb.add(10, b"BB")
    assert bytes(sb.buf) == b"BB"


# --- the same tables through `colo-proxy streams` and a synthetic capture ---

CLIENT, SERVER = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
SPORT, DPORT = 40000, 80


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_frame(seq: int, flags: int, payload: bytes = b"", sport: int = SPORT) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, DPORT, seq & 0xFFFFFFFF, 0, 5 << 4, flags,
                      65535, 0, 0) + payload
    pseudo = CLIENT + SERVER + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, CLIENT, SERVER)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + ip + tcp


def connection(isn: int, segments: tuple[Segment, ...], sport: int = SPORT) -> list[bytes]:
    """A SYN with sequence number `isn`, then each segment at offset ISN + 1 + off."""
    return [tcp_frame(isn, 0x02, sport=sport)] + [
        tcp_frame(isn + 1 + off, 0x18, data, sport) for off, data in segments  # PSH|ACK
    ]


def write_capture(path: Path, isn: int, segments: tuple[Segment, ...]) -> None:
    w = PcapWriter(path)
    for i, frame in enumerate(connection(isn, segments)):
        w.write(1.0 + i, frame)
    w.close()


ISNS = [0, 1, 2**32 - 1, 2**32 - 11]


@pytest.mark.parametrize("isn", ISNS, ids=lambda i: f"isn{i}")
@pytest.mark.parametrize("c", OVERLAP_TABLE, ids=lambda c: c.name)
def test_overlap_table_through_streams(tmp_path: Path, c: Case, isn: int) -> None:
    pcap = tmp_path / "t.pcap"
    write_capture(pcap, isn, c.segments)
    index = write_streams(str(pcap), str(tmp_path / "out"))
    assert len(index) == 1
    d = index[0]
    assert (d["src"], d["sport"], d["dst"], d["dport"]) == ("10.0.0.1", SPORT, "10.0.0.2", DPORT)
    assert (tmp_path / "out" / d["file"]).read_bytes() == c.stream
    assert d["bytes"] == len(c.stream)
    assert d["conflicts"] == c.conflicts
    assert d["gaps"] == []
    assert json.loads((tmp_path / "out" / "index.json").read_text()) == index


@pytest.mark.parametrize("isn", ISNS, ids=lambda i: f"isn{i}")
def test_streams_hole_is_recorded_and_data_after_it_kept(tmp_path: Path, isn: int) -> None:
    pcap = tmp_path / "t.pcap"
    write_capture(pcap, isn, ((0, b"AAAA"), (10, b"CCCC"), (7, b"B")))
    d = write_streams(str(pcap), str(tmp_path / "out"))[0]
    assert (tmp_path / "out" / d["file"]).read_bytes() == b"AAAABCCCC"
    assert d["gaps"] == [[4, 3], [5, 2]]  # holes 4..7 and 8..10, at their output offsets


# --- properties ---

def _segmentation(data: bytes, cuts: list[int]) -> list[Segment]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [(a, data[a:b]) for a, b in itertools.pairwise(points) if b > a]


@st.composite
def resegmented(draw: st.DrawFn) -> tuple[bytes, list[Segment]]:
    """Some bytes and a shuffled cover of them, with duplicated sub-ranges."""
    data = draw(st.binary(min_size=1, max_size=300))
    segs = _segmentation(data, draw(st.lists(st.integers(0, 10_000), max_size=20)))
    for _ in range(draw(st.integers(0, 10))):
        a = draw(st.integers(0, len(data) - 1))
        b = draw(st.integers(a + 1, len(data)))
        segs.append((a, data[a:b]))  # a retransmission, possibly repacketised
    return data, draw(st.permutations(segs))


@settings(max_examples=300, deadline=None)
@given(resegmented())
def test_any_segmentation_reorder_duplication_gives_same_bytes(
    case_: tuple[bytes, list[Segment]],
) -> None:
    data, segs = case_
    sb = run_buffer(segs)
    assert bytes(sb.buf) == data
    assert (sb.ooo, sb.ooo_bytes, sb.conflicts, sb.first_conflict) == ([], 0, 0, None)


@settings(max_examples=200, deadline=None)
@given(resegmented(), st.lists(st.integers(0, 50), min_size=1, max_size=30))
def test_consuming_while_adding_gives_same_bytes(
    case_: tuple[bytes, list[Segment]], takes: list[int],
) -> None:
    """Draining like `streams` (consume what is contiguous) changes nothing."""
    data, segs = case_
    sb = StreamBuffer()
    out = bytearray()
    for i, (off, piece) in enumerate(segs):
        sb.add(off, piece)
        n = min(takes[i % len(takes)], len(sb.buf))
        out += sb.buf[:n]
        sb.consume(n)
    out += sb.buf
    assert bytes(out) == data
    assert sb.conflicts == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(resegmented(), st.data())
def test_differing_late_copy_is_a_conflict_at_its_first_differing_byte(
    case_: tuple[bytes, list[Segment]], draw: st.DataObject,
) -> None:
    data, segs = case_
    a = draw.draw(st.integers(0, len(data) - 1))
    b = draw.draw(st.integers(a + 1, len(data)))
    bad = bytearray(data[a:b])
    flips = draw.draw(st.lists(st.integers(0, len(bad) - 1), min_size=1, unique=True))
    for i in flips:
        bad[i] ^= draw.draw(st.integers(1, 255))
    at = draw.draw(st.integers(0, len(segs)))  # when the bad copy arrives ...
    covered: set[int] = set()
    for off, piece in segs[:at]:
        covered.update(range(off, off + len(piece)))
    assume(covered >= set(range(a, b)))  # ... every byte of it has a first copy already
    sb = run_buffer([*segs[:at], (a, bytes(bad)), *segs[at:]])
    assert bytes(sb.buf) == data, "the first copy wins"
    assert sb.conflicts >= 1
    assert sb.first_conflict == a + min(flips)


@st.composite
def arbitrary_segments(draw: st.DrawFn) -> list[Segment]:
    """Segments anywhere in 0..64 with bytes from a tiny alphabet (so copies often agree)."""
    n = draw(st.integers(1, 12))
    out = []
    for _ in range(n):
        off = draw(st.integers(0, 64))
        out.append((off, draw(st.binary(min_size=1, max_size=16).map(
            lambda b: bytes(x % 2 + 65 for x in b)))))
    return out


@settings(max_examples=500, deadline=None)
@given(arbitrary_segments())
def test_matches_first_copy_byte_model(segs: list[Segment]) -> None:
    """Against a per-byte model: first copy wins, first conflict = first disagreement seen."""
    model: dict[int, int] = {}
    first: int | None = None
    for off, piece in segs:
        diffs = [off + i for i, x in enumerate(piece) if model.get(off + i, x) != x]
        if diffs and first is None:
            first = min(diffs)
        for i, x in enumerate(piece):
            model.setdefault(off + i, x)
    sb = run_buffer(segs)
    n = 0
    while n in model:
        n += 1
    assert bytes(sb.buf) == bytes(model[i] for i in range(n))
    queued = {s + i: x for s, p in sb.ooo for i, x in enumerate(p)}
    assert queued == {k: v for k, v in model.items() if k >= n}
    assert sb.first_conflict == first
    assert (sb.conflicts == 0) == (first is None)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(
    arbitrary_segments().map(lambda segs: ("add", segs[0])),
    st.integers(0, 20).map(lambda n: ("consume", n)),
), min_size=1, max_size=25))
def test_matches_model_with_consumption(ops: list[tuple[str, object]]) -> None:
    """Consumed bytes are out of reach: copies below `base` are neither kept nor compared."""
    model: dict[int, int] = {}
    base = 0
    first: int | None = None
    sb = StreamBuffer()
    out = bytearray()
    for op, arg in ops:
        if op == "consume":
            assert isinstance(arg, int)
            n = min(arg, len(sb.buf))
            out += sb.buf[:n]
            sb.consume(n)
            base += n
            continue
        assert isinstance(arg, tuple)
        off, piece = arg
        diffs = [off + i for i, x in enumerate(piece)
                 if off + i >= base and model.get(off + i, x) != x]
        if diffs and first is None:
            first = min(diffs)
        for i, x in enumerate(piece):
            if off + i >= base:
                model.setdefault(off + i, x)
        sb.add(off, piece)
    end = base
    while end in model:
        end += 1
    assert sb.base == base
    assert bytes(out) + bytes(sb.buf) == bytes(model[i] for i in range(end))
    assert sb.first_conflict == first
    assert (sb.conflicts == 0) == (first is None)


@pytest.mark.parametrize("isn", ISNS, ids=lambda i: f"isn{i}")
@pytest.mark.parametrize("wild", [2**31 + 50, 2**31 - 50, 2**32 - 300])
def test_streams_one_wild_sequence_number_loses_nothing_after_it(
    tmp_path: Path, isn: int, wild: int,
) -> None:
    """A segment far outside the window must not move where the next ones land."""
    pcap = tmp_path / "t.pcap"
    segs = ((0, b"a" * 100), (wild, b"X" * 10), (100, b"b" * 100), (200, b"c" * 100))
    write_capture(pcap, isn, segs)
    d = write_streams(str(pcap), str(tmp_path / "out"))[0]
    data = (tmp_path / "out" / d["file"]).read_bytes()
    assert data[:300] == b"a" * 100 + b"b" * 100 + b"c" * 100
    assert data[300:] in (b"", b"X" * 10)


def test_streams_more_directions_than_open_files(tmp_path: Path) -> None:
    """Every direction gets its file even when the process may open only 128 files."""
    pcap = tmp_path / "many.pcap"
    w = PcapWriter(pcap)
    for k in range(300):
        w.write(1.0 + k, tcp_frame(5, 0x18, b"hello %d" % k, sport=10000 + k))
    for k in range(300):  # a second segment for each, after all files were created
        w.write(400.0 + k, tcp_frame(5 + len(b"hello %d" % k), 0x18, b"!", sport=10000 + k))
    w.close()
    out = tmp_path / "out"
    (out).mkdir()
    (out / "0000-10.0.0.1_10000-10.0.0.2_80.bin").write_bytes(b"stale")  # truncated, not kept
    script = (
        "import resource, sys\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))\n"
        "from colo_proxy.streams import write_streams\n"
        "write_streams(sys.argv[1], sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(pcap), str(out)], check=True,
                   cwd=Path(__file__).resolve().parents[2])
    index = json.loads((out / "index.json").read_text())
    assert len(index) == 300
    for d in index:
        k = d["sport"] - 10000
        assert (out / d["file"]).read_bytes() == b"hello %d!" % k


def test_streams_kept_bytes_have_a_total_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over the budget, the least recently active direction forgets its written bytes first."""
    import colo_proxy.streams as streams_mod

    monkeypatch.setattr(streams_mod, "KEEP_WRITTEN_TOTAL", 3000)
    a, b = b"a" * 2000, b"b" * 2000
    pcap = tmp_path / "t.pcap"
    w = PcapWriter(pcap)
    w.write(1.0, tcp_frame(100, 0x18, a, sport=1))
    w.write(2.0, tcp_frame(100, 0x18, b, sport=2))  # 4000 kept > 3000: sport 1 forgets
    w.write(3.0, tcp_frame(100, 0x18, b"X", sport=1))  # below base: not compared
    w.write(4.0, tcp_frame(100, 0x18, b"X", sport=2))  # still kept: a conflict
    w.close()
    index = write_streams(str(pcap), str(tmp_path / "out"))
    got = {d["sport"]: (d["bytes"], d["conflicts"]) for d in index}
    assert got == {1: (2000, 0), 2: (2000, 1)}
    monkeypatch.setattr(streams_mod, "KEEP_WRITTEN_TOTAL", 5000)
    index = write_streams(str(pcap), str(tmp_path / "out2"))
    assert {d["sport"]: d["conflicts"] for d in index} == {1: 1, 2: 1}
