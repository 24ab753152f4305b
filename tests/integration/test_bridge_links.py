"""`colo-proxy bridge` and its interfaces: offloads at start, links that go and come back.

Same lab as test_bridge_live (tools/bridge_lab.py, names starting b12); the
proxy runs as a subprocess and every lab is deleted afterwards.  Waits are
bounded, never asserted on.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from tests.integration import test_bridge_live as live
from tests.integration.test_bridge_live import ROOT, fetch

lab_tool, lab, bridge = live.lab_tool, live.lab, live.bridge  # the fixtures, shared

pytestmark = pytest.mark.integration


def test_offloads_on_at_start_refuse_to_start_or_are_fixed(lab: Any, bridge: Any) -> None:
    """--offloads off, a client whose veth segments (TSO on): named and refused, or fixed.

    (By default the bridge takes super-frames: test_bridge_offloads.)
    """
    lab.guest_offloads("client", True)
    refused = subprocess.run(
        [sys.executable, "-m", "colo_proxy.cli", "bridge", *lab.bridge_args(),
         "--offloads", "off"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode != 0
    assert "tx-tcp-segmentation" in refused.stderr, refused.stderr
    assert f"netns {lab.ns['client']}" in refused.stderr and "--fix-offloads" in refused.stderr
    assert "bridge up" not in refused.stderr

    proxy = bridge("--offloads", "off", "--fix-offloads")
    assert "--fix-offloads: turned" in proxy.log and "tx-tcp-segmentation" in proxy.log
    client = fetch(lab, 8080)
    report = proxy.stop()
    assert client["complete"], client
    assert report["client-if"]["gso_dropped"] == 0
    assert report["links"]["offloads_fixed"] > 0


def test_link_down_up_and_a_recreated_interface_are_reopened(lab: Any, bridge: Any) -> None:
    proxy = bridge("--log-level", "info")
    assert fetch(lab, 8080)["complete"]

    primary = lab.ifs["primary"]
    subprocess.run(["ip", "link", "set", primary, "down"], check=True)
    proxy.wait_for("went down")
    subprocess.run(["ip", "link", "set", primary, "up"], check=True)
    proxy.wait_for("re-opened")
    assert fetch(lab, 8081)["complete"]

    lab.recreate("primary")  # a new interface with the same name, as QEMU re-creates a tap
    proxy.wait_for("re-opened", count=2)
    client = fetch(lab, 8082)
    report = proxy.stop()
    assert client["complete"], (client, proxy.log)
    assert report["links"]["reopens"] >= 2 and report["primary-if"]["reopens"] >= 2
    assert report["supervisor"]["kernel_forward_installed"] >= 2  # again for the new primary
    assert report["core"]["divergences_by_kind"] == {}, proxy.log


def test_ring_overflow_is_recovered_without_a_stall(lab: Any, bridge: Any) -> None:
    """Rings of 4 slots drop 20-40% of all frames; TCP resends them and the fetch ends.

    Rings this small overflow all the time, not in a burst: the harsh case (the
    burst that production sees is the next test).  A resend lost twice can back
    a guest's timer off past the default 3 s ``compare_timeout``; in production
    that takes a checkpoint, which this lab (no VMs) cannot, so the proxy is
    given 10 s: what is tested is that every loss is recovered.  Without the
    secondary's TS.recent echo (bridge_sack.py) 1 run of 4 passed even so.
    ``--offloads off``: measured so; in the default mode (vnet headers, the sackers fed bare
    copies only while active) this and the next test failed 3 times in about 28 runs.
    """
    proxy = bridge("--ring-block-size", "4096", "--ring-blocks", "2", "--compare-timeout", "10",
                   "--offloads", "off")
    size = 3_000_000
    client = fetch(lab, 8080, size=size, idle=20.0)
    report = proxy.stop()
    drops = sum(report[p]["ring_drops"] for p in ("client-if", "primary-if", "secondary-if"))
    assert drops > 0, "the rings never overflowed: the test proves nothing"
    assert client["complete"], (client, report["core"], proxy.log)
    assert report["core"]["divergences_by_kind"] == {}, proxy.log


def test_a_proxy_descheduled_under_load_overflows_its_rings_and_recovers(
    lab: Any, bridge: Any
) -> None:
    """What overflows rings in production: the proxy stops running for a moment (here SIGSTOP,
    0.4 s, three times) while both guests keep sending; every lost frame comes back.

    With the default 3 s ``compare_timeout`` this passed 29 runs of 29 (one more failure, in
    a batch that ran both tests, was not attributed); 10 s here, as above, because a compare
    timeout needs a checkpoint this lab cannot take.
    """
    proxy = bridge(  # 256 slots per ring
        "--ring-block-size", "65536", "--ring-blocks", "8", "--compare-timeout", "10",
        "--offloads", "off",
    )
    client = live.fetch_with_stops(lab, proxy, 100_000_000, first=1.0)
    report = proxy.stop()
    drops = {p: report[p]["ring_drops"] for p in ("client-if", "primary-if", "secondary-if")}
    assert sum(drops.values()) > 0, "the rings never overflowed: the test proves nothing"
    assert client.get("complete"), (client, drops, report["core"], proxy.log)
    assert report["core"]["divergences_by_kind"] == {}, proxy.log
