"""`run --metrics` scraped while real QEMU netfilters carry frames through the proxy.

The topology of test_qemu_run.py (one guest-less QEMU plays both guests and the
client): one agreeing flow, one whose secondary differs (held, divergence,
checkpoint request, a stop/cont standing in for the checkpoint), a truncated
IPv4 datagram (malformed) and an ARP frame (uncompared).  Scraped before
traffic, while the diverging flow is held, and after the checkpoint: every listed metric is there,
and each one the scenario drives moves.  The same run saves the divergence
(--save-divergences) and logs JSON lines (--log-format json).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from colo_proxy.cli import main
from tests.integration.qemu_helpers import needs_qemu, recv_netdev_frames, send_netdev_frames
from tests.integration.test_qemu_run import chain, guest_tcp_output
from tests.metrics_helpers import LISTED, by_name, free_port, moved, scrape

pytestmark = [pytest.mark.integration, needs_qemu]
scapy_all = pytest.importorskip("scapy.all")

# Driven by this scenario; colo_mode (no VM switch here) and colo_disk_epoch (no disk agent
# here) are only checked to be present: test_qemu_policy.py scrapes colo_mode moving from colo
# to mc, and test_qemu_run_disk.py colo_disk_epoch moving with the disk agent's epoch.
MOVING = [m for m in LISTED if m not in ("colo_mode", "colo_disk_epoch")]


def test_run_metrics_move_and_divergence_is_saved(workdir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    payload = bytes(i % 251 for i in range(20 * 1000))
    good = guest_tcp_output(40000, payload, 1000)
    bad_pri = guest_tcp_output(40001, payload, 1000)
    diverged = bytearray(payload)
    diverged[12345] ^= 0xFF
    bad_sec = guest_tcp_output(40001, bytes(diverged), 1000)
    # An IPv4 header claiming 2000 bytes in a short frame (QEMU pads runts to 60 bytes).
    runt = (bytes.fromhex("020000000002020000000001") + b"\x08\x00"
            + bytes.fromhex("450007d0000100004006") + bytes(10))
    arp = bytes(scapy_all.Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff")
                / scapy_all.ARP(psrc="10.0.0.1", pdst="10.0.0.2"))
    port = free_port()
    saved = workdir / "divs"
    args = ["--qmp-follow", "always", "--qmp-request-timeout", "60",
            "--min-checkpoint-interval", "0", "--log-level", "info", "--log-format", "json",
            "--metrics", f"127.0.0.1:{port}", "--save-divergences", str(saved)]
    scrapes = []
    with chain(workdir, False, args) as ch:
        client = ch.qemu.ports["c0"]

        async def scenario() -> None:
            scrapes.append(await asyncio.to_thread(scrape, port))
            await asyncio.to_thread(send_netdev_frames, ch.qemu.ports["s0"], good + bad_sec)
            await asyncio.to_thread(send_netdev_frames, ch.qemu.ports["p0"],
                                    good + bad_pri + [runt, arp])
            first = len(good) + 2 + 12 + 2  # + the runt and the ARP, passed through
            await asyncio.to_thread(recv_netdev_frames, client, first)
            scrapes.append(await asyncio.to_thread(scrape, port))  # the flow is held
            opc = QMPClient("op")
            await opc.connect(ch.op_qmp)
            await opc.execute("stop")
            await opc.execute("cont")
            await opc.disconnect()
            await asyncio.to_thread(recv_netdev_frames, client, len(bad_pri) - 14)
            scrapes.append(await asyncio.to_thread(scrape, port))

        asyncio.run(scenario())
        report = ch.stop_proxy()
    first, held, last = scrapes
    for name in LISTED:
        assert by_name(last, name), f"{name} missing"
    for name in MOVING:
        assert moved(first, held, name) or moved(held, last, name), f"{name} did not move"
    assert by_name(held, "colo_held_frames")[()] > 0 == by_name(last, "colo_held_frames")[()]
    assert by_name(last, "colo_frames_total")[(("side", "primary"),)] == len(good) + len(
        bad_pri) + 2
    assert by_name(last, "colo_divergences_total") == {(("kind", "payload"),): 1.0}
    assert by_name(last, "colo_checkpoint_duration_seconds_count")[()] == 1
    assert report["saved_divergences"]["saved"] == 1
    logs = [json.loads(x) for x in report["stderr"].splitlines() if x.startswith('{"time"')]
    assert any(x["message"].startswith("divergence payload") for x in logs)
    # The saved pair: explain finds the differing byte in it, replay reads it.
    (case,) = sorted(saved.iterdir())
    assert main(["explain", str(case), "--color", "never"]) == 0
    text = capsys.readouterr().out
    assert "payload at offset 12345" in text and "frame #" in text
    assert main(["replay", str(case / "primary.pcap"), str(case / "secondary.pcap"),
                 "--json"]) == 0
    replayed = json.loads(capsys.readouterr().out)
    # The pair holds what had arrived when the divergence was found.  On a loaded machine
    # the secondary's later segments may not have arrived yet: the cut secondary then ends
    # early and replay also reports the primary's bytes past that end (CI saw 14000).
    offsets = [d["offset"] for d in replayed["divergences"]]
    assert offsets[0] == 12345 and all(o > 12345 for o in offsets[1:]), offsets
