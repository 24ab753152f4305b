"""End to end with disk replication: real QEMU netfilters, a real disk agent, `colo-proxy run`.

The same guest-less QEMU set-up as ``test_qemu_run.py`` (frames into ``p0``
and ``s0`` reach the proxy, released frames come out of ``c0``), plus a
real ``colo-proxy disk-agent`` process given to the proxy as ``--disk-qmp``.
A ``stop``/``cont`` on QEMU (followed with ``--qmp-follow always``) stands in
for a COLO checkpoint.  Held output must come out only once QEMU resumed AND
the agent acknowledged the epoch: with the agent killed it stays held across
the checkpoint, and it comes out once the agent is back.  The proxy's state
is read from its own stats (SIGUSR1), so nothing is concluded from a timeout.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.disk.agent_helpers import AgentProcess, start_agent
from tests.integration.qemu_helpers import (
    QemuProcess,
    needs_qemu,
    recv_netdev_frames,
    send_netdev_frames,
    start_qemu,
    wait_chardev_connected,
)
from tests.integration.test_qemu_run import guest_tcp_output  # skips w/o scapy
from tests.metrics_helpers import by_name, free_port, scrape

METRICS_PORT = free_port()
"""The proxy's --metrics port: colo_disk_epoch must move with the disk agent's epochs."""

pytestmark = [pytest.mark.integration, needs_qemu]

SEG = 1000
HELD_FROM = 2 + 2  # SYN-ACK, ACK, two segments; the byte at 2500 differs



def diverging(dport: int) -> tuple[list[bytes], list[bytes]]:
    """One flow's primary and secondary output, differing inside the third segment."""
    payload = bytes(i % 251 for i in range(8 * SEG))
    bad = bytearray(payload)
    bad[2500] ^= 0xFF
    return guest_tcp_output(dport, payload, SEG), guest_tcp_output(dport, bytes(bad), SEG)


@dataclass
class Rig:
    qemu: QemuProcess
    proxy: subprocess.Popen[bytes]
    proxy_log: Path
    op_qmp: str
    agent: AgentProcess

    def stats(self, cond: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """Ask the proxy for its stats (SIGUSR1) until ``cond`` holds; generous timeout."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            self.proxy.send_signal(signal.SIGUSR1)
            time.sleep(0.05)
            lines = [x for x in self.proxy_log.read_text().splitlines() if ": stats {" in x]
            if lines:
                stats: dict[str, Any] = json.loads(lines[-1].split(": stats ", 1)[1])
                if cond(stats):
                    return stats
        raise AssertionError(f"gave up waiting for {what}: {self.proxy_log.read_text()[-3000:]}")

    def stop_cont(self) -> None:
        """A checkpoint as the proxy follows it: STOP then RESUME on the primary QEMU."""
        mon = QEMUMonitorProtocol(self.op_qmp)
        mon.connect()
        try:
            mon.cmd("stop")
            mon.cmd("cont")
        finally:
            mon.close()

    def agent_epoch(self) -> int:
        mon = self.agent.monitor()
        try:
            return int(mon.cmd("query-colo-disk")["epoch"])
        finally:
            mon.close()

    def stop_proxy(self) -> dict[str, Any]:
        self.proxy.send_signal(signal.SIGTERM)
        assert self.proxy.wait(30) == 0, self.proxy_log.read_text()
        text = self.proxy_log.read_text()
        line = next(x for x in text.splitlines() if x.startswith('{"colo_proxy_report"'))
        report: dict[str, Any] = json.loads(line)["colo_proxy_report"]
        return report


@contextmanager
def rig(workdir: Path) -> Iterator[Rig]:
    image = workdir / "secondary.img"
    image.write_bytes(bytes(1 << 20))
    agent = start_agent(workdir, image)
    qmp, op = f"{workdir}/qmp", f"{workdir}/op"
    sock = {n: f"{workdir}/{n}" for n in ("pin", "sin", "out")}
    extra = [
        "-qmp", f"unix:{op},server=on,wait=off",
        "-chardev", f"socket,id=pin,path={sock['pin']},reconnect=1",
        "-chardev", f"socket,id=sin,path={sock['sin']},reconnect=1",
        "-chardev", f"socket,id=out,path={sock['out']},server=on,wait=off",
        "-object", "filter-redirector,id=r0,netdev=p0,queue=tx,outdev=pin",
        "-object", "filter-redirector,id=r1,netdev=s0,queue=tx,outdev=sin",
        "-object", "filter-redirector,id=r2,netdev=c0,queue=rx,indev=out",
    ]  # fmt: skip
    proxy = None
    built: Rig | None = None
    log_path = workdir / "proxy.log"
    qemu: QemuProcess | None = None
    try:
        qemu = start_qemu(str(workdir), ["p0", "s0", "c0"], extra, qmp)
        cmd = [
            sys.executable, "-m", "colo_proxy.cli", "run",
            "--primary-in", f"unix:{sock['pin']},server",
            "--secondary-in", f"unix:{sock['sin']},server",
            "--outdev", f"unix:{sock['out']}",
            "--qmp", f"unix:{qmp}", "--disk-qmp", f"unix:{agent.qmp}",
            "--qmp-follow", "always", "--qmp-request-timeout", "60",
            "--min-checkpoint-interval", "0", "--log-level", "info",
            "--metrics", f"127.0.0.1:{METRICS_PORT}",
        ]  # fmt: skip
        with log_path.open("wb") as log:
            proxy = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=log)
        wait_chardev_connected(op, "pin", "sin", "out", timeout=30)
        built = Rig(qemu, proxy, log_path, op, agent)
        yield built
    finally:
        if proxy is not None and proxy.poll() is None:
            proxy.kill()
            proxy.wait()
        if qemu is not None:
            qemu.kill()
        agent.kill()
        if built is not None:  # the test may have started a new agent in its place
            built.agent.kill()


def test_output_waits_for_resume_and_the_disk_agent(workdir: Path) -> None:
    pri1, sec1 = diverging(40001)
    pri2, sec2 = diverging(40002)
    with rig(workdir) as r:
        client = r.qemu.ports["c0"]
        r.stats(lambda s: s["disk_link"]["connected"], "disk agent session")
        epoch0 = r.agent_epoch()
        before = by_name(scrape(METRICS_PORT), "colo_disk_epoch")

        # round 1, agent up: a divergence holds the flow; the checkpoint releases it
        send_netdev_frames(r.qemu.ports["s0"], sec1)
        send_netdev_frames(r.qemu.ports["p0"], pri1)
        assert recv_netdev_frames(client, HELD_FROM) == pri1[:HELD_FROM]
        r.stats(lambda s: s["core"]["held_frames"] == len(pri1) - HELD_FROM, "round 1 held")
        r.stop_cont()
        assert recv_netdev_frames(client, len(pri1) - HELD_FROM) == pri1[HELD_FROM:]
        assert r.agent_epoch() == epoch0 + 1  # the disk epoch was committed for it
        stats = r.stats(lambda s: s["disk_link"]["releases"] == 1, "round 1 release counted")
        assert stats["disk_link"]["disk_checkpoints_acked"] == 1
        after = by_name(scrape(METRICS_PORT), "colo_disk_epoch")  # the metric moves with it
        assert after[(("state", "released"),)] == before[(("state", "released"),)] + 1

        # round 2, agent killed: the VM checkpoint completes, the output stays held
        send_netdev_frames(r.qemu.ports["s0"], sec2)
        send_netdev_frames(r.qemu.ports["p0"], pri2)
        assert recv_netdev_frames(client, HELD_FROM) == pri2[:HELD_FROM]
        r.stats(lambda s: s["core"]["held_frames"] == len(pri2) - HELD_FROM, "round 2 held")
        r.agent.kill()
        r.stop_cont()
        stats = r.stats(
            lambda s: (
                s["primary-qmp"]["checkpoints_done"] == 2 and s["disk_link"]["disk_errors"] >= 1
            ),
            "checkpoint 2 done, disk ack failing",
        )
        assert stats["core"]["held_frames"] == len(pri2) - HELD_FROM
        assert stats["outdev"]["frames_out"] == len(pri1) + HELD_FROM
        assert stats["disk_link"]["releases"] == 1

        # the agent is back (a new process on the same image): the output comes out
        r.agent = start_agent(workdir, workdir / "secondary.img")
        assert recv_netdev_frames(client, len(pri2) - HELD_FROM) == pri2[HELD_FROM:]
        assert r.agent_epoch() == epoch0 + 2
        report = r.stop_proxy()
    link = report["disk_link"]
    assert link["releases"] == 2 and link["released_epoch"] == 2
    assert link["agent_restarts"] == 1
    assert report["outdev"]["frames_out"] == len(pri1) + len(pri2)
    assert report["shutdown"]["held_frames_not_released"] == 0
    assert report["shutdown"]["waiting_for_disk_agent"] is False
