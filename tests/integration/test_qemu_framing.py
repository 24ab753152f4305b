"""Framing both ways against a real QEMU (filter-redirector / filter-mirror), vnet on and off.

QEMU -> colo-proxy: frames injected into a socket netdev leave through a real
``filter-redirector queue=tx,outdev=`` or ``filter-mirror`` chardev and must
arrive intact, in order, in our :class:`RecordChannel`.
colo-proxy -> QEMU: records our channel writes into a real
``filter-redirector queue=rx,indev=`` chardev must come out of the netdev
byte for byte (with vnet_hdr_support the header travels inside the frame).
Also: QEMU killed and restarted under a listening channel; QEMU as the server.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from colo_proxy.core.framing import Frame
from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.drivers.qemu_socket import RecordChannel
from tests.fakes import until
from tests.integration.qemu_helpers import (
    make_frames,
    needs_qemu,
    recv_netdev_frames,
    running_qemu,
    send_netdev_frames,
    start_qemu,
    wait_chardev_connected,
)

pytestmark = [pytest.mark.integration, needs_qemu]

VNET_HDR = bytes(range(1, 13))



QEMU_IOV_ABORT = "iov_copy: Assertion"


def vnet_opt(vnet: bool) -> str:
    return ",vnet_hdr_support=on" if vnet else ""


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
@pytest.mark.parametrize("kind", ["filter-redirector", "filter-mirror"])
def test_qemu_writes_proxy_reads(workdir: Path, kind: str, vnet: bool) -> None:
    frames = make_frames(1500)

    async def main(attempt: int) -> bool:
        """One run; False if QEMU itself aborted on its known iov_copy assertion."""
        got: list[Frame] = []
        sock = f"{workdir}/pin{attempt}"
        ch = RecordChannel("primary_in", parse_endpoint(f"unix:{sock},server"), vnet,
                           got.extend)  # fmt: skip
        await ch.channel.start()
        extra = [
            "-chardev", f"socket,id=co,path={sock},reconnect=1",
            "-object", f"{kind},id=f0,netdev=n0,queue=tx,outdev=co{vnet_opt(vnet)}",
        ]  # fmt: skip
        qmp = f"{workdir}/qmp{attempt}"
        try:
            with running_qemu(workdir, ["n0"], extra, qmp) as qemu:
                await until(lambda: ch.channel.connected, "QEMU to connect")
                await asyncio.to_thread(wait_chardev_connected, qmp, "co")
                await asyncio.to_thread(send_netdev_frames, qemu.ports["n0"], frames)
                await until(lambda: len(got) >= len(frames), "all frames", 60)
        except (AssertionError, OSError):
            if qemu.proc.poll() is not None and QEMU_IOV_ABORT in qemu.stderr():
                await ch.channel.close()
                return False
            raise
        assert [d for d, _ in got] == frames
        assert {o for _, o in got} == {0}  # socket netdevs have no vnet header
        assert ch.framing_errors == 0
        await ch.channel.close()
        return True

    # Debian's QEMU 7.2 sometimes aborts inside its own filter code (an
    # iov_copy assertion) while forwarding this traffic; that says nothing
    # about colo-proxy, so such a run is repeated with a fresh QEMU, at most twice.
    for attempt in range(3):
        if asyncio.run(main(attempt)):
            return
    pytest.fail("QEMU aborted with its iov_copy assertion on three runs in a row")


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
@pytest.mark.parametrize(
    ("we_listen", "tcp"),
    [(True, False), (False, False), (False, True)],
    ids=["proxy-server-unix", "qemu-server-unix", "qemu-server-tcp"],
)
def test_proxy_writes_qemu_indev_reads(
    workdir: Path, vnet: bool, we_listen: bool, tcp: bool
) -> None:
    eth = make_frames(1500, seed=7)
    batch: list[Frame] = [(VNET_HDR + f, 12) for f in eth] if vnet else [(f, 0) for f in eth]
    path = f"{workdir}/out"
    port = free_tcp_port() if tcp else 0

    async def main() -> None:
        if tcp:
            spec, where = f"tcp:127.0.0.1:{port}", f"host=127.0.0.1,port={port}"
        else:
            spec, where = f"unix:{path}", f"path={path}"
        out = RecordChannel("outdev", parse_endpoint(spec + (",server" if we_listen else "")),
                            vnet, None)  # fmt: skip
        if we_listen:
            await out.channel.start()
        mode = ",reconnect=1" if we_listen else ",server=on,wait=off"
        chardev = f"socket,id=ci,{where}{mode}"
        extra = [
            "-chardev", chardev,
            "-object", f"filter-redirector,id=r0,netdev=n0,queue=rx,indev=ci{vnet_opt(vnet)}",
        ]  # fmt: skip
        with running_qemu(workdir, ["n0"], extra) as qemu:
            if not we_listen:  # our client retries until QEMU listens
                await out.channel.start()
            await until(lambda: out.channel.connected, "connection")
            reader = asyncio.create_task(
                asyncio.to_thread(recv_netdev_frames, qemu.ports["n0"], len(batch))
            )
            for i in range(0, len(batch), 100):  # several writes, one record batch each
                assert out.send(batch[i : i + 100])
            got = await reader
        assert got == [d for d, _ in batch]
        await out.channel.close()

    asyncio.run(main())


def test_listening_channel_survives_qemu_restart_over_tcp(workdir: Path) -> None:
    async def main() -> None:
        got: list[Frame] = []
        ch = RecordChannel("secondary_in", parse_endpoint("tcp:127.0.0.1:0,server"), False,
                           got.extend)  # fmt: skip
        await ch.channel.start()
        port = ch.channel.port
        extra = [
            "-chardev", f"socket,id=co,host=127.0.0.1,port={port},reconnect=1",
            "-object", "filter-redirector,id=f0,netdev=n0,queue=tx,outdev=co",
        ]  # fmt: skip
        first, second = make_frames(300, seed=1), make_frames(300, seed=2)
        for n, frames in enumerate((first, second)):
            qmp = f"{workdir}/qmp"
            qemu = start_qemu(workdir, ["n0"], extra, qmp)
            try:
                await until(lambda n=n: ch.channel.stats.connects == n + 1, "QEMU to connect")
                await asyncio.to_thread(wait_chardev_connected, qmp, "co")
                await asyncio.to_thread(send_netdev_frames, qemu.ports["n0"], frames)
                want = len(first) * (n + 1)
                await until(lambda want=want: len(got) >= want, "frames")
            finally:
                qemu.kill()  # SIGKILL: a crash, not a clean close
            await until(lambda: not ch.channel.connected, "disconnect seen")
        assert [d for d, _ in got] == first + second
        assert ch.framing_errors == 0 and ch.truncated_records == 0
        await ch.channel.close()

    asyncio.run(main())
