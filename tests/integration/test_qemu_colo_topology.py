"""The README's network set-up, literally: two QEMUs wired as in docs/COLO-FT.txt.

Primary QEMU: ``filter-mirror`` (client traffic to the secondary), ``filter-redirector``
``redire1`` (guest output to colo-proxy's primary_in) and ``redire0`` (colo-proxy's
outdev back towards the client), all over TCP chardevs.  Secondary QEMU:
``filter-redirector`` ``f1`` (mirrored client traffic in), ``f2`` (guest output to
colo-proxy's secondary_in) and ``filter-rewriter``.  No guests: each QEMU's netdev is
a socket on a hub whose other port plays the guest NIC (reference section 4), so the
test writes what the client and the two guests send and reads what reaches the
client.  colo-proxy runs as the real command.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from colo_proxy.core.framing import encode_frames
from tests.integration.qemu_helpers import (
    client_segment,
    guest_reply,
    needs_qemu,
    recv_netdev_frames,
    start_qemu,
)

pytestmark = [pytest.mark.integration, needs_qemu]

pytest.importorskip("scapy.all")  # the frames are built with scapy

PRI_ISN, SEC_ISN, CLIENT_ISN = 3_000_000, 9_000_000, 5000



def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def guest(isn: int, payload: bytes) -> list[bytes]:
    return guest_reply(isn, CLIENT_ISN, payload, 1000)


def write(sock: socket.socket, frames: list[bytes]) -> None:
    sock.sendall(encode_frames([(f, 0) for f in frames], False))


async def all_connected(qmp_path: str, labels: tuple[str, ...]) -> None:
    qmp = QMPClient("test")
    await qmp.connect(qmp_path)
    try:
        for _ in range(3000):
            st = await qmp.execute("query-chardev")
            assert isinstance(st, list)
            if all(not c["filename"].startswith("disconnected") for c in st
                   if c["label"] in labels):  # fmt: skip
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"chardevs never connected: {st}")
    finally:
        await qmp.disconnect()


def test_colo_ft_network_topology_with_colo_proxy(workdir: Path) -> None:
    mirror, compare0, compare_out, sec_in = free_ports(4)
    payload = bytes(i % 253 for i in range(30_000))
    pri_out, sec_out = guest(PRI_ISN, payload), guest(SEC_ISN, payload)
    proxy = subprocess.Popen(
        [sys.executable, "-m", "colo_proxy.cli", "run",
         "--primary-in", f"tcp:127.0.0.1:{compare0}",
         "--secondary-in", f"tcp:127.0.0.1:{sec_in},server",
         "--outdev", f"tcp:127.0.0.1:{compare_out}",
         "--qmp", f"unix:{workdir}/pqmp2", "--compare-timeout", "30"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    primary = secondary = None
    try:
        primary = start_qemu(workdir, ["hn0"], [
            "-qmp", f"unix:{workdir}/pqmp2,server=on,wait=off",
            "-chardev", f"socket,id=mirror0,host=127.0.0.1,port={mirror},server=on,wait=off",
            "-chardev", f"socket,id=compare0,host=127.0.0.1,port={compare0},server=on,wait=off",
            "-chardev",
            f"socket,id=compare_out,host=127.0.0.1,port={compare_out},server=on,wait=off",
            "-object", "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0",
            "-object", "filter-redirector,netdev=hn0,id=redire0,queue=rx,indev=compare_out",
            "-object", "filter-redirector,netdev=hn0,id=redire1,queue=rx,outdev=compare0",
        ], f"{workdir}/pqmp")  # fmt: skip
        secondary = start_qemu(workdir, ["hn0"], [
            "-chardev", f"socket,id=red0,host=127.0.0.1,port={mirror},reconnect=1",
            "-chardev", f"socket,id=red1,host=127.0.0.1,port={sec_in},reconnect=1",
            "-object", "filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0",
            "-object", "filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1",
            "-object", "filter-rewriter,id=rew0,netdev=hn0,queue=all",
        ], f"{workdir}/sqmp")  # fmt: skip
        asyncio.run(all_connected(f"{workdir}/pqmp", ("mirror0", "compare0", "compare_out")))
        asyncio.run(all_connected(f"{workdir}/sqmp", ("red0", "red1")))
        network = primary.ports["hn0"]  # where the client is
        pri_guest, sec_guest = primary.sinks[0], secondary.sinks[0]
        # pauses only order writes on different sockets (the rewriter must see the
        # handshake in order); nothing is timed
        write(network, [client_segment("S", CLIENT_ISN)])  # mirrored to the secondary
        time.sleep(0.3)
        write(pri_guest, pri_out[:1])
        write(sec_guest, sec_out[:1])
        time.sleep(0.3)
        write(network, [client_segment("A", CLIENT_ISN + 1, PRI_ISN + 1)])
        time.sleep(0.3)
        write(sec_guest, sec_out[1:])
        write(pri_guest, pri_out[1:])
        got = recv_netdev_frames(network, len(pri_out), timeout=15)
        assert got == pri_out  # the primary's output, complete and in order
    finally:
        proxy.send_signal(signal.SIGTERM)
        try:
            _, err = proxy.communicate(timeout=30)
        finally:
            if proxy.poll() is None:
                proxy.kill()
            for q in (primary, secondary):
                if q is not None:
                    q.kill()
    assert '"requests_sent": 0' in err  # identical output: no checkpoint was wanted
