"""The secondary's real chain: QEMU filter-rewriter + filter-redirector -> colo-proxy.

In a QEMU COLO deployment the secondary's output passes ``filter-rewriter``
before its ``filter-redirector`` sends it to the comparator.  The rewriter
learns ``offset = secondary ISN - primary ISN`` from the client's SYN, the
secondary's SYN-ACK and the client's ACK (which, mirrored from the primary,
acknowledges the primary's ISN), and then moves the sequence numbers of the
secondary's later segments into the primary's space.  It leaves the SYN-ACK
itself alone (it rewrites only segments whose SYN/ACK bits are exactly ACK),
so the comparator sees a SYN-ACK carrying the secondary's ISN followed by
data numbered from the primary's ISN.  This test builds that with real QEMU
filters and checks that colo-proxy releases the primary's connection.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colo_proxy.core.framing import encode_frames
from tests.integration.qemu_helpers import (
    client_segment,
    guest_reply,
    needs_qemu,
    recv_netdev_frames,
    start_qemu,
    wait_chardev_connected,
)

pytestmark = [pytest.mark.integration, needs_qemu]

pytest.importorskip("scapy.all")  # the frames are built with scapy

PRI_ISN, SEC_ISN, CLIENT_ISN = 1000, 777000, 5000



def guest(isn: int, payload: bytes) -> list[bytes]:
    return guest_reply(isn, CLIENT_ISN, payload, 100)


def netdev_write(sock: object, frames: list[bytes]) -> None:
    sock.sendall(encode_frames([(f, 0) for f in frames], False))  # type: ignore[attr-defined]


@pytest.mark.parametrize("secondary_first", [True, False], ids=["secondary-first", "primary-first"])
def test_rewritten_secondary_stream_is_released(workdir: Path, secondary_first: bool) -> None:
    payload = bytes(range(200)) * 3
    sock = {n: f"{workdir}/{n}" for n in ("pin", "sin", "out")}
    op = f"{workdir}/op"
    # netdevs: pri (primary tap), sec (secondary tap), cli (the client's side of outdev).
    # Guest output enters through each netdev's hub sink (netdev rx, as from a guest NIC).
    extra = [
        "-chardev", f"socket,id=pin,path={sock['pin']},reconnect=1",
        "-chardev", f"socket,id=sin,path={sock['sin']},reconnect=1",
        "-chardev", f"socket,id=out,path={sock['out']},reconnect=1",
        "-object", "filter-redirector,id=r0,netdev=pri,queue=rx,outdev=pin",
        "-object", "filter-redirector,id=f2,netdev=sec,queue=rx,outdev=sin",
        "-object", "filter-rewriter,id=rew0,netdev=sec,queue=all",
        "-object", "filter-redirector,id=r2,netdev=cli,queue=rx,indev=out",
    ]  # fmt: skip
    qemu = start_qemu(workdir, ["pri", "sec", "cli"], extra, op)
    proxy = subprocess.Popen(
        [sys.executable, "-m", "colo_proxy.cli", "run",
         "--primary-in", f"unix:{sock['pin']},server",
         "--secondary-in", f"unix:{sock['sin']},server",
         "--outdev", f"unix:{sock['out']},server", "--compare-timeout", "30"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_chardev_connected(op, "pin", "sin", "out", timeout=30)
        pri_sink, sec_sink = qemu.sinks[0], qemu.sinks[1]
        pri_out, sec_out = guest(PRI_ISN, payload), guest(SEC_ISN, payload)

        def secondary() -> None:
            # the handshake as the secondary's rewriter sees it (client side mirrored)
            # (pauses only order writes on different sockets, so the rewriter sees
            # the handshake in order; nothing is timed)
            netdev_write(qemu.ports["sec"], [client_segment("S", CLIENT_ISN)])
            time.sleep(0.2)
            netdev_write(sec_sink, sec_out[:1])
            time.sleep(0.2)
            netdev_write(qemu.ports["sec"], [client_segment("A", CLIENT_ISN + 1, PRI_ISN + 1)])
            time.sleep(0.2)
            netdev_write(sec_sink, sec_out[1:])

        def primary() -> None:
            netdev_write(pri_sink, pri_out)

        first, second = (secondary, primary) if secondary_first else (primary, secondary)
        first()
        time.sleep(0.5)
        second()
        got = recv_netdev_frames(qemu.ports["cli"], len(pri_out), timeout=3)
        assert got == pri_out
    finally:
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy.communicate(timeout=30)
        finally:
            if proxy.poll() is None:
                proxy.kill()
            qemu.kill()


