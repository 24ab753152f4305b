"""Endpoint specs in QEMU's spelling."""

from __future__ import annotations

import pytest

from colo_proxy.drivers.endpoints import Endpoint, Transport, parse_endpoint
from colo_proxy.errors import ConfigError

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
