"""``unix:PATH`` / ``tcp:HOST:PORT`` listen addresses and the asyncio servers behind them."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from colo_proxy.drivers.endpoints import (
    Transport,
    is_loopback,
    parse_endpoint,
    remove_stale_socket,
    unix_listener,
)
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
    """Parse ``unix:PATH`` or ``tcp:HOST:PORT`` (IPv6 hosts in brackets).

    The spelling of :func:`~colo_proxy.drivers.endpoints.parse_endpoint`, the
    one endpoint parser; a listen address takes the kind prefix and no options.
    """
    kind, sep, _ = text.partition(":")
    if not sep or kind not in ("unix", "tcp") or "," in text:
        raise ConfigError(f"address {text!r}: expected unix:PATH or tcp:HOST:PORT")
    try:
        endpoint = parse_endpoint(text)
    except ConfigError as err:
        raise ConfigError(f"address {text!r}: {err}") from None
    if endpoint.transport is Transport.UNIX:
        return Address(path=endpoint.address)
    return Address(host=endpoint.address, port=endpoint.port)


async def listen(address: Address, factory: Callable[[], asyncio.BaseProtocol],
                 tls: ssl.SSLContext | None = None) -> asyncio.Server:
    """Start a server; a stale unix socket file from a dead agent is replaced.

    Unix sockets are created 0600 whatever the umask.
    """
    loop = asyncio.get_running_loop()
    try:
        if address.path is not None:
            remove_stale_socket(address.path)
            return await loop.create_unix_server(factory, sock=unix_listener(address.path),
                                                 ssl=tls)
        assert address.port is not None
        return await loop.create_server(factory, address.host, address.port,
                                        reuse_address=True, ssl=tls)
    except OSError as err:
        raise ConfigError(f"cannot listen on {address}: {err.strerror or err}") from err
