"""`colo-proxy bridge` with offloads ON on every veth end: super-frames pass whole.

Same lab as test_bridge_live (tools/bridge_lab.py), built with
``offloads=True``: the namespaces' TCP stacks hand their veths 64 KiB TSO/GSO
super-frames with open checksums, and the bridge (``--offloads accept``, its
default) reads and sends them with their virtio_net_hdr.  Counters prove the
super-frames were there; sha256 and the servers' reports prove the bytes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from colo_proxy.drivers.afpacket import vnet_supported
from tests.integration import test_bridge_live as live
from tests.integration.test_bridge_live import ROOT, result, start_servers, stop_all

lab_tool, bridge = live.lab_tool, live.bridge  # the fixtures, shared (bridge uses our lab)

pytestmark = pytest.mark.integration

SIZE = 3_000_000
UPLOAD = 60_000
"""Within a fresh connection's receive window (64 KiB): the client follows the
primary's window, and what lies beyond the secondary's (the namespaces are not
replicas; the windows grow apart) is lost there and repaired one segment per
RTO, past the compare timeout.  600 KB failed 1 run in 2 of the whole file."""


@pytest.fixture
def lab(lab_tool: Any) -> Iterator[Any]:
    reason = lab_tool.available()
    if reason is not None:
        pytest.skip(reason)
    if not vnet_supported():
        pytest.skip("this kernel takes no virtio_net_hdr on packet rings (bridge mode then "
                    "needs offloads off)")
    with lab_tool.BridgeLab(offloads=True) as built:
        yield built


def test_bulk_fetch_with_offloads_on_passes_super_frames_whole(
    lab: Any, bridge: Any, lab_tool: Any
) -> None:
    """Every byte arrives (sha256), both guests' super-frames were compared whole."""
    proxy = bridge("--log-level", "info")
    assert "vnet_hdr: offloads accepted" in proxy.log
    servers = start_servers(lab, "tcp-server", "--size", str(SIZE), "--timeout", "30")
    client = result(lab.tool("client", "tcp-client", "--host", lab.guest_ip, "--size",
                             str(SIZE), "--sha256", "--idle", "10"))
    primary, secondary = (result(s) for s in servers)
    report = proxy.stop()
    assert client["complete"] and client["eof"], (client, proxy.log)
    assert client["sha256"] == lab_tool.stream_sha256(SIZE)
    for server in (primary, secondary):  # the secondary took the translated client ACKs
        assert server["sent"] == SIZE and server["eof"] and server["unacked"] == 0, server
    for guest in ("primary-if", "secondary-if"):
        assert report[guest]["super_frames_in"] > 0, report[guest]
        assert report[guest]["gso_dropped"] == 0 and report[guest]["truncated_dropped"] == 0
    # the released super-frames left whole, and far fewer frames than 1448-byte segments
    assert report["client-if"]["super_frames_out"] > 0
    assert report["primary-if"]["frames_in"] < SIZE // 1448
    core = report["core"]
    assert core["divergences_by_kind"] == {}, proxy.log
    assert core["released_payload_bytes"] >= SIZE and core["held_frames"] == 0
    assert report["client-if"]["send_oversize"] == 0 and report["client-if"]["send_errors"] == 0


def test_a_divergence_inside_a_super_frame_is_detected(lab: Any, bridge: Any) -> None:
    """One flipped byte in the secondary's stream, in the middle of a super-frame."""
    diverge_at = 1_500_000
    proxy = bridge()
    servers = start_servers(
        lab, "tcp-server", "--size", str(SIZE), "--timeout", "20",
        secondary=("--diverge-at", str(diverge_at)),
    )
    client = result(lab.tool("client", "tcp-client", "--host", lab.guest_ip, "--size",
                             str(SIZE), "--idle", "3"))
    report = proxy.stop()
    stop_all(servers)
    assert client["prefix_ok"] and not client["complete"], client
    assert 0 < client["received"] <= diverge_at  # the diverging byte never reached the client
    assert report["secondary-if"]["super_frames_in"] > 0
    assert report["primary-if"]["super_frames_in"] > 0
    core = report["core"]
    assert core["divergences_by_kind"].get("payload", 0) >= 1, proxy.log
    # reported at the flipped byte, though it sits inside a 64 KiB frame
    assert f"at offset {diverge_at}" in proxy.log, proxy.log
    assert report["shutdown"]["held_frames_at_stop"] > 0


@pytest.mark.parametrize("client_offloads", [True, False], ids=["open-csum", "full-csum"])
def test_client_uploads_reach_the_secondary_translated(
    lab: Any, bridge: Any, lab_tool: Any, client_offloads: bool
) -> None:
    """Client -> guests with the guests' offloads on: the rewriter's frames are taken.

    open-csum: the client's frames carry open checksums (and are super-frames);
    the rewriter shifts their ack/SACK/TSecr and leaves the field as it is.
    full-csum: the client's offloads are off; the checksum is updated.  Either
    way the secondary's kernel must accept every translated frame: it gets
    every byte (sha256) and the connection closes cleanly on both guests.
    Checksums are really checked: the guests' host ends do not offload them
    (the kernel completes an open one from the field's seed, segmenting
    super-frames first) and each guest's eth0 verifies every one it gets
    (rx-checksum off; GRO off too, as veth's GRO re-merges those segments and
    was seen to deliver a burst's last segment first).  Both guests alike: a
    secondary whose receive window grew slower than the primary's (the client
    follows the primary's) drops what is beyond it, a loss the client repairs
    one segment per RTO (compare timeout), which is not what this test is about.
    """
    if not client_offloads:
        lab.guest_offloads("client", False)
        lab_tool.offloads_off(lab.ifs["client"], False)
    for role in ("primary", "secondary"):
        lab_tool.set_features(lab.ifs[role], ("tx-checksum",), False)
        lab.guest_offloads(role, False, "rx-checksum", "rx-gro")
    proxy = bridge()
    servers = start_servers(lab, "tcp-sink", "--timeout", "30")
    client = result(lab.tool("client", "tcp-upload", "--host", lab.guest_ip, "--size",
                             str(UPLOAD)))
    primary, secondary = (result(s) for s in servers)
    report = proxy.stop()
    want = f"{UPLOAD} {lab_tool.stream_sha256(UPLOAD)}"
    assert client.get("answer") == want, (client, proxy.log)
    for server in (primary, secondary):
        assert server["received"] == UPLOAD and server["unacked"] == 0, server
        assert server["sha256"] == lab_tool.stream_sha256(UPLOAD)
    rewriter = report["rewriter"]
    assert rewriter["rewritten_frames"] > 0 and rewriter["ended_rst"] == 0
    if client_offloads:
        assert report["client-if"]["super_frames_in"] > 0
        assert rewriter["partial_checksums"] > 0
    else:
        assert report["client-if"]["super_frames_in"] == 0
        assert rewriter["partial_checksums"] == 0
    assert report["core"]["divergences_by_kind"] == {}, proxy.log


def test_offloads_off_mode_still_refuses_super_frames(lab: Any) -> None:
    """``--offloads off`` is the old behaviour: with TSO on it names the feature and stops."""
    refused = subprocess.run(
        [sys.executable, "-m", "colo_proxy.cli", "bridge", *lab.bridge_args(), "--offloads",
         "off"], cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode != 0
    assert "tx-tcp-segmentation" in refused.stderr and "--fix-offloads" in refused.stderr
    assert "bridge up" not in refused.stderr


def test_a_recreated_interface_is_reopened_taking_super_frames(lab: Any, bridge: Any,
                                                                lab_tool: Any) -> None:
    """A re-created primary veth (offloads on again) is re-checked and re-opened with vnet."""
    proxy = bridge("--log-level", "info")
    lab.recreate("primary")  # as QEMU re-creates a tap: a new index, its offloads on
    proxy.wait_for("re-opened")
    servers = start_servers(lab, "tcp-server", "--size", str(SIZE), "--timeout", "30")
    client = result(lab.tool("client", "tcp-client", "--host", lab.guest_ip, "--size",
                             str(SIZE), "--sha256", "--idle", "10"))
    stop_all(servers)
    report = proxy.stop()
    assert client["complete"] and client["sha256"] == lab_tool.stream_sha256(SIZE), client
    reopened = [line for line in proxy.lines
                if "primary-if:" in line and "vnet_hdr: offloads accepted" in line]
    assert len(reopened) >= 2, proxy.log  # at start, and again at each re-open
    assert report["primary-if"]["reopens"] >= 1 and report["links"]["offloads_left_on"] == 0
    assert report["primary-if"]["super_frames_in"] > 0
    assert report["core"]["divergences_by_kind"] == {}, proxy.log


@pytest.mark.xfail(
    reason="4-slot rings under a 30 MB fetch of super-frames: 3 of 6 runs completed before "
    "the client probes were cut to one byte, 34 of 36 after; the 2 others ended in a compare "
    "timeout (10 s) with a hole in the secondary's stream that the captures did not explain "
    "(docs/bench-issue12.md)",
    strict=False,
)
def test_ring_overflow_with_super_frames_is_recovered(lab: Any, bridge: Any) -> None:
    """test_bridge_links' ring-overflow case with offloads on: 4-slot rings (super-frames
    come whole through the socket queue behind their slot); every loss is recovered
    (compare timeout 10 s, as there).  30 MB: a 3 MB fetch of super-frames overflowed
    the rings in only some runs, and then proved nothing."""
    proxy = bridge("--ring-block-size", "4096", "--ring-blocks", "2", "--compare-timeout", "10")
    client = live.fetch(lab, 8080, size=30_000_000, idle=20.0)
    report = proxy.stop()
    drops = sum(report[p]["ring_drops"] for p in ("client-if", "primary-if", "secondary-if"))
    assert drops > 0, "the rings never overflowed: the test proves nothing"
    assert client["complete"], (client, report["core"], proxy.log)
    assert report["primary-if"]["super_frames_in"] > 0
    assert report["core"]["divergences_by_kind"] == {}, proxy.log


@pytest.mark.xfail(
    reason="with 8-slot rings and three 0.4 s SIGSTOPs under a 400 MB fetch of super-frames, "
    "2 of 6 runs completed (one stall looked at: 371.7 MB, then 20 s of silence), and 3 "
    "of 4 since the client probes are cut to one byte (a probe of a super-frame was refused "
    "as oversize). With the default rings (8,192 slots) or 256 slots nothing "
    "overflows at all under the same stops: the window in flight is a few hundred "
    "super-frames (docs/bench-issue12.md, bridge12c)",
    strict=False,
)
def test_a_stopped_proxy_loses_super_frames_and_recovers(lab: Any, bridge: Any) -> None:
    """The production case with offloads on: the proxy stops three times for 0.4 s under a
    fetch (SIGSTOP) while the guests keep sending super-frames; every loss comes back.
    Rings of 8 slots: with 256 (test_bridge_links' size) nothing overflows."""
    proxy = bridge("--ring-block-size", "8192", "--ring-blocks", "2", "--compare-timeout", "10")
    client = live.fetch_with_stops(lab, proxy, 400_000_000, first=0.3)
    report = proxy.stop()
    lost = {p: report[p]["ring_drops"] + report[p]["truncated_dropped"]
            for p in ("client-if", "primary-if", "secondary-if")}
    assert sum(lost.values()) > 0, "nothing overflowed: the test proves nothing"
    assert client.get("complete"), (client, lost, report["core"], proxy.log)
    assert report["primary-if"]["super_frames_in"] > 0
    assert report["core"]["divergences_by_kind"] == {}, proxy.log
