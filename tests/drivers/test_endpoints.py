"""Endpoint specs in QEMU's spelling."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from colo_proxy.drivers.endpoints import Endpoint, Transport, parse_endpoint, remove_stale_socket
from colo_proxy.drivers.qemu_socket import Channel
from colo_proxy.errors import ConfigError, TransportError

GOOD = [
    ("unix:/run/p.sock,server", Endpoint(Transport.UNIX, "/run/p.sock", 0, True)),
    ("unix:/run/p.sock,server=on,wait=off", Endpoint(Transport.UNIX, "/run/p.sock", 0, True)),
    ("unix:/run/p.sock,server,nowait", Endpoint(Transport.UNIX, "/run/p.sock", 0, True)),
    ("unix:/run/p.sock", Endpoint(Transport.UNIX, "/run/p.sock", 0, False)),
    ("/run/qmp.sock", Endpoint(Transport.UNIX, "/run/qmp.sock", 0, False)),
    ("unix:/a,reconnect=1", Endpoint(Transport.UNIX, "/a", 0, False, 1.0)),
    ("tcp:127.0.0.1:9003,server=off", Endpoint(Transport.TCP, "127.0.0.1", 9003, False)),
    ("tcp::9003,server", Endpoint(Transport.TCP, "127.0.0.1", 9003, True)),
    ("tcp:[::1]:4444,server=on", Endpoint(Transport.TCP, "::1", 4444, True)),
    ("tcp:localhost:0", Endpoint(Transport.TCP, "localhost", 0, False)),
]


@pytest.mark.parametrize(("spec", "want"), GOOD)
def test_parse(spec: str, want: Endpoint) -> None:
    assert parse_endpoint(spec) == want


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "tcp:host",
        "tcp:host:port",
        "tcp:host:70000",
        "tcp:[::1]4444",
        "unix:",
        "unix:/a,bogus",
        "unix:/a,server=maybe",
        "unix:/a,reconnect=x",
        "udp:1.2.3.4:5",
        "unix:/" + "x" * 120,
    ],
)
def test_parse_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_endpoint(spec)


def test_describe_round_trips() -> None:
    for spec, want in GOOD:
        assert parse_endpoint(want.describe()) == want, spec


def test_stale_socket_probe_never_removes_a_file_or_a_live_listener(sockdir: Path) -> None:
    """One cleanup for every listener: a dead socket file goes, a live one or a plain file stays."""
    plain = sockdir / "plain"
    plain.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        remove_stale_socket(str(plain))
    assert plain.read_text() == "not a socket"
    path = str(sockdir / "s")
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen()
    with pytest.raises(ConfigError, match="in use"):
        remove_stale_socket(path)
    live.close()  # the file stays, nobody listens: stale
    remove_stale_socket(path)
    assert not Path(path).exists()
    remove_stale_socket(path)  # nothing there: nothing to do


def test_run_channel_refuses_a_path_a_live_server_holds(sockdir: Path) -> None:
    """`run` probes before unlinking too: a second instance cannot steal a live socket."""
    path = f"{sockdir}/p"
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen()

    async def main() -> None:
        ch = Channel("primary_in", parse_endpoint(f"unix:{path},server"))
        with pytest.raises(TransportError, match="in use"):
            await ch.start()
        await ch.close()

    try:
        asyncio.run(main())
    finally:
        live.close()
    assert Path(path).exists()
