"""The disk agent under attack: one epoch's log and the NBD connections are bounded.

(`sockdir`, a short directory under /tmp, comes from this package's conftest.)
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

from colo_proxy.disk import nbd_proto
from colo_proxy.disk.address import Address
from colo_proxy.disk.agent import AgentConfig, DiskAgent
from colo_proxy.disk.buffers import Export, Refusal
from colo_proxy.disk.engine import DiskEngine

SIZE = 1 << 20


def engine(sockdir: Path, **kw: int) -> DiskEngine:
    img = sockdir / "img"
    img.write_bytes(bytes(SIZE))
    return DiskEngine(img, sockdir / "state", **kw)


def test_one_epoch_log_is_bounded_and_refusals_counted(sockdir: Path) -> None:
    eng = engine(sockdir, memory_cap=64 << 10, max_log_bytes=256 << 10)
    block = b"\xab" * (32 << 10)
    results = [eng.write(Export.REPLICATION, 0, block) for _ in range(20)]
    assert results[:8] == [None] * 8  # 8 x 32 KiB fill the 256 KiB exactly
    assert set(results[8:]) == {Refusal.LIMIT}
    assert eng.limit_refusals == 12
    assert eng.status().speculation_bytes <= 256 << 10
    # a checkpoint seals the epoch: the next one has room again
    seal = eng.begin_checkpoint(1)
    eng.finish_checkpoint(1, eng.write_journal(seal))
    assert eng.write(Export.REPLICATION, 0, block) is None
    eng.close()


def test_log_limit_has_a_default(sockdir: Path) -> None:
    eng = engine(sockdir)
    assert 0 < eng.max_log_bytes < 1 << 40
    eng.close()


def test_nbd_connection_limit_and_enospc(sockdir: Path) -> None:
    async def main() -> None:
        eng = engine(sockdir, max_log_bytes=64 << 10)
        agent = DiskAgent(eng, AgentConfig(
            nbd=(Address(path=str(sockdir / "nbd")),), qmp=(Address(path=str(sockdir / "q")),),
            nbd_max_connections=2))
        await agent.start()
        conns = []
        try:
            for _ in range(2):
                r, w = await asyncio.open_unix_connection(str(sockdir / "nbd"))
                greeting = await asyncio.wait_for(r.readexactly(18), 10)
                assert struct.unpack(">QQ", greeting[:16]) == (nbd_proto.NBDMAGIC,
                                                                 nbd_proto.IHAVEOPT)
                conns.append((r, w))
            r3, w3 = await asyncio.open_unix_connection(str(sockdir / "nbd"))
            assert await asyncio.wait_for(r3.read(), 10) == b""  # refused: closed at once
            w3.close()
            status = await agent._query({})
            assert status["nbd-connections"] == 2 and status["nbd-refused-connections"] == 1
            # a refused write answers ENOSPC (not a dropped connection, not a silent grow)
            served = agent.nbd.serve(Export.REPLICATION, nbd_proto.Request(
                nbd_proto.Command.WRITE, 0, 1, 0, 128 << 10, b"x" * (128 << 10)))
            assert struct.unpack(">IIQ", served)[1] == nbd_proto.ENOSPC
            assert (await agent._query({}))["limit-refusals"] == 1
        finally:
            for _, w in conns:
                w.close()
            await agent.close()

    asyncio.run(main())


def test_incomplete_writes_of_many_connections_are_bounded(sockdir: Path) -> None:
    """8 clients each send a 1 MiB WRITE slowly (half, then the rest): with a 256 KiB
    cap, all but one pause; every write still completes."""
    from tests.disk.nbdwire import go_payload, option, request

    handshake = struct.pack(">I", 3) + option(nbd_proto.OPT_GO, go_payload("replication"))
    big = 1 << 20

    async def main() -> None:
        img = sockdir / "img"
        img.write_bytes(bytes(16 * big))
        eng = DiskEngine(img, sockdir / "state")
        agent = DiskAgent(eng, AgentConfig(
            nbd=(Address(path=str(sockdir / "nbd")),), qmp=(Address(path=str(sockdir / "q")),)))
        agent.nbd.buffer_cap = 256 << 10
        await agent.start()
        clients = []
        try:
            for i in range(8):
                r, w = await asyncio.open_unix_connection(str(sockdir / "nbd"))
                wire = handshake + request(nbd_proto.Command.WRITE, i * big, big, handle=i,
                                           data=bytes([i + 1]) * big)
                w.write(wire[:len(wire) // 2])
                clients.append((r, w, wire))
            for _ in range(50):
                await asyncio.sleep(0.01)
            for _, w, wire in clients:
                w.write(wire[len(wire) // 2:])
            for i, (r, _, _) in enumerate(clients):
                # greeting (18) + option reply... then the simple reply of the write
                data = b""
                while nbd_proto.SIMPLE_REPLY_MAGIC.to_bytes(4, "big") not in data:
                    chunk = await asyncio.wait_for(r.read(4096), 20)
                    assert chunk, f"client {i} closed"
                    data += chunk
            assert agent.nbd.pauses >= 1
            assert agent.nbd.buffered_peak <= (256 << 10) + big + 8 * (256 << 10)
            assert agent.nbd.buffered == 0
            view = eng.read(Export.REPLICATION, 0, 8 * big)
            assert all(view[i * big:(i + 1) * big] == bytes([i + 1]) * big for i in range(8))
        finally:
            for _, w, _ in clients:
                w.close()
            await agent.close()

    asyncio.run(main())
