"""End to end: real QEMU netfilters -> `colo-proxy run` -> a real QEMU filter-redirector indev.

One guest-less QEMU plays both guests and the client side: frames injected
into netdev ``p0`` leave through ``filter-redirector queue=tx`` to the
proxy's ``primary_in``, frames into ``s0`` likewise to ``secondary_in``, and
what the proxy releases on ``outdev`` enters ``filter-redirector queue=rx``
on ``c0`` and comes out of ``c0``'s socket, where the client would be.  The
proxy runs as the real command (uvloop, signals), mixes server and client
endpoints, and uses the same QEMU's QMP: a divergence makes it request a
checkpoint there (outside COLO QEMU accepts it and does nothing), and a
``stop``/``cont`` (followed with ``--qmp-follow always``) stands in for the
checkpoint, after which the held frames reach the client.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from qemu.qmp import QMPClient

from tests.integration.qemu_helpers import (
    needs_qemu,
    recv_netdev_frames,
    send_netdev_frames,
    short_tmpdir,
    start_qemu,
)

pytestmark = [pytest.mark.integration, needs_qemu]

scapy_all = pytest.importorskip("scapy.all")


@pytest.fixture
def workdir() -> Iterator[str]:
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


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


def test_run_end_to_end_with_checkpoint(workdir: str) -> None:
    payload = bytes(i % 251 for i in range(20 * 1000))
    good = guest_tcp_output(40000, payload, 1000)
    bad_pri = guest_tcp_output(40001, payload, 1000)
    diverged = bytearray(payload)
    diverged[12345] ^= 0xFF
    bad_sec = guest_tcp_output(40001, bytes(diverged), 1000)
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
    qemu = start_qemu(workdir, ["p0", "s0", "c0"], extra, qmp)
    proxy = None
    try:
        cmd = [
            sys.executable, "-m", "colo_proxy.cli", "run",
            "--primary-in", f"unix:{sock['pin']},server",
            "--secondary-in", f"unix:{sock['sin']},server=on",
            "--outdev", f"unix:{sock['out']}",
            "--qmp", f"unix:{qmp}", "--qmp-follow", "always", "--qmp-request-timeout", "60",
            "--min-checkpoint-interval", "0", "--log-level", "info",
        ]  # fmt: skip
        proxy = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        client = qemu.ports["c0"]

        async def scenario() -> None:
            opc = QMPClient("op")
            await opc.connect(op)
            for _ in range(3000):  # wait until QEMU's chardev clients found the proxy
                st = await opc.execute("query-chardev")
                assert isinstance(st, list)
                if all(not c["filename"].startswith("disconnected") for c in st
                       if c["label"] in ("pin", "sin", "out")):  # fmt: skip
                    break
                await asyncio.sleep(0.01)
            # secondary first, then primary: every primary frame finds its partner
            await asyncio.to_thread(send_netdev_frames, qemu.ports["s0"], good + bad_sec)
            await asyncio.to_thread(send_netdev_frames, qemu.ports["p0"], good + bad_pri)
            # the diverging flow is held from segment 12 on; the rest comes through
            first = len(good) + 2 + 12
            got = await asyncio.to_thread(recv_netdev_frames, client, first)
            assert sorted(got) == sorted(good + bad_pri[: 2 + 12])
            # the proxy asked QEMU for a checkpoint; a stop/cont stands in for it
            await opc.execute("stop")
            await opc.execute("cont")
            rest = await asyncio.to_thread(recv_netdev_frames, client, len(bad_pri) - 14)
            assert rest == bad_pri[14:]
            await opc.disconnect()

        asyncio.run(scenario())
        proxy.send_signal(signal.SIGTERM)
        _, err = proxy.communicate(timeout=30)
        assert proxy.returncode == 0, err
        line = next(x for x in err.splitlines() if x.startswith('{"colo_proxy_report"'))
        report = json.loads(line)["colo_proxy_report"]
        assert report["primary-qmp"]["requests_sent"] >= 1
        assert report["primary-qmp"]["checkpoints_done"] == 1
        assert report["core"]["divergences_by_kind"]
        assert report["outdev"]["frames_out"] == len(good) + len(bad_pri)
        assert report["shutdown"]["held_frames_not_released"] == 0
        assert "uvloop" in err
    finally:
        if proxy is not None and proxy.poll() is None:
            proxy.kill()
            proxy.wait()
        qemu.kill()
