"""The asyncio agent in-process, driven by the real ``qemu.qmp`` client.

Applying and journaling are held back with gates (threading events) so the
ordering rules can be watched deterministically: acknowledgement does not wait
for apply, later checkpoints queue behind an unapplied one, failover waits for
every write-out.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from colo_proxy.disk.address import Address
from colo_proxy.disk.agent import AgentConfig, DiskAgent
from colo_proxy.disk.buffers import Export, Phase
from colo_proxy.disk.engine import DiskEngine

SIZE = 1 << 20


def gated(fn: Callable[..., Any], gate: threading.Event) -> Callable[..., Any]:
    def wrapper(*args: Any) -> Any:
        assert gate.wait(30), "test gate never opened"
        return fn(*args)
    return wrapper


def run_agent(sockdir: Path, body: Callable[[DiskAgent, QMPClient], Awaitable[None]],
              ack_sealed: bool = False) -> None:
    image = sockdir / "img"
    image.write_bytes(bytes(SIZE))

    async def main() -> None:
        engine = DiskEngine(image, sockdir / "state")
        agent = DiskAgent(engine, AgentConfig(
            nbd=(Address(path=str(sockdir / "nbd")),), qmp=(Address(path=str(sockdir / "qmp")),),
            ack_sealed=ack_sealed))
        await agent.start()
        client = QMPClient("test")
        try:
            await client.connect(str(sockdir / "qmp"))
            await body(agent, client)
        finally:
            await client.disconnect()
            await agent.close()

    asyncio.run(main())


async def next_event(client: QMPClient, name: str) -> dict[str, Any]:
    while True:
        ev = await asyncio.wait_for(client.events.get(), 30)
        if ev["event"] == name:
            return dict(ev.get("data", {}))


def test_ack_does_not_wait_for_apply_and_failover_waits(sockdir: Path) -> None:
    gate = threading.Event()

    async def body(agent: DiskAgent, client: QMPClient) -> None:
        eng = agent.engine
        eng.run_apply = gated(eng.run_apply, gate)  # type: ignore[method-assign]
        eng.write(Export.REPLICATION, 0, b"a" * 100)
        assert await client.execute("colo-disk-checkpoint", {"epoch": 1}) == {"epoch": 1}
        eng.write(Export.REPLICATION, 50, b"b" * 100)
        assert await client.execute("colo-disk-checkpoint", {"epoch": 2}) == {"epoch": 2}
        status = await client.execute("query-colo-disk")
        assert status["epoch"] == 2 and status["applied-epoch"] == 0
        assert [w["epoch"] for w in status["write-outs"]] == [1, 2]
        assert status["apply-progress"]["epoch"] == 1
        # Reads see base, then write-outs (newest first), then speculation.
        eng.write(Export.REPLICATION, 120, b"c" * 10)
        assert eng.read(Export.REPLICATION, 0, 140) == (
            b"a" * 50 + b"b" * 70 + b"c" * 10 + b"b" * 10)
        failover = asyncio.ensure_future(client.execute("colo-disk-failover"))
        await asyncio.sleep(0.05)
        assert not failover.done()  # cannot finish while epoch 1 is held back
        gate.set()
        assert await failover == {"epoch": 2}
        assert await next_event(client, "COLO_DISK_EPOCH_APPLIED") == {"epoch": 1}
        assert await next_event(client, "COLO_DISK_EPOCH_APPLIED") == {"epoch": 2}
        assert await next_event(client, "COLO_DISK_FAILOVER") == {"epoch": 2}
        data = (sockdir / "img").read_bytes()
        assert data[:150] == b"a" * 50 + b"b" * 100 and data[150:160] == bytes(10)
        with pytest.raises(ExecuteError) as err:
            await client.execute("colo-disk-checkpoint", {"epoch": 3})
        assert err.value.error_class == "GenericError"

    run_agent(sockdir, body)


def test_failover_applies_the_overlay_in_a_worker_and_keeps_serving(sockdir: Path) -> None:
    gate = threading.Event()

    async def body(agent: DiskAgent, client: QMPClient) -> None:
        eng = agent.engine
        eng.run_apply_overlay = gated(  # type: ignore[method-assign]
            eng.run_apply_overlay, gate)
        eng.write(Export.REPLICATION, 0, b"a" * 100)
        assert await client.execute("colo-disk-checkpoint", {"epoch": 1}) == {"epoch": 1}
        eng.write(Export.REPLICATION, 0, b"spec")  # dropped at failover
        eng.write(Export.SECONDARY, 50, b"S" * 100)
        failover = asyncio.ensure_future(client.execute("colo-disk-failover"))
        while eng.replica.status().applying_epoch is not None or eng.replica.applied_epoch < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not failover.done()  # the overlay is still being copied
        st = eng.status()  # (not over QMP: this connection waits for the failover reply)
        assert st.phase is Phase.FAILING_OVER and st.overlay_bytes == 100
        # The loop keeps serving the secondary while the worker is held.
        assert eng.write(Export.SECONDARY, 140, b"T" * 20) is None
        want = b"a" * 50 + b"S" * 90 + b"T" * 20
        assert eng.read(Export.SECONDARY, 0, 160) == want
        gate.set()
        assert await asyncio.wait_for(failover, 30) == {"epoch": 1}
        assert await next_event(client, "COLO_DISK_FAILOVER") == {"epoch": 1}
        assert eng.replica.phase is Phase.FAILED_OVER
        assert (sockdir / "img").read_bytes()[:160] == want

    run_agent(sockdir, body)


def test_overlay_apply_failure_fails_the_failover(sockdir: Path) -> None:
    async def body(agent: DiskAgent, client: QMPClient) -> None:
        eng = agent.engine

        def broken(*_: Any) -> Any:
            raise OSError(5, "Input/output error")

        eng.run_apply_overlay = broken  # type: ignore[method-assign]
        eng.write(Export.SECONDARY, 0, b"s")
        with pytest.raises(ExecuteError) as err:
            await asyncio.wait_for(client.execute("colo-disk-failover"), 30)
        assert "Input/output error" in str(err.value)
        assert eng.read(Export.SECONDARY, 0, 1) == b"s"  # still served from the overlay
        assert "overlay" in (await client.execute("query-colo-disk"))["error"]

    run_agent(sockdir, body)


def test_sealed_ack_mode_answers_before_the_journal(sockdir: Path) -> None:
    gate = threading.Event()

    async def body(agent: DiskAgent, client: QMPClient) -> None:
        eng = agent.engine
        eng.write_journal = gated(eng.write_journal, gate)  # type: ignore[method-assign]
        eng.write(Export.REPLICATION, 0, b"x" * 10)
        assert await client.execute("colo-disk-checkpoint", {"epoch": 1}) == {"epoch": 1}
        status = await client.execute("query-colo-disk")
        assert status["sealed-epoch"] == 1 and status["epoch"] == 0
        assert status["write-outs"] == [{"epoch": 1, "bytes": 10, "journaled": False}]
        assert eng.read(Export.SECONDARY, 0, 10) == b"x" * 10
        gate.set()
        assert await next_event(client, "COLO_DISK_EPOCH_APPLIED") == {"epoch": 1}
        assert (sockdir / "img").read_bytes()[:10] == b"x" * 10

    run_agent(sockdir, body, ack_sealed=True)


def test_journal_failure_is_reported_and_faults(sockdir: Path) -> None:
    async def body(agent: DiskAgent, client: QMPClient) -> None:
        eng = agent.engine

        def broken(*_: Any) -> Any:
            raise OSError(28, "No space left on device")

        eng.write_journal = broken  # type: ignore[method-assign]
        eng.write(Export.REPLICATION, 0, b"x")
        with pytest.raises(ExecuteError) as err:
            await client.execute("colo-disk-checkpoint", {"epoch": 1})
        assert "No space left" in str(err.value)
        assert eng.replica.phase is Phase.FAULTED
        assert (await client.execute("query-colo-disk"))["phase"] == "faulted"
        assert eng.write(Export.REPLICATION, 0, b"y") is not None
        assert await client.execute("colo-disk-failover") == {"epoch": 0}

    run_agent(sockdir, body)


def test_query_commands_and_version(sockdir: Path) -> None:
    async def body(agent: DiskAgent, client: QMPClient) -> None:
        names = {c["name"] for c in await client.execute("query-commands")}
        assert {"colo-disk-checkpoint", "colo-disk-failover", "query-colo-disk"} <= names
        assert (await client.execute("query-version"))["package"] == "colo-proxy disk-agent"

    run_agent(sockdir, body)


def test_garbage_on_both_servers_never_hurts(sockdir: Path) -> None:
    """Random and mutated input on NBD and QMP: the agent keeps serving, state stays sane."""
    import random
    import struct

    from colo_proxy.disk import nbd_proto as p
    from tests.disk.nbdwire import go_payload, option, request

    rng = random.Random(99)
    handshake = struct.pack(">I", 3) + option(p.OPT_GO, go_payload("replication"))

    async def blast(path: Path, data: bytes) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(data)
            await writer.drain()
            writer.write_eof()
            await asyncio.wait_for(reader.read(), 30)  # until the server hangs up
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def body(agent: DiskAgent, client: QMPClient) -> None:
        for trial in range(150):
            valid = request(p.Command.READ, rng.randrange(0, SIZE), rng.randrange(0, 4096),
                            handle=trial)
            mutated = bytearray(valid)
            mutated[rng.randrange(0, len(mutated))] ^= 1 << rng.randrange(8)
            junk = rng.randbytes(rng.randrange(0, 200))
            nbd_input = rng.choice([junk, handshake + junk, handshake + bytes(mutated) + junk,
                                    handshake[:rng.randrange(len(handshake))]])
            qmp_input = rng.choice([
                junk, b'{"execute": "qmp_capabilities"}' + junk,
                b'{"execute": "qmp_capabilities"}{"execute": "colo-disk-checkpoint", '
                b'"arguments": {"epoch": ' + str(rng.randrange(-5, 5)).encode() + b"}}" + junk,
                b"[" * rng.randrange(1, 200), b'{"execute": "' + junk.hex().encode()])
            await asyncio.gather(blast(sockdir / "nbd", nbd_input),
                                 blast(sockdir / "qmp", qmp_input))
        # Still serving, and consistent: what the replication export shows is what a
        # checkpoint puts on disk.
        status = await client.execute("query-colo-disk")
        assert status["phase"] == "replicating"
        view = agent.engine.read(Export.REPLICATION, 0, SIZE)
        epoch = status["sealed-epoch"] + 1
        await client.execute("colo-disk-checkpoint", {"epoch": epoch})
        while (await client.execute("query-colo-disk"))["applied-epoch"] < epoch:
            await next_event(client, "COLO_DISK_EPOCH_APPLIED")
        assert (sockdir / "img").read_bytes() == view
        assert agent.engine.status().writeouts == ()

    run_agent(sockdir, body)
