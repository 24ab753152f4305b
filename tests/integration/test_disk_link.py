"""DiskLink against a real disk agent: output waits for the VM AND the disk epoch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.runtime.disk_link import DiskLink
from tests.disk.agent_helpers import NbdClient, start_agent

pytestmark = pytest.mark.integration



async def _until(cond: object, timeout: float = 20.0) -> None:
    async def poll() -> None:
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


def test_release_needs_both_checkpoints_and_survives_an_agent_restart(workdir: Path) -> None:
    image = workdir / "secondary.img"
    image.write_bytes(bytes(1 << 20))
    agent = start_agent(workdir, image)
    released: list[int] = []

    async def flow() -> None:
        nonlocal agent
        link = DiskLink(parse_endpoint(f"unix:{agent.qmp}"), lambda: released.append(1))
        link.start()
        try:
            await _until(lambda: link.driver.connected)
            nbd = NbdClient(agent.nbd)
            nbd.write(0, b"\x01" * 4096)
            nbd.close()
            link.vm_stopped()
            await _until(lambda: link.gate.disk_epoch == 1)
            assert released == []  # disk acknowledged, memory not yet done
            link.vm_resumed()
            assert released == [1]
            # The agent goes away: a finished VM checkpoint must not release output.
            agent.kill()
            link.vm_stopped()
            link.vm_resumed()
            await asyncio.sleep(0.3)
            assert released == [1] and link.waiting
            assert link.counters["disk_errors"] >= 1
            agent = start_agent(workdir, image)
            await _until(lambda: len(released) == 2)
            assert link.report()["agent_epoch"] == 2
            assert link.counters["agent_restarts"] == 1
        finally:
            await link.close()

    try:
        asyncio.run(flow())
    finally:
        agent.kill()
    assert image.read_bytes()[:4096] == b"\x01" * 4096
