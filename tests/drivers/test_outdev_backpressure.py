"""An output over its bound pauses its inputs while its peer reads, and lets them go when
the peer stalls (qemu_socket.py's docstring says why both)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from colo_proxy.drivers.endpoints import Endpoint, Transport
from colo_proxy.drivers.qemu_socket import Channel
from tests.fakes import Runner, until

BOUND = 1 << 20
CHUNK = b"z" * 65536


async def _pair(sockdir: Path) -> tuple[Channel, Channel, socket.socket, socket.socket,
                                        list[bytes]]:
    """outdev (a client of our listening socket) throttling primary_in (a server a client
    of ours writes to); returns both channels, outdev's peer, the input's writer and what
    the input received."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(f"{sockdir}/o")
    srv.listen()
    got: list[bytes] = []
    inp = Channel("primary_in", Endpoint(Transport.UNIX, f"{sockdir}/p", server=True),
                  on_data=got.append)
    out = Channel("outdev", Endpoint(Transport.UNIX, f"{sockdir}/o"), max_buffer=BOUND)
    out.throttles = [inp]
    await inp.start()
    await out.start()
    await until(lambda: out.connected, "outdev connected")
    peer, _ = srv.accept()
    srv.close()
    peer.setblocking(False)
    writer = socket.socket(socket.AF_UNIX)
    writer.connect(f"{sockdir}/p")
    writer.setblocking(False)
    await until(lambda: inp.connected, "primary_in connected")
    return out, inp, peer, writer, got


def _reading(channel: Channel) -> bool:
    cur = channel._current
    assert cur is not None and cur.transport is not None
    return cur.transport.is_reading()


def test_a_slow_reader_pauses_the_inputs_and_loses_nothing(
    sockdir: Path, run_loop: Runner
) -> None:
    async def main() -> None:
        out, inp, peer, writer, got = await _pair(sockdir)
        accepted = [out.write(CHUNK) for _ in range(24)]  # 1.5 MiB: over the bound
        assert all(accepted) and out.stats.dropped_writes == 0
        assert out.stats.throttles == 1 and not _reading(inp)
        writer.send(b"x" * 1000)  # waits in the kernel while the input is paused
        loop = asyncio.get_running_loop()
        taken = 0
        while taken < len(CHUNK) * 24:  # the peer reads everything, slowly
            taken += len(await loop.sock_recv(peer, 65536))
        await until(lambda: _reading(inp), "inputs resumed")
        await until(lambda: sum(map(len, got)) == 1000, "the input's bytes read")
        assert out.stats.throttle_stalls == 0 and out.stats.dropped_writes == 0
        for s in (peer, writer):
            s.close()
        await out.close()
        await inp.close()

    run_loop(main())


def test_a_peer_that_takes_nothing_gets_its_inputs_back_and_output_is_dropped(
    sockdir: Path, run_loop: Runner
) -> None:
    async def main() -> None:
        out, inp, peer, writer, _got = await _pair(sockdir)
        for _ in range(24):
            assert out.write(CHUNK)
        assert not _reading(inp)
        # a QEMU blocked writing primary_in reads no outdev: the inputs must not stay paused
        await until(lambda: out.stats.throttle_stalls == 1, "stall noticed")
        assert _reading(inp)
        results = [out.write(CHUNK) for _ in range(8)]
        assert not any(results) and out.stats.dropped_writes == 8
        for s in (peer, writer):
            s.close()
        await out.close()
        await inp.close()

    run_loop(main())
