"""End to end: real QEMU netfilters -> `colo-proxy run` -> a real QEMU filter-redirector indev.

One guest-less QEMU plays both guests and the client side: frames injected
into netdev ``p0`` leave through ``filter-redirector queue=tx`` to the
proxy's ``primary_in``, frames into ``s0`` likewise to ``secondary_in``, and
what the proxy releases on ``outdev`` enters ``filter-redirector queue=rx``
on ``c0`` and comes out of ``c0``'s socket, where the client would be.  The
same QEMU writes ``primary_in`` and reads ``outdev`` from its main loop,
which is the topology that deadlocks a proxy that blocks reading on writing.
The proxy runs as the real command (uvloop, signals) and mixes server and
client endpoints.  With QMP: a divergence makes it request a checkpoint
(outside COLO QEMU accepts it and does nothing), and a ``stop``/``cont``
(followed with ``--qmp-follow always``) stands in for the checkpoint.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.integration.qemu_helpers import (
    QemuProcess,
    needs_qemu,
    recv_netdev_frames,
    send_netdev_frames,
    start_qemu,
    wait_chardev_connected,
)

pytestmark = [pytest.mark.integration, needs_qemu]

scapy_all = pytest.importorskip("scapy.all")



def guest_tcp_output(dport: int, payload: bytes, seg: int) -> list[bytes]:
    """What a server guest sends on one connection: SYN-ACK, ACK of the request, data."""
    ether, ip, tcp = scapy_all.Ether, scapy_all.IP, scapy_all.TCP
    head = ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip(
        src="10.0.0.1", dst="10.0.0.2", id=1
    )
    isn, cisn = 1000, 50000 + dport
    frames = [
        head / tcp(sport=80, dport=dport, flags="SA", seq=isn, ack=cisn + 1),
        head / tcp(sport=80, dport=dport, flags="A", seq=isn + 1, ack=cisn + 101),
    ]
    for off in range(0, len(payload), seg):
        frames.append(
            head
            / tcp(sport=80, dport=dport, flags="PA", seq=isn + 1 + off, ack=cisn + 101)
            / payload[off : off + seg]
        )
    return [bytes(f) for f in frames]


@dataclass
class Chain:
    qemu: QemuProcess
    proxy: subprocess.Popen[str]
    op_qmp: str

    def stop_proxy(self) -> dict[str, Any]:
        """SIGTERM the proxy; return its final JSON report."""
        self.proxy.send_signal(signal.SIGTERM)
        _, err = self.proxy.communicate(timeout=30)
        assert self.proxy.returncode == 0, err
        line = next(x for x in err.splitlines() if x.startswith('{"colo_proxy_report"'))
        report: dict[str, Any] = json.loads(line)["colo_proxy_report"]
        report["stderr"] = err
        return report


@contextmanager
def chain(workdir: Path, vnet: bool, proxy_args: list[str]) -> Iterator[Chain]:
    qmp, op, sqmp = f"{workdir}/qmp", f"{workdir}/op", f"{workdir}/sqmp"
    sock = {n: f"{workdir}/{n}" for n in ("pin", "sin", "out")}
    v = ",vnet_hdr_support=on" if vnet else ""
    extra = [
        "-qmp", f"unix:{op},server=on,wait=off",
        "-qmp", f"unix:{sqmp},server=on,wait=off",  # stands in for the secondary's
        "-chardev", f"socket,id=pin,path={sock['pin']},reconnect=1",
        "-chardev", f"socket,id=sin,path={sock['sin']},reconnect=1",
        "-chardev", f"socket,id=out,path={sock['out']},server=on,wait=off",
        "-object", f"filter-redirector,id=r0,netdev=p0,queue=tx,outdev=pin{v}",
        "-object", f"filter-redirector,id=r1,netdev=s0,queue=tx,outdev=sin{v}",
        "-object", f"filter-redirector,id=r2,netdev=c0,queue=rx,indev=out{v}",
    ]  # fmt: skip
    qemu = start_qemu(workdir, ["p0", "s0", "c0"], extra, qmp)
    proxy = None
    try:
        cmd = [
            sys.executable, "-m", "colo_proxy.cli", "run",
            "--primary-in", f"unix:{sock['pin']},server",
            "--secondary-in", f"unix:{sock['sin']},server=on",
            "--outdev", f"unix:{sock['out']}",
            "--qmp", f"unix:{qmp}", "--secondary-qmp", f"unix:{sqmp}",
            "--vnet-hdr", "on" if vnet else "off",
            *proxy_args,
        ]  # fmt: skip
        proxy = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        wait_chardev_connected(op, "pin", "sin", "out", timeout=30)
        yield Chain(qemu, proxy, op)
    finally:
        if proxy is not None and proxy.poll() is None:
            proxy.kill()
            proxy.wait()
        qemu.kill()




def test_run_end_to_end_with_checkpoint(workdir: Path) -> None:
    payload = bytes(i % 251 for i in range(20 * 1000))
    good = guest_tcp_output(40000, payload, 1000)
    bad_pri = guest_tcp_output(40001, payload, 1000)
    diverged = bytearray(payload)
    diverged[12345] ^= 0xFF
    bad_sec = guest_tcp_output(40001, bytes(diverged), 1000)
    args = ["--qmp-follow", "always", "--qmp-request-timeout", "60",
            "--min-checkpoint-interval", "0", "--log-level", "info"]  # fmt: skip
    with chain(workdir, False, args) as ch:
        client = ch.qemu.ports["c0"]

        async def scenario() -> None:
            # secondary first, then primary: every primary frame finds its partner
            await asyncio.to_thread(send_netdev_frames, ch.qemu.ports["s0"], good + bad_sec)
            await asyncio.to_thread(send_netdev_frames, ch.qemu.ports["p0"], good + bad_pri)
            # the diverging flow is held from segment 12 on; the rest comes through
            first = len(good) + 2 + 12
            got = await asyncio.to_thread(recv_netdev_frames, client, first)
            assert sorted(got) == sorted(good + bad_pri[: 2 + 12])
            # the proxy asked QEMU for a checkpoint; a stop/cont stands in for it
            opc = QMPClient("op")
            await opc.connect(ch.op_qmp)
            await opc.execute("stop")
            await opc.execute("cont")
            await opc.disconnect()
            rest = await asyncio.to_thread(recv_netdev_frames, client, len(bad_pri) - 14)
            assert rest == bad_pri[14:]

        asyncio.run(scenario())
        report = ch.stop_proxy()
    assert report["primary-qmp"]["requests_sent"] >= 1
    assert report["primary-qmp"]["checkpoints_done"] == 1
    assert report["secondary-qmp"]["sessions"] == 1
    assert report["secondary-qmp"]["checkpoints_done"] == 0  # only the primary's is followed
    assert report["core"]["divergences_by_kind"]
    assert report["outdev"]["frames_out"] == len(good) + len(bad_pri)
    assert report["shutdown"]["held_frames_not_released"] == 0
    assert "uvloop" in report["stderr"]


@functools.cache
def bulk_flows() -> list[list[bytes]]:
    payload = bytes(i % 241 for i in range(1448 * 150))
    return [guest_tcp_output(41000 + c, payload, 1448) for c in range(40)]


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_run_bulk_through_one_qemu_does_not_deadlock(workdir: Path, vnet: bool) -> None:
    """~9 MB each way through one QEMU that writes primary_in and reads outdev."""
    flows = bulk_flows()
    frames = [f for seg in zip(*flows, strict=True) for f in seg]  # round robin
    with chain(workdir, vnet, ["--log-level", "warning"]) as ch:

        async def scenario() -> None:
            reader = asyncio.create_task(
                asyncio.to_thread(recv_netdev_frames, ch.qemu.ports["c0"], len(frames), 120)
            )
            for i in range(0, len(frames), 64):  # the secondary a window ahead
                window = frames[i : i + 64]
                await asyncio.to_thread(send_netdev_frames, ch.qemu.ports["s0"], window)
                await asyncio.to_thread(send_netdev_frames, ch.qemu.ports["p0"], window)
            got = await reader
            assert len(got) == len(frames)
            for flow in flows:  # every flow complete and in order
                dport = flow[0][36:38]
                assert [f for f in got if f[36:38] == dport] == flow

        asyncio.run(scenario())
        report = ch.stop_proxy()
    assert report["outdev"]["frames_out"] == len(frames)
    assert report["outdev"]["dropped_writes"] == 0
    assert report["primary_in"]["framing_errors"] == 0
