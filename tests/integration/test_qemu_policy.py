"""`colo-proxy run` with the hybrid policy against a real QEMU (issue: per-flow COLO/MC).

The same topology as test_qemu_run.py (one guest-less QEMU plays primary,
secondary and client).  In MC the proxy sets QEMU's checkpoint period through
QMP (`x-checkpoint-delay`), holds every flow's output, and releases it on
the checkpoint's STOP/RESUME (a `stop`/`cont`, followed with
`--qmp-follow always`, stands in for it).  In auto mode a storm of divergent
flows moves the VM to MC, which is seen in QEMU's parameter.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from tests.integration.qemu_helpers import needs_qemu, recv_netdev_frames, send_netdev_frames
from tests.integration.test_qemu_run import chain, guest_tcp_output
from tests.metrics_helpers import by_name, free_port, scrape

pytestmark = [pytest.mark.integration, needs_qemu]


async def checkpoint_delay(qmp: str) -> int:
    client = QMPClient("probe")
    await client.connect(qmp)
    try:
        params = await client.execute("query-migrate-parameters")
        assert isinstance(params, dict)
        return int(params["x-checkpoint-delay"])
    finally:
        await client.disconnect()


async def stop_cont(qmp: str) -> None:
    client = QMPClient("op")
    await client.connect(qmp)
    await client.execute("stop")
    await client.execute("cont")
    await client.disconnect()


async def wait_delay(qmp: str, want: int, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while await checkpoint_delay(qmp) != want:
        assert time.monotonic() < deadline, f"x-checkpoint-delay never became {want}"
        await asyncio.sleep(0.1)


def test_forced_mc_sets_the_period_and_releases_on_checkpoint(workdir: Path) -> None:
    payload = bytes(i % 251 for i in range(8000))
    frames = guest_tcp_output(40100, payload, 1000)
    args = ["--qmp-follow", "always", "--mode", "mc", "--mc-period", "0.25",
            "--min-checkpoint-interval", "0", "--log-level", "info"]  # fmt: skip
    with chain(workdir, False, args) as ch:
        client = ch.qemu.ports["c0"]

        async def scenario() -> None:
            await wait_delay(ch.op_qmp, 250)
            await asyncio.to_thread(send_netdev_frames, ch.qemu.ports["s0"], frames)
            await asyncio.to_thread(send_netdev_frames, ch.qemu.ports["p0"], frames)
            with pytest.raises(TimeoutError):  # held: MC releases only at a checkpoint
                await asyncio.to_thread(recv_netdev_frames, client, 1, 1.5)
            await stop_cont(ch.op_qmp)
            got = await asyncio.to_thread(recv_netdev_frames, client, len(frames))
            assert got == frames

        asyncio.run(scenario())
        report = ch.stop_proxy()
    assert report["primary-qmp"]["period_changes"] >= 1
    assert report["primary-qmp"]["checkpoint_period_ms"] == 250
    policy = report["core"]["policy"]
    assert policy["vm_mode"] == "mc" and policy["forced"] == "mc"
    assert report["core"]["divergences_by_kind"] == {}
    assert report["outdev"]["frames_out"] == len(frames)


def test_auto_moves_to_mc_on_a_divergence_storm(workdir: Path) -> None:
    payload = bytes(i % 251 for i in range(3000))
    port = free_port()
    args = ["--qmp-follow", "always", "--mode", "auto", "--vm-window", "0.5",
            "--vm-mc-checkpoint-rate", "1", "--flow-divergence-limit", "99",
            "--mc-period", "0.3", "--min-checkpoint-interval", "0",
            "--metrics", f"127.0.0.1:{port}", "--log-level", "info"]  # fmt: skip
    modes = []
    with chain(workdir, False, args) as ch:

        async def scenario() -> None:
            modes.append(by_name(await asyncio.to_thread(scrape, port), "colo_mode"))
            operator = await checkpoint_delay(ch.op_qmp)
            for i in range(12):
                bad = bytearray(payload)
                bad[100] ^= 0xFF
                pri = guest_tcp_output(40200 + i, payload, 1000)
                sec = guest_tcp_output(40200 + i, bytes(bad), 1000)
                await asyncio.to_thread(send_netdev_frames, ch.qemu.ports["s0"], sec)
                await asyncio.to_thread(send_netdev_frames, ch.qemu.ports["p0"], pri)
                await asyncio.sleep(0.1)
                await stop_cont(ch.op_qmp)
                if await checkpoint_delay(ch.op_qmp) == 300:
                    break
            await wait_delay(ch.op_qmp, 300)
            assert operator != 300
            modes.append(by_name(await asyncio.to_thread(scrape, port), "colo_mode"))

        asyncio.run(scenario())
        report = ch.stop_proxy()
    policy = report["core"]["policy"]
    assert policy["vm_mode"] == "mc" and policy["switches"] >= 1
    assert "mode switch: vm colo -> mc" in report["stderr"]
    assert modes[0][(("mode", "colo"),)] == 1 and modes[0][(("mode", "mc"),)] == 0
    assert modes[1][(("mode", "mc"),)] == 1 and modes[1][(("mode", "colo"),)] == 0


def test_dirty_rate_is_measured_through_qmp(workdir: Path) -> None:
    args = ["--qmp-follow", "always", "--vm-max-dirty-rate", "500", "--vm-window", "0.3",
            "--log-level", "info"]  # fmt: skip
    with chain(workdir, False, args) as ch:
        time.sleep(4.0)  # a measurement takes 1 s of QEMU's own sampling
        report = ch.stop_proxy()
    assert isinstance(report["core"]["policy"]["dirty_rate"], float)
    assert "dirty-rate measurement unavailable" not in report["stderr"]
