"""Supervisor wiring with --disk-qmp, against scripted QMP servers (no QEMU, no agent).

The scripted primary sends STOP/RESUME when the test says so; the scripted
disk agent acknowledges ``colo-disk-checkpoint`` at once or only when the
test releases it, so both orders of the Remus rule are driven exactly.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import pytest

from colo_proxy.core.config import Config
from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.drivers.qmp import FollowPolicy
from colo_proxy.runtime import run_cli
from colo_proxy.runtime.supervisor import RunSettings, ShutdownMode, Supervisor
from tests.drivers.test_supervisor import segments
from tests.fakes import FakeDiskAgent, FakeQmp, RecordPeer, until


def diverging(dport: int) -> tuple[list[bytes], list[bytes], int]:
    """Primary and secondary output of one flow differing at byte 500; frames before it."""
    payload = bytes(range(256)) * 4
    bad = bytearray(payload)
    bad[500] ^= 1
    return segments(payload, dport), segments(bytes(bad), dport), 1 + 5


def disk_supervisor(sockdir: Path, disk_socket: str) -> Supervisor:
    """A supervisor on sockdir's chardevs with QMP (following every STOP) and a disk agent."""
    settings = RunSettings(
        primary_in=parse_endpoint(f"unix:{sockdir}/pin,server"),
        secondary_in=parse_endpoint(f"unix:{sockdir}/sin,server"),
        outdev=parse_endpoint(f"unix:{sockdir}/out,server"),
        notify_dev=parse_endpoint(f"unix:{sockdir}/ntf,server"),
        qmp=parse_endpoint(f"unix:{sockdir}/qmp"),
        disk_qmp=parse_endpoint(f"unix:{sockdir}/{disk_socket}"),
        qmp_follow=FollowPolicy.ALWAYS,
        on_shutdown=ShutdownMode.REPORT,
    )
    return Supervisor(Config(compare_timeout=60.0, min_checkpoint_interval=0.0), settings)

def test_release_waits_for_resume_and_disk_ack_in_either_order(sockdir: Path) -> None:
    pri_a, sec_a, before_a = diverging(40000)
    pri_b, sec_b, before_b = diverging(40001)

    async def main() -> None:
        primary, disk = FakeQmp(), FakeDiskAgent()
        servers = [
            await asyncio.start_unix_server(primary.serve, f"{sockdir}/qmp"),
            await asyncio.start_unix_server(disk.serve, f"{sockdir}/disk"),
        ]
        sup = disk_supervisor(sockdir, "disk")
        await sup.start()
        link, qmp = sup.disk_link, sup.qmp
        assert link is not None and qmp is not None
        peer = RecordPeer(sockdir, False)
        await peer.connect()
        await until(lambda: link.driver.connected and qmp.connected, "both QMP sessions")

        # epoch 1, memory first: the RESUME alone releases nothing
        peer.sin.write(peer.frames(sec_a))
        await until(lambda: sup.secondary_in.frames_in == len(sec_a), "secondary a")
        peer.pin.write(peer.frames(pri_a))
        await until(lambda: sup.proxy.held_frames() == len(pri_a) - before_a, "a held")
        disk.hold = True
        primary.event("STOP")
        await until(lambda: len(disk.held) == 1, "disk checkpoint sent")
        primary.event("RESUME")
        await until(lambda: qmp.stats.checkpoints_done == 1, "RESUME followed")
        assert sup.proxy.held_frames() == len(pri_a) - before_a
        assert link.waiting and sup.outdev.frames_out == before_a

        # output of the next epoch arrives meanwhile: deferred, not released with epoch 1
        peer.sin.write(peer.frames(sec_b))
        peer.pin.write(peer.frames(pri_b))
        deferred = len(sec_b) + len(pri_b)
        await until(lambda: sup.counters["deferred_input_frames"] == deferred, "deferred")
        assert sup.proxy.stats()["primary_frames"] == len(pri_a)

        disk.ack()
        await until(lambda: link.counters["releases"] == 1, "release after the disk ack")
        assert disk.commands.count(("colo-disk-checkpoint", {"epoch": 1})) == 1
        # epoch 1's held frames went out; flow b was compared afresh and holds its divergence
        assert sup.proxy.held_frames() == len(pri_b) - before_b
        await until(lambda: len(peer.out_frames) == len(pri_a) + before_b, "frames out")
        assert [d for d, _ in peer.out_frames] == pri_a + pri_b[:before_b]

        # epoch 2, disk first: the ack alone releases nothing, the RESUME then does
        disk.hold = False
        primary.event("STOP")
        await until(lambda: link.gate.disk_epoch == 2, "disk epoch 2 acknowledged")
        assert sup.proxy.held_frames() == len(pri_b) - before_b
        primary.event("RESUME")
        await until(lambda: link.counters["releases"] == 2, "second release")
        await until(lambda: len(peer.out_frames) == len(pri_a) + len(pri_b), "all out")
        assert [d for d, _ in peer.out_frames] == pri_a + pri_b

        report = await sup.shutdown()
        assert report["disk_link"]["released_epoch"] == 2  # type: ignore[index]
        assert report["shutdown"]["waiting_for_disk_agent"] is False  # type: ignore[index]
        for server in servers:
            server.close()

    asyncio.run(main())


@pytest.mark.parametrize("end", ["shutdown", "failover"])
def test_agent_unreachable_output_waits_until_shutdown_or_failover(
    sockdir: Path, end: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No agent: the checkpoint completes, nothing is released; failover releases it all."""
    pri_a, sec_a, before_a = diverging(40000)
    pri_b, sec_b, _ = diverging(40001)

    async def main() -> tuple[dict[str, Any], list[bytes]]:
        primary = FakeQmp()
        server = await asyncio.start_unix_server(primary.serve, f"{sockdir}/qmp")
        sup = disk_supervisor(sockdir, "no-agent")  # nobody listens there
        await sup.start()
        qmp, link = sup.qmp, sup.disk_link
        assert qmp is not None and link is not None
        peer = RecordPeer(sockdir, False)
        await peer.connect()
        await until(lambda: qmp.connected, "primary QMP")
        peer.sin.write(peer.frames(sec_a))
        await until(lambda: sup.secondary_in.frames_in == len(sec_a), "secondary")
        peer.pin.write(peer.frames(pri_a))
        await until(lambda: sup.proxy.held_frames() == len(pri_a) - before_a, "held")
        await until(lambda: len(peer.out_frames) == before_a, "frames before the divergence")
        primary.event("STOP")
        primary.event("RESUME")
        await until(lambda: qmp.stats.checkpoints_done == 1 and link.waiting, "waiting")
        peer.sin.write(peer.frames(sec_b))
        peer.pin.write(peer.frames(pri_b))
        deferred = len(sec_b) + len(pri_b)
        await until(lambda: sup.counters["deferred_input_frames"] == deferred, "deferred")
        if end == "failover":
            sup._colo_exit({"mode": "primary", "reason": "request"})
            await until(lambda: len(peer.out_frames) == len(pri_a) + len(pri_b), "passed")
        report = await sup.shutdown()
        server.close()
        return report, [d for d, _ in peer.out_frames]

    report, out = asyncio.run(main())
    shutdown = report["shutdown"]
    assert report["disk_link"]["releases"] == 0
    if end == "failover":
        assert out == pri_a + pri_b
        assert shutdown["held_frames_not_released"] == 0
        assert shutdown["deferred_primary_frames_not_released"] == 0
        assert report["supervisor"]["passthrough_secondary_dropped"] == len(sec_b)
    else:
        assert out == pri_a[:before_a]
        assert shutdown["waiting_for_disk_agent"] is True
        assert shutdown["held_frames_not_released"] == len(pri_a) - before_a
        assert shutdown["deferred_primary_frames_not_released"] == len(pri_b)
        assert "waiting for the disk agent to acknowledge epoch 1" in caplog.text


def test_disk_qmp_flag_and_toml_key(tmp_path: Path) -> None:
    base = ["--primary-in", "unix:/p,server", "--secondary-in", "unix:/s,server", "--outdev",
            "unix:/o"]  # fmt: skip
    parser = argparse.ArgumentParser()
    run_cli.add_parser(parser.add_subparsers(dest="command"))
    flags = parser.parse_args(["run", *base, "--disk-qmp", "tcp:127.0.0.1:4446"])
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\ndisk_qmp = "tcp:127.0.0.1:4446"\n')
    toml = parser.parse_args(["run", *base, "--config", str(cfg)])
    from_flags = run_cli.settings_from_values(run_cli.run_values(flags))
    assert from_flags == run_cli.settings_from_values(run_cli.run_values(toml))
    assert from_flags.disk_qmp == parse_endpoint("tcp:127.0.0.1:4446")
    without = run_cli.settings_from_values(run_cli.run_values(parser.parse_args(["run", *base])))
    assert without.disk_qmp is None
    sup = Supervisor(Config(), without)  # no --disk-qmp: no link, releases stay direct
    assert sup.disk_link is None and "disk_link" not in sup.stats()
