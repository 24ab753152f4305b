"""Control surfaces: loopback or 0600 unix sockets by default, no silent takeover of
a record socket, destructive QMP commands only where they are allowed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from colo_proxy.disk.address import Address, listen
from colo_proxy.disk.agent import AgentConfig, DiskAgent
from colo_proxy.disk.engine import DiskEngine
from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.drivers.qemu_socket import Channel
from colo_proxy.errors import ConfigError
from colo_proxy.runtime import run_cli
from tests.fakes import Runner, free_port, until
from tests.hardening.test_careless import agent, cli, image, one_line_error

__all__ = ["image"]


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path: str | Path) -> int:
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    return st.st_mode & 0o777


def test_tcp_server_without_host_binds_loopback(run_loop: Runner) -> None:
    assert parse_endpoint("tcp::9003,server").address == "127.0.0.1"

    async def main() -> None:
        ch = Channel("secondary_in", parse_endpoint("tcp::0,server"))
        await ch.start()
        assert ch._server is not None
        assert ch._server.sockets[0].getsockname()[0] == "127.0.0.1"
        await ch.close()

    run_loop(main())


def run_settings(**values: Any) -> Any:
    base = {k: default for k, (_, default) in run_cli.RUN_KEYS.items()}
    base.update(primary_in="unix:/tmp/hd13-p,server", outdev="unix:/tmp/hd13-o,server",
                secondary_in="tcp:0.0.0.0:9004,server")
    base.update(values)
    return run_cli.settings_from_values(base)


def test_run_non_loopback_listener_needs_a_flag() -> None:
    with pytest.raises(ConfigError, match="listen-remote"):
        run_settings()
    with pytest.raises(ConfigError, match="listen-remote"):
        run_settings(secondary_in="tcp:[::]:9004,server")
    assert run_settings(listen_remote=True).secondary_in.address == "0.0.0.0"
    assert run_settings(secondary_in="tcp:localhost:9004,server").secondary_in.server
    # a client endpoint to another host is no listener
    assert not run_settings(secondary_in="tcp:192.0.2.1:9004").secondary_in.server
    parser = argparse.ArgumentParser()
    run_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["run", "--listen-remote"])
    assert run_cli.run_values(args)["listen_remote"] is True


def test_disk_agent_non_loopback_listener_needs_a_flag(image: Path, tmp_path: Path) -> None:
    line = one_line_error(cli(*agent(image, tmp_path, nbd="tcp:0.0.0.0:0")))
    assert "--listen-remote" in line


def test_channel_unix_socket_is_0600_under_umask_000(sockdir: Path, run_loop: Runner,
                                                     umask_000: None) -> None:
    async def main() -> None:
        ch = Channel("primary_in", parse_endpoint(f"unix:{sockdir}/p,server"))
        await ch.start()
        assert mode(sockdir / "p") == 0o600
        await ch.close()

    run_loop(main())


def test_disk_agent_unix_sockets_are_0600_under_umask_000(sockdir: Path, umask_000: None) -> None:
    async def main() -> None:
        srv = await listen(Address(path=str(sockdir / "q")), asyncio.Protocol)
        assert mode(sockdir / "q") == 0o600
        srv.close()

    asyncio.run(main())


def test_second_record_client_is_refused_not_a_takeover(sockdir: Path, run_loop: Runner) -> None:
    async def main() -> None:
        data: list[bytes] = []
        ch = Channel("outdev", parse_endpoint(f"unix:{sockdir}/o,server"), on_data=data.append)
        await ch.start()
        r1, w1 = await asyncio.open_unix_connection(f"{sockdir}/o")
        await until(lambda: ch.connected, "first peer")
        r2, w2 = await asyncio.open_unix_connection(f"{sockdir}/o")
        assert await asyncio.wait_for(r2.read(), 10) == b""  # refused: closed at once
        assert ch.stats.refused == 1 and ch.stats.replaced == 0
        ch.write(b"to-the-first")
        assert await asyncio.wait_for(r1.readexactly(12), 10) == b"to-the-first"
        w1.write(b"from-first")
        await w1.drain()
        await until(lambda: b"".join(data) == b"from-first", "first peer still read")
        # a peer that hung up is replaced at once, even before we noticed its EOF
        w1.close()
        r3, w3 = await asyncio.open_unix_connection(f"{sockdir}/o")
        await until(lambda: ch.stats.connects == 2, "new peer after the first left")
        ch.write(b"x")
        assert await asyncio.wait_for(r3.readexactly(1), 10) == b"x"
        for w in (w2, w3):
            w.close()
        await ch.close()

    run_loop(main())


def test_takeover_is_an_explicit_policy(sockdir: Path, run_loop: Runner) -> None:
    async def main() -> None:
        ch = Channel("outdev", parse_endpoint(f"unix:{sockdir}/o,server,takeover=on"))
        await ch.start()
        r1, w1 = await asyncio.open_unix_connection(f"{sockdir}/o")
        await until(lambda: ch.connected, "first peer")
        _, w2 = await asyncio.open_unix_connection(f"{sockdir}/o")
        await until(lambda: ch.stats.replaced == 1, "replaced")
        assert await asyncio.wait_for(r1.read(), 10) == b""
        for w in (w1, w2):
            w.close()
        await ch.close()

    run_loop(main())


@pytest.mark.parametrize("allow", [False, True])
def test_destructive_qmp_commands_only_on_unix_socket(sockdir: Path, allow: bool) -> None:
    img = sockdir / "img"
    img.write_bytes(bytes(1 << 20))
    port = free_port()

    async def main() -> None:
        engine = DiskEngine(img, sockdir / "state")
        dagent = DiskAgent(engine, AgentConfig(
            nbd=(Address(path=str(sockdir / "nbd")),),
            qmp=(Address(path=str(sockdir / "qmp")), Address(host="127.0.0.1", port=port)),
            qmp_remote_control=allow))
        await dagent.start()
        tcp, unix = QMPClient("tcp"), QMPClient("unix")
        try:
            await tcp.connect(("127.0.0.1", port))
            await unix.connect(str(sockdir / "qmp"))
            assert (await tcp.execute("query-colo-disk"))["epoch"] == 0
            await tcp.execute("colo-disk-checkpoint", {"epoch": 1})
            for cmd in ("colo-disk-failover", "quit"):
                if allow:
                    continue
                with pytest.raises(ExecuteError, match="unix socket"):
                    await tcp.execute(cmd)
            assert (await unix.execute("query-colo-disk"))["phase"] == "replicating"
            assert dagent.qmp.refused == (0 if allow else 2)
            await (tcp if allow else unix).execute("colo-disk-failover")
            await (tcp if allow else unix).execute("quit")
            await asyncio.wait_for(dagent.wait_stopped(), 10)
        finally:
            for c in (tcp, unix):
                with contextlib.suppress(Exception):
                    await c.disconnect()
            await dagent.close()

    asyncio.run(main())
