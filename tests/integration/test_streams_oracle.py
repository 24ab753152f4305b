"""`colo-proxy streams` against Wireshark's Follow TCP Stream on real captures.

Every capture below is reassembled by us and by tshark (shared/realpcaps/oracle_follow.py,
through tools/check_streams.py) and every TCP direction must be byte-for-byte equal,
except the differences listed per capture, each with its documented cause:

  unacked-hole    Wireshark drops everything queued after a hole that is never filled
                  and never ACKed; we write it after a recorded gap.  Checked
                  mechanically by the tool (the oracle is a prefix of ours ending exactly
                  at one of our gaps); listed here as a count per capture.
  ip-truncated    an IP datagram is longer than the captured frame (snaplen cut, or a
                  total length beyond the frame): we drop the segment like a receiver
                  (Linux ip_rcv_core); Wireshark keeps the captured bytes.
  ooo-precedence  a hole is filled by a segment covering an earlier-queued out-of-order
                  segment with different bytes: Wireshark delivers the in-order segment
                  whole, we keep the first copy to arrive (and count a conflict).
  frag-overlap    overlapping IP fragments with different bytes: Wireshark keeps the
                  lower-offset fragment, we keep the first to arrive.
  tunnel-gtp      TCP inside GTP-U: Wireshark decodes it, streams does not.

The overlap tables of tests/core/test_reassembly.py are also compared with Wireshark, at
ISNs 0, 1, 2**32-1 and 2**32-11 (no real capture wraps the sequence space).

The captures are not part of the repository: CI puts shared/ beside the clone.  The
conflict counts are also checked against the independent byte-level triage in
shared/realpcaps/triage.tsv (column conflict_segments).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from colo_proxy.drivers.pcap import PcapWriter
from tests.core.test_reassembly import ISNS, OVERLAP_TABLE, connection
from tests.tools_loader import load_tool

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
REALPCAPS = REPO.parent / "shared" / "realpcaps"
ORACLE = REALPCAPS / "oracle_follow.py"

if shutil.which("tshark") is None:
    pytest.skip("tshark is not installed", allow_module_level=True)
if not ORACLE.is_file():
    pytest.skip(f"real captures not found at {REALPCAPS}", allow_module_level=True)


tool = load_tool("check_streams")

# capture -> {direction row name: reason}: the tool's own list of documented
# differences (reasons in tools/check_streams.py); every other direction must be equal.
DIFFERS: dict[str, dict[str, str]] = tool.KNOWN

# capture -> number of directions the tool explains as unacked-hole
UNACKED_HOLES: dict[str, int] = {"ndpi__skype.pcap": 29}

# capture -> why our conflict count differs from triage.tsv
CONFLICTS_DIFFER: dict[str, str] = {
    "zeek__tcp_reassembly.pcap": "ip-truncated: 5 segments dropped change the overlaps",
}

# (capture, number of matched directions): all 50 captures, ~25 s in total on 2 cores
FILES: list[tuple[str, int]] = [
    ("gopacket__test301.pcapng", 2),
    ("ndpi__1kxun.pcap", 52),
    ("ndpi__6in4tunnel.pcap", 8),
    ("ndpi__ajp.pcap", 4),
    ("ndpi__dns_fragmented.pcap", 4),
    ("ndpi__http_ipv6.pcap", 14),
    ("ndpi__ip_fragmented_garbage.pcap", 6),
    ("ndpi__ja3_lots_of_cipher_suites.pcap", 2),
    ("ndpi__no_sni.pcap", 15),
    ("ndpi__reasm_crash_anon.pcapng", 2),
    ("ndpi__reasm_segv_anon.pcapng", 1),
    ("ndpi__skype.pcap", 177),
    ("ndpi__teams.pcap", 81),
    ("ndpi__whatsapp_voice_and_message.pcap", 10),
    ("pathspider__tfo_data_on_syn.pcap", 2),
    ("python3-dpkt__http.pcap", 4),
    ("ruby-pcaprub__telnet-raw.pcap.gz", 2),
    ("sv__bug-6887-defrag-eth-vlan-ipv4-tcp-syn_frag-eth-vlan-ip-tcp-syn.pcap", 0),
    ("sv__bug-6887-defrag-eth-vlan-ipv6-tcp_frag-eth-vlan-ipv6-tcp.pcap", 1),
    ("sv__eve-payload-01-tcp-exact-overlap_tcp-overlap.pcap", 1),
    ("sv__eve-payload-04-partial-overlap_tcp-overlap2.pcap", 1),
    ("sv__eve-payload-05-tcp-data-gap_tcp-simple-gap2.pcap", 1),
    ("sv__eve-payload-06-tcp-data-leading-gap_tcp-leading-gap.pcap", 1),
    ("sv__tcp-fastopen-07_tcp_fastopen_segmentation.pcap", 4),
    ("sv__tcp-split-handshake-01-4whs_split-handshake-4whs.pcap", 1),
    ("sv__tcp-stream-after-swap_http-start-from-response.pcap", 2),
    ("sv__tcp-urgp-01-oob_tcp-urgent1.pcap", 2),
    ("tcpflow__bug3.pcap", 1),
    ("tcpflow__jpegs.cap", 38),
    ("tcpflow__test1.pcap", 4),
    ("tcpflow__test2.pcap", 2),
    ("tcpflow__test3.pcap", 2),
    ("wireshark__challenge01_ooo_stream.pcapng.gz", 2),
    ("wireshark__dns-ooo.pcap", 1),
    ("wireshark__http-ooo.pcap", 1),
    ("wireshark__http-ooo2.pcap", 1),
    ("wireshark__http2_follow_multistream.pcapng", 2),
    ("wireshark__retrans-tls.pcap", 1),
    ("wireshark__tcp-badsegments.pcap", 1),
    ("zeek__http_206_example_b.pcap", 4),
    ("zeek__ipv4_fragmented-4.pcap", 1),
    ("zeek__tcp_ctu-64702-888.pcap", 1),
    ("zeek__tcp_handshake-reorder.pcap", 2),
    ("zeek__tcp_miss_end_data.pcap", 1),
    ("zeek__tcp_missing-syn.pcap", 2),
    ("zeek__tcp_qi_internet_SYNACK_curl_jsonip.pcap", 2),
    ("zeek__tcp_reassembly.pcap", 1),
    ("zeek__tcp_ssh-dups.pcap", 2),
    ("zeek__tcp_tcp-fast-open.pcap", 4),
    ("zeek__tcp_timestamp.pcap", 1),
]


def _triage() -> dict[str, int]:
    path = REALPCAPS / "triage.tsv"
    if not path.is_file():
        return {}
    with path.open() as f:
        return {r["file"]: int(r["conflict_segments"]) for r in csv.DictReader(f, delimiter="\t")}


TRIAGE = _triage()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "directions"), FILES, ids=[f for f, _ in FILES])
def test_streams_match_wireshark_follow(name: str, directions: int) -> None:
    pcap = REALPCAPS / name
    assert pcap.is_file(), f"{pcap} is listed but missing"
    res = tool.check(pcap, ORACLE)
    assert res.error is None, res.error
    report = "\n".join(r.describe() for r in res.rows if r.status != "equal")
    assert len(res.rows) == directions, report
    auto = [r for r in res.rows if r.status != "equal" and r.explanation == "unacked-hole"]
    assert len(auto) == UNACKED_HOLES.get(name, 0), report
    differing = {r.name: r for r in res.rows if r.status != "equal" and r.explanation is None}
    expected = DIFFERS.get(name, {})
    assert sorted(differing) == sorted(expected), report
    for row in res.rows:
        if row.status == "equal":
            assert row.ours is not None and row.oracle is not None
            assert row.ours.data == row.oracle.data


@pytest.mark.parametrize(("name", "directions"), FILES, ids=[f for f, _ in FILES])
def test_conflicts_match_triage(name: str, directions: int, tmp_path: Path) -> None:
    if name not in TRIAGE:
        pytest.skip("triage.tsv not available")
    if name in CONFLICTS_DIFFER:
        pytest.skip(CONFLICTS_DIFFER[name])
    from colo_proxy.streams import write_streams

    index = write_streams(str(REALPCAPS / name), str(tmp_path))
    assert sum(d["conflicts"] for d in index) == TRIAGE[name]


# Overlap-table cases where a segment filling a hole covers differing queued bytes.
OOO_PRECEDENCE_CASES = {
    "partial_before_ooo", "containing_ooo", "spans_two_pieces", "spans_buffer_and_piece",
    "same_end_ooo", "three_way",
}


def test_overlap_tables_and_wraparound_match_wireshark(tmp_path: Path) -> None:
    """All table cases at all ISNs in one capture (one tshark run), one port per case."""
    pcap = tmp_path / "tables.pcap"
    ports: dict[int, tuple[str, int]] = {}
    w = PcapWriter(pcap)
    t = 1.0
    for c in OVERLAP_TABLE:
        for isn in ISNS:
            sport = 20000 + len(ports)
            ports[sport] = (c.name, isn)
            for frame in connection(isn, c.segments, sport):
                w.write(t, frame)
                t += 0.001
    w.close()
    res = tool.check(pcap, ORACLE)
    assert res.error is None, res.error
    assert sorted(r.key[1] for r in res.rows) == sorted(ports)
    for row in res.rows:
        name, isn = ports[row.key[1]]
        assert row.ours is not None and row.oracle is not None, (name, isn, row.describe())
        expected = next(c for c in OVERLAP_TABLE if c.name == name).stream
        assert row.ours.data == expected, (name, isn)
        if name in OOO_PRECEDENCE_CASES:
            assert row.status == "differ" and row.ours.conflicts > 0, (name, isn)
        else:
            assert row.status == "equal", (name, isn, row.describe())
