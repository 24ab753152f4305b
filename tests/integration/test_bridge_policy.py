# ruff: noqa: F811 - pytest fixtures imported from test_bridge_live are parameters here
"""The early notice in bridge mode, between real Linux stacks in namespaces.

When a resync is due but the rate limit holds the checkpoint back, the
bridge stops forwarding the client's input to the secondary (its state is
about to be replaced) and the core drops the secondary's output and holds
the primary's, compared or not, until the checkpoint.  A guest-less QEMU
gives the bridge a QMP whose `stop`/`cont` (followed with `--qmp-follow
always`) stands in for the checkpoints.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.integration.qemu_helpers import needs_qemu, start_qemu
from tests.integration.test_bridge_live import (  # noqa: F401 - fixtures
    bridge,
    lab,
    lab_tool,
    result,
    start_servers,
    stop_all,
)

pytestmark = [pytest.mark.integration, needs_qemu]

SIZE = 200_000


async def stop_cont(qmp: str) -> None:
    """On the operator's own QMP socket (the bridge holds the other one)."""
    client = QMPClient("op")
    await asyncio.wait_for(client.connect(qmp), 20)
    await client.execute("stop")
    await client.execute("cont")
    await client.disconnect()


def diverging_fetch(lab: Any, port: int) -> dict[str, Any]:
    servers = start_servers(lab, "tcp-server", "--size", str(SIZE), "--port", str(port),
                            "--timeout", "20", secondary=("--diverge-at", "50000"))
    client = result(lab.tool("client", "tcp-client", "--host", lab.guest_ip, "--size",
                             str(SIZE), "--port", str(port), "--idle", "2"))
    stop_all(servers)
    return client


def test_early_notice_withholds_the_secondarys_input(lab: Any, bridge: Any,
                                                      tmp_path: Path) -> None:
    qmp, op = str(tmp_path / "qmp"), str(tmp_path / "op")
    qemu = start_qemu(tmp_path, [], ["-qmp", f"unix:{op},server=on,wait=off"], qmp)
    try:
        proxy = bridge("--qmp", f"unix:{qmp}", "--qmp-follow", "always",
                       "--min-checkpoint-interval", "60", "--flow-divergence-limit", "99",
                       "--mode", "colo", "--log-level", "info")
        first = diverging_fetch(lab, 7001)
        assert first["prefix_ok"] and not first["complete"], first
        proxy.wait_for("checkpoint wanted")
        asyncio.run(stop_cont(op))  # the checkpoint: the rate limit now holds for 60 s
        second = diverging_fetch(lab, 7002)
        report = proxy.stop()
    finally:
        qemu.kill()
    assert second["prefix_ok"], second
    core = report["core"]
    assert core["divergences_by_kind"].get("payload", 0) >= 2, proxy.log
    assert core["policy"]["early_notices"] == 1
    assert core["checkpoint_state"] == "deferred"
    assert report["supervisor"]["secondary_input_withheld"] > 0
    # the kernel's copy of untranslated frames to the secondary: on at start, off at the notice
    assert report["supervisor"]["kernel_mirror_changes"] == 2, proxy.log
    assert core["secondary_frames_dropped_uncompared_mode"] > 0
    assert report["shutdown"]["held_frames_at_stop"] > 0  # held for the deferred checkpoint
