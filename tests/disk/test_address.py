from __future__ import annotations

import pytest

from colo_proxy.disk.address import Address, parse_address
from colo_proxy.disk.cli import parse_size
from colo_proxy.errors import ConfigError


def test_parse_address() -> None:
    assert parse_address("unix:/run/a.sock") == Address(path="/run/a.sock")
    assert parse_address("tcp:127.0.0.1:10809") == Address(host="127.0.0.1", port=10809)
    assert parse_address("tcp:[::1]:1") == Address(host="::1", port=1)
    for bad in ("", "unix:", "tcp:host", "tcp:host:99999", "udp:x:1", "/path", "unix:/a,server"):
        with pytest.raises(ConfigError):
            parse_address(bad)


def test_parse_size() -> None:
    assert parse_size("0") == 0
    assert parse_size("512K") == 512 << 10
    assert parse_size("256MiB") == 256 << 20
    assert parse_size("2g") == 2 << 30
