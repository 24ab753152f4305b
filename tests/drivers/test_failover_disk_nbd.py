"""`run --failover --heartbeat-disk-nbd`: the disk agent's data path is watched too.

A real `colo-proxy disk-agent` answers QMP and NBD; the probe reaches its NBD
socket through a relay the test controls, so "QMP alive, NBD path dead" can be
played: the loss is reported on the data path and, as the failover table says
for the disk agent, output stays held (no takeover).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from colo_proxy.core.config import Config
from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.runtime.failover import FailoverSettings, FailoverSupervisor
from tests.disk.agent_helpers import start_agent
from tests.drivers.test_supervisor_failover import run_settings
from tests.fakes import FakeQmp, until

PERIOD, MISSES = 0.1, 3


class Relay:
    """A unix-socket relay to the agent's NBD socket that can be cut."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.alive = True
        self.server: asyncio.Server | None = None

    async def start(self, path: Path) -> None:
        self.server = await asyncio.start_unix_server(self._conn, str(path))

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not self.alive:  # accept and say nothing: a dead path, not a refused one
            await asyncio.sleep(30)
            w.close()
            return
        ur, uw = await asyncio.open_unix_connection(str(self.target))

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
            b.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))


def test_a_dead_nbd_path_with_live_qmp_is_a_disk_loss(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    agent = start_agent(tmp_path, image)
    d = tmp_path

    async def main() -> dict[str, Any]:
        pri, sec = FakeQmp(), FakeQmp()
        servers = [await asyncio.start_unix_server(pri.serve, f"{d}/pqmp"),
                   await asyncio.start_unix_server(sec.serve, f"{d}/sqmp")]
        relay = Relay(agent.nbd)
        await relay.start(d / "nbd-relay")
        settings = run_settings(d, disk_qmp=parse_endpoint(f"unix:{agent.qmp}"))
        failover = FailoverSettings(PERIOD, MISSES, ("f1",), ("red0",), ("m0",), None,
                                    disk_nbd=parse_endpoint(f"unix:{d}/nbd-relay"))
        sup = FailoverSupervisor(Config(compare_timeout=60.0), settings, failover)
        await sup.start()
        hb = sup.heartbeats
        await until(lambda: all(st.answers >= 3 for st in hb.state.values()), "armed paths")
        relay.alive = False
        await until(lambda: bool(sup.losses), "disk loss")
        report = await sup.shutdown()
        assert relay.server is not None
        relay.server.close()
        for server in servers:
            server.close()
        return report

    try:
        report = asyncio.run(main())
    finally:
        agent.kill()
    fo = report["failover"]
    assert [(x["peer"], x["via"]) for x in fo["losses"]] == [("disk", "data")]
    assert fo["phase"] == "protected" and fo["steps"] == []
    disk = fo["heartbeats"]["disk"]
    assert disk["answers"] >= 3 and disk["data"]["answers"] >= 3 and disk["data"]["lost"]
