"""``unix:PATH`` / ``tcp:HOST:PORT`` listen addresses and the asyncio servers behind them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from colo_proxy.drivers.endpoints import is_loopback, unix_listener
from colo_proxy.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Address:
    """Where a server listens: a unix socket path, or a TCP host and port."""

    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else f"tcp:{self.host}:{self.port}"

    @property
    def remote(self) -> bool:
        """A TCP address other hosts can reach."""
        return self.path is None and not is_loopback(self.host or "")


def check_local(addresses: tuple[Address, ...], allow_remote: bool) -> None:
    """Refuse a non-loopback TCP listener unless explicitly allowed."""
    for addr in addresses:
        if addr.remote and not allow_remote:
            raise ConfigError(f"{addr} listens on a non-loopback address; give "
                              "--listen-remote to allow other hosts")


def parse_address(text: str) -> Address:
    """Parse ``unix:PATH`` or ``tcp:HOST:PORT`` (IPv6 hosts in brackets)."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ConfigError(f"address {text!r}: expected unix:PATH or tcp:HOST:PORT")
    if kind == "unix":
        return Address(path=rest)
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"address {text!r}: expected tcp:HOST:PORT")
        return Address(host=host.strip("[]") or "127.0.0.1", port=int(port))
    raise ConfigError(f"address {text!r}: unknown kind {kind!r} (unix or tcp)")


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file nobody listens on (left by a killed agent); refuse a live one."""
    if not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        except OSError as err:
            raise ConfigError(f"unix:{path} exists and is not a usable socket: {err}") from err
    raise ConfigError(f"unix:{path} is in use by a running server")


async def listen(address: Address, factory: Callable[[], asyncio.BaseProtocol],
                 tls: ssl.SSLContext | None = None) -> asyncio.Server:
    """Start a server; a stale unix socket file from a dead agent is replaced.

    Unix sockets are created 0600 whatever the umask.
    """
    loop = asyncio.get_running_loop()
    try:
        if address.path is not None:
            _remove_stale_socket(address.path)
            return await loop.create_unix_server(factory, sock=unix_listener(address.path),
                                                 ssl=tls)
        assert address.port is not None
        return await loop.create_server(factory, address.host, address.port,
                                        reuse_address=True, ssl=tls)
    except OSError as err:
        raise ConfigError(f"cannot listen on {address}: {err.strerror or err}") from err
