"""`bridge --metrics` scraped while real Linux stacks in namespaces talk through it.

tools/bridge_lab.py's lab (names br12-014xxx-*, deleted afterwards); the secondary's
server diverges at byte 150000, so the primary's output is held and a checkpoint is
requested through the QMP of a guest-less QEMU (`-M none`); a stop/cont on a second
QMP monitor stands in for the checkpoint (`--qmp-follow always`).  A truncated
IPv4 frame sent by the primary is malformed; the guests' ARP is uncompared.
Scraped before traffic, while output is held, and after the checkpoint.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.disk.agent_helpers import start_agent
from tests.integration.qemu_helpers import needs_qemu, start_qemu
from tests.integration.test_bridge_live import SIZE, BridgeProcess, result, start_servers, stop_all
from tests.metrics_helpers import LISTED, by_name, free_port, moved, scrape
from tests.tools_loader import load_tool

pytestmark = [pytest.mark.integration, needs_qemu]
MOVING = LISTED
"""Every listed metric moves here: a real disk agent takes the checkpoint's epoch
(colo_disk_epoch), and one divergence checkpoint in a 5 s window is over the whole-VM
threshold of 0.1/s, so the VM goes to MC at that checkpoint (colo_mode)."""
SEND_TRUNCATED = (
    "import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('eth0', 0)); "
    "s.send(bytes.fromhex('ffffffffffff525400c01002' '0800' '450007d0000100004006') + bytes(40))"
)


@pytest.fixture
def lab() -> Iterator[Any]:
    tool: ModuleType = load_tool("bridge_lab")
    reason = tool.available()
    if reason is not None:
        pytest.skip(reason)
    with tool.BridgeLab(tag="014" + secrets.token_hex(2)[:3]) as built:
        yield built


def test_bridge_metrics_move(lab: Any, workdir: Path) -> None:
    qmp, op = f"{workdir}/qmp", f"{workdir}/op"
    qemu = start_qemu(workdir, [], ["-qmp", f"unix:{op},server=on,wait=off"], qmp)
    image = workdir / "disk.img"
    image.write_bytes(bytes(1 << 20))
    agent = start_agent(workdir, image)
    port = free_port()
    proxy = None
    try:
        proxy = BridgeProcess(lab, "--qmp", f"unix:{qmp}", "--qmp-follow", "always",
                              "--disk-qmp", f"unix:{agent.qmp}",
                              "--vm-window", "5", "--vm-mc-checkpoint-rate", "0.1",
                              "--min-checkpoint-interval", "0", "--metrics", str(port))
        first = scrape(port)
        servers = start_servers(lab, "tcp-server", "--size", str(SIZE), "--timeout", "20",
                                secondary=("--diverge-at", "150000"))
        sender = lab.popen("primary", ["python3", "-c", SEND_TRUNCATED])
        sender.communicate(timeout=30)
        client_proc = lab.tool("client", "tcp-client", "--host", lab.guest_ip, "--size",
                               str(SIZE), "--idle", "3")
        proxy.wait_for("divergence payload")
        held = scrape(port)

        async def checkpoint() -> None:
            opc = QMPClient("op")
            await opc.connect(op)
            await opc.execute("stop")
            await opc.execute("cont")
            await opc.disconnect()

        asyncio.run(checkpoint())
        result(client_proc)
        stop_all(servers)
        last = scrape(port)
        report = proxy.stop()
    finally:
        if proxy is not None:
            proxy.kill()
        qemu.kill()
        agent.kill()
    for name in LISTED:
        assert by_name(last, name), f"{name} missing"
    for name in MOVING:
        assert moved(first, held, name) or moved(held, last, name), f"{name} did not move"
    assert by_name(held, "colo_held_bytes")[()] > 0
    assert by_name(last, "colo_checkpoint_duration_seconds_count")[()] >= 1
    assert report["core"]["malformed"], report["core"]
    assert by_name(last, "colo_mode")[(("mode", "mc"),)] == 1
    assert by_name(last, "colo_disk_epoch")[(("state", "released"),)] >= 1
