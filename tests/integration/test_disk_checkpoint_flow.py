"""colo-proxy's own QMP driver (the one it uses for QEMU) drives the disk agent.

Two ``QmpDriver`` sessions, one to a real QEMU and one to the agent, and the
Remus rule: output held for epoch N goes out only when QEMU's checkpoint N has
completed (STOP then RESUME) AND the agent acknowledged epoch N.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

from colo_proxy.disk.gate import CommitGate
from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.drivers.qmp import FollowPolicy, QmpDriver
from tests.disk.agent_helpers import NbdClient, start_agent, tool

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(tool("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"),
]



def test_output_released_only_after_vm_and_disk_checkpoint(workdir: Path) -> None:
    image = workdir / "secondary.img"
    image.write_bytes(bytes(1 << 20))
    agent = start_agent(workdir, image)
    qemu_sock = workdir / "qemu.qmp"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-no-user-config", "-display",
         "none", "-qmp", f"unix:{qemu_sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not qemu_sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        nbd = NbdClient(agent.nbd)
        asyncio.run(_flow(qemu_sock, agent.qmp, nbd, image))
        nbd.close()
    finally:
        qemu.kill()
        qemu.wait(10)
        agent.kill()


async def _flow(qemu_sock: Path, agent_sock: Path, nbd: NbdClient, image: Path) -> None:
    gate = CommitGate()
    released: list[int] = []
    epoch = 0
    resumed = asyncio.Event()

    def on_done() -> None:
        resumed.set()

    vm = QmpDriver("primary", parse_endpoint(f"unix:{qemu_sock}"), follow=FollowPolicy.ALWAYS,
                   on_checkpoint_done=on_done)
    disk = QmpDriver("disk", parse_endpoint(f"unix:{agent_sock}"), follow=FollowPolicy.NONE)
    vm.start()
    disk.start()
    try:
        await asyncio.wait_for(vm.connected_event.wait(), 30)
        await asyncio.wait_for(disk.connected_event.wait(), 30)
        for epoch in (1, 2, 3):
            nbd.write(epoch * 4096, bytes([epoch]) * 4096)  # the primary's disk write
            # A checkpoint: the VM stops, the disk epoch is sealed, the VM resumes.
            resumed.clear()
            await vm.execute("stop")
            assert await disk.execute("colo-disk-checkpoint", {"epoch": epoch}) == {
                "epoch": epoch}
            out = gate.disk_acked(epoch)
            if out is not None:
                released.append(out)
            assert released == list(range(1, epoch))  # VM checkpoint not finished yet
            await vm.execute("cont")
            await asyncio.wait_for(resumed.wait(), 30)
            out = gate.memory_done(epoch)
            if out is not None:
                released.append(out)
            assert released == list(range(1, epoch + 1))
        status = await disk.execute("query-colo-disk")
        assert isinstance(status, dict) and status["epoch"] == 3
        failover = await disk.execute("colo-disk-failover")
        assert failover == {"epoch": 3}
        data = image.read_bytes()
        assert all(data[e * 4096:(e + 1) * 4096] == bytes([e]) * 4096 for e in (1, 2, 3))
    finally:
        await vm.close()
        await disk.close()
