"""Channels without QEMU: reconnection, resets on bad framing, bounded output."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from pathlib import Path

from colo_proxy.core.framing import Frame, encode_frames
from colo_proxy.drivers.endpoints import Endpoint, Transport, parse_endpoint
from colo_proxy.drivers.qemu_socket import Channel, RecordChannel
from tests.fakes import Runner, read_exactly, until

ETH = bytes(range(64))


def test_server_survives_reconnect_and_bad_framing(sockdir: Path, run_loop: Runner) -> None:
    async def main() -> None:
        got: list[Frame] = []
        rc = RecordChannel(
            "primary_in", parse_endpoint(f"unix:{sockdir}/p,server"), False, got.extend
        )
        await rc.channel.start()
        # 1st peer: good frames then a partial record, then hang up
        _, w = await asyncio.open_unix_connection(f"{sockdir}/p")
        wire = encode_frames([(ETH, 0)] * 3, False)
        w.write(wire + wire[:7])
        await w.drain()
        await until(lambda: len(got) == 3, "three frames")
        w.close()
        await until(lambda: not rc.channel.connected, "disconnect")
        assert rc.truncated_records == 1
        # 2nd peer: one good frame, then an oversized length: reset, frame kept
        r, w = await asyncio.open_unix_connection(f"{sockdir}/p")
        w.write(encode_frames([(ETH[:20], 0)], False) + struct.pack(">I", 70000) + b"x" * 10)
        await w.drain()
        await until(lambda: rc.framing_errors == 1, "framing error")
        assert got[3] == (ETH[:20], 0)
        assert await asyncio.wait_for(r.read(), 10) == b""  # we reset it
        assert rc.channel.stats.resets == 1
        # 3rd peer works again from a clean decoder
        _, w = await asyncio.open_unix_connection(f"{sockdir}/p")
        w.write(wire)
        await w.drain()
        await until(lambda: len(got) == 7, "frames after reset")
        assert rc.counters()["connects"] == 3
        w.close()
        await rc.channel.close()
        assert not (sockdir / "p").exists()

    run_loop(main())


def test_client_reconnects_and_pending_output_is_delivered(sockdir: Path, run_loop: Runner) -> None:
    async def main() -> None:
        path = f"{sockdir}/out"
        out = RecordChannel("outdev", Endpoint(Transport.UNIX, path), True, None)
        await out.channel.start()
        # no server yet: output waits in the pending queue
        assert out.send([(b"\x00" * 12 + ETH, 12)])
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await accepted.put((r, w))

        server = await asyncio.start_unix_server(on_conn, path)
        r, w = await asyncio.wait_for(accepted.get(), 10)
        body = await read_exactly(r, 8 + 12 + len(ETH))
        assert body == struct.pack(">II", 12 + len(ETH), 12) + b"\x00" * 12 + ETH
        # server side drops us; the client comes back by itself
        w.close()
        r2, w2 = await asyncio.wait_for(accepted.get(), 10)
        await until(lambda: out.channel.connected, "reconnected")
        assert out.send([(ETH, 0)])
        assert await read_exactly(r2, 8 + len(ETH)) == struct.pack(">II", len(ETH), 0) + ETH
        assert out.channel.stats.connects == 2
        w2.close()
        server.close()
        await out.channel.close()

    run_loop(main())


def test_output_overflow_is_dropped_and_counted_never_blocking(
    sockdir: Path, run_loop: Runner
) -> None:
    async def main() -> None:
        path = f"{sockdir}/o"
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen()
        ch = Channel("outdev", Endpoint(Transport.UNIX, path), max_buffer=1 << 20)
        await ch.start()
        await until(lambda: ch.connected, "connected")
        peer, _ = srv.accept()  # never reads
        chunk = b"z" * 65536
        results = [ch.write(chunk) for _ in range(200)]  # 13 MB into a 1 MB bound
        assert not all(results) and any(results)
        assert ch.stats.dropped_writes == results.count(False)
        assert ch.buffered_bytes() <= 1 << 20
        peer.close()
        srv.close()
        await ch.close()

    run_loop(main())


def test_tcp_server_replaces_old_peer_with_takeover(run_loop: Runner) -> None:
    async def main() -> None:
        data: list[bytes] = []
        ch = Channel("secondary_in", parse_endpoint("tcp:127.0.0.1:0,server,takeover=on"),
                     on_data=data.append)
        await ch.start()
        port = ch.port
        _, w1 = await asyncio.open_connection("127.0.0.1", port)
        await until(lambda: ch.connected, "first")
        _, w2 = await asyncio.open_connection("127.0.0.1", port)
        await until(lambda: ch.stats.replaced == 1, "replaced")
        w2.write(b"abc")
        await w2.drain()
        await until(lambda: b"".join(data) == b"abc", "data from new peer")
        for w in (w1, w2):
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
        await ch.close()

    run_loop(main())
