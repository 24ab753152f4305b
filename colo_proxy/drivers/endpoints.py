"""Parse socket endpoint specs in QEMU's own spelling.

``unix:PATH[,server][,wait=off]`` and ``tcp:HOST:PORT[,server]``, with the
options QEMU accepts on ``-chardev``/``-qmp`` legacy syntax: ``server``,
``server=on|off``, ``wait=on|off``, ``nowait``, ``reconnect=SECONDS`` and
``nodelay``.  A bare path (no ``unix:``) is a unix socket too, as for
QEMU's ``-qmp``.  ``tcp:[::1]:4444`` takes an IPv6 address.

colo-proxy never blocks start-up waiting for a client, so ``wait`` is
accepted for compatibility and ignored; ``reconnect`` sets the client's
first retry delay (it always retries, with backoff).

Locked down by default: ``tcp::PORT`` means 127.0.0.1 (QEMU would take every
address), unix sockets we listen on are created 0600 whatever the umask, and
a server keeps its first peer while that peer is alive: a second client is
refused (counted) unless the endpoint says ``takeover=on``.

This is the one parser of ``unix:``/``tcp:`` specs: the disk agent's listen
addresses (:func:`colo_proxy.disk.address.parse_address`) are these specs
without options, and every listener clears a leftover socket file the same
way (:func:`remove_stale_socket`: probe first, unlink only a dead one).
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass

from colo_proxy.errors import ConfigError


class Transport(enum.Enum):
    """Socket family of an endpoint."""

    UNIX = "unix"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one chardev-like socket lives and which end we are."""

    transport: Transport
    address: str
    """Unix socket path, or the TCP host."""
    port: int = 0
    server: bool = False
    reconnect: float = 0.0
    takeover: bool = False
    """A server lets a new client replace a live one (default: refuse it)."""

    def describe(self) -> str:
        """The spec back in QEMU spelling, for logs."""
        where = (
            f"unix:{self.address}"
            if self.transport is Transport.UNIX
            else f"tcp:{_host_text(self.address)}:{self.port}"
        )
        where += ",server" if self.server else ""
        where += ",takeover=on" if self.takeover else ""
        return where + (f",reconnect={self.reconnect:g}" if self.reconnect else "")

    def remote_listener(self) -> bool:
        """Whether this is a TCP server reachable from other hosts."""
        return self.server and self.transport is Transport.TCP and not is_loopback(self.address)

    def qmp_address(self) -> str | tuple[str, int]:
        """The address form qemu.qmp's ``connect`` takes."""
        if self.transport is Transport.UNIX:
            return self.address
        return (self.address, self.port)


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


_ON = {"on", "yes", "true", ""}
_OFF = {"off", "no", "false"}


def _flag(name: str, value: str) -> bool:
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ConfigError(f"{name}={value!r}: expected on or off")


def parse_endpoint(spec: str) -> Endpoint:
    """Parse one endpoint spec; a :class:`ConfigError` names what is wrong."""
    if not spec:
        raise ConfigError("empty endpoint")
    head, *options = spec.split(",")
    server = takeover = False
    reconnect = 0.0
    for option in options:
        name, _, value = option.partition("=")
        if name == "server":
            server = _flag(name, value)
        elif name == "takeover":
            takeover = _flag(name, value)
        elif name == "nowait":
            continue
        elif name in ("wait", "nodelay"):
            _flag(name, value)
        elif name == "reconnect":
            try:
                reconnect = float(value)
            except ValueError:
                raise ConfigError(f"{spec}: reconnect={value!r} is not a number") from None
            if reconnect < 0:
                raise ConfigError(f"{spec}: reconnect must not be negative")
        else:
            raise ConfigError(f"{spec}: unknown option {name!r}")
    kind, sep, rest = head.partition(":")
    if sep and kind == "tcp":
        host, port = _split_host_port(spec, rest)
        return Endpoint(Transport.TCP, host, port, server, reconnect, takeover)
    if sep and kind == "unix":
        path = rest
    elif sep and kind in ("tcp6", "udp", "telnet", "websocket", "fd", "vsock"):
        raise ConfigError(f"{spec}: only unix: and tcp: endpoints are supported")
    else:
        path = head
    if not path:
        raise ConfigError(f"{spec}: empty unix socket path")
    if len(path.encode()) > 107:
        raise ConfigError(f"{spec}: unix socket path longer than 107 bytes")
    return Endpoint(Transport.UNIX, path, 0, server, reconnect, takeover)


def _split_host_port(spec: str, rest: str) -> tuple[str, int]:
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or not tail.startswith(":"):
            raise ConfigError(f"{spec}: expected tcp:[ADDR]:PORT")
        port_text = tail[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise ConfigError(f"{spec}: expected tcp:HOST:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{spec}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{spec}: port {port} out of range")
    return host or "127.0.0.1", port


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable from this machine only (names: localhost only)."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name may resolve to anything: it needs the explicit flag


def remove_stale_socket(path: str) -> None:
    """Unlink a socket file nobody listens on (left by a killed process); refuse a live one.

    The probe (a connect) comes before the unlink, so a second instance
    started on the same path fails with a clear error instead of silently
    taking the path away from the first; a file that is not a socket is
    never removed.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise ConfigError(f"unix:{path}: cannot inspect: {err.strerror or err}") from err
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"unix:{path} exists and is not a socket")
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


def unix_listener(path: str) -> socket.socket:
    """A listening unix socket created 0600 whatever the umask.

    The mode is set between bind() and listen(): no client can connect before
    listen(), so there is no window in which the socket is open to others.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(100)
    except OSError:
        sock.close()
        with contextlib.suppress(OSError):
            if os.path.exists(path):
                os.unlink(path)
        raise
    sock.setblocking(False)
    return sock


def peer_alive(sock: object) -> bool:
    """Whether a connected socket's peer is still there (no EOF, no error pending).

    Peeks without consuming: a peer that hung up shows EOF at once on a unix
    socket, even before the event loop delivered it to its protocol.
    """
    fileno = getattr(sock, "fileno", None)
    if fileno is None:
        return False
    try:
        fd = fileno()
        if fd < 0:
            return False
        with socket.socket(fileno=os.dup(fd)) as dup:
            data = dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return bool(data)
