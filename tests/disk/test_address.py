from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from colo_proxy.disk.address import Address, _remove_stale_socket, parse_address
from colo_proxy.disk.cli import parse_size
from colo_proxy.errors import ConfigError
from tests.disk.agent_helpers import short_tmpdir


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_parse_address() -> None:
    assert parse_address("unix:/run/a.sock") == Address(path="/run/a.sock")
    assert parse_address("tcp:127.0.0.1:10809") == Address(host="127.0.0.1", port=10809)
    assert parse_address("tcp:[::1]:1") == Address(host="::1", port=1)
    for bad in ("", "unix:", "tcp:host", "tcp:host:99999", "udp:x:1", "/path"):
        with pytest.raises(ConfigError):
            parse_address(bad)


def test_parse_size() -> None:
    assert parse_size("0") == 0
    assert parse_size("512K") == 512 << 10
    assert parse_size("256MiB") == 256 << 20
    assert parse_size("2g") == 2 << 30


def test_stale_socket_is_replaced_but_live_one_is_refused(sockdir: Path) -> None:
    path = str(sockdir / "s")
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen()
    with pytest.raises(ConfigError, match="in use"):
        _remove_stale_socket(path)
    live.close()  # the file stays, nobody listens: stale
    assert Path(path).exists()
    _remove_stale_socket(path)
    assert not Path(path).exists()
