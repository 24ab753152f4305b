"""asyncio NBD server driver: moves bytes between sockets and the sans-IO pieces.

Requests are served in order per connection, synchronously on the event loop
(reads are page-cache preads, writes are appends to the speculation log), which
keeps every request atomic with respect to checkpoints.  A client that does not
read its replies gets its input paused rather than growing our buffers.

Memory is bounded across connections too: a WRITE is buffered until its last
byte arrives (up to 32 MiB), so once the bytes buffered by all connections pass
``buffer_cap``, every connection but the one that started buffering first is
paused until a request completes (that one always goes on, so there is no
deadlock).  Connections beyond ``max_connections`` are refused.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import cast

from colo_proxy.disk.buffers import Export, Refusal
from colo_proxy.disk.engine import DiskEngine
from colo_proxy.disk.nbd_proto import (
    EINVAL,
    EIO,
    ENOSPC,
    ESHUTDOWN,
    Closed,
    Command,
    ExportChosen,
    ExportInfo,
    NbdServerConnection,
    Request,
    StartTls,
)

reply = NbdServerConnection.reply

log = logging.getLogger(__name__)

_REFUSAL_ERRNO = {Refusal.SHUTDOWN: ESHUTDOWN, Refusal.FAULTED: EIO, Refusal.LIMIT: ENOSPC}

DEFAULT_MAX_CONNECTIONS = 1024
"""NBD clients served at once (file descriptors, per-connection state)."""

DEFAULT_BUFFER_CAP = 64 << 20
"""Bytes of incomplete requests all connections may buffer before all but one pause."""


class NbdExports:
    """The exports one agent offers, by NBD name."""

    def __init__(self, engine: DiskEngine, names: dict[str, Export],
                 default: str | None, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 buffer_cap: int = DEFAULT_BUFFER_CAP) -> None:
        self.engine = engine
        self.names = names
        self.default = default
        self.max_connections = max_connections
        self.buffer_cap = buffer_cap
        self.buffered = 0
        self.buffered_peak = 0
        self.pauses = 0
        self._buffering: dict[NbdProtocol, int] = {}
        self._paused: dict[NbdProtocol, None] = {}
        self.connections = 0
        self.refused_connections = 0
        self.protocol_errors = 0
        self.tls_failures = 0
        self._limit_logged = False

    def account(self, proto: NbdProtocol, nbytes: int) -> None:
        """`proto` now buffers `nbytes`: pause it past the cap, resume others below."""
        old = self._buffering.pop(proto, 0) if nbytes == 0 else self._buffering.get(proto, 0)
        if nbytes:
            self._buffering[proto] = nbytes
        self.buffered += nbytes - old
        self.buffered_peak = max(self.buffered_peak, self.buffered)
        if (nbytes < old or not nbytes) and self._paused:
            leader = next(iter(self._buffering), None)
            for other in list(self._paused):
                if other is leader or self.buffered <= self.buffer_cap:
                    del self._paused[other]
                    other.resume_input()
        over = self.buffered > self.buffer_cap and nbytes
        if over and proto not in self._paused and next(iter(self._buffering)) is not proto:
            self.pauses += 1
            self._paused[proto] = None
            proto.pause_input()

    def forget(self, proto: NbdProtocol) -> None:
        self._paused.pop(proto, None)
        self.account(proto, 0)

    def infos(self) -> dict[str, ExportInfo]:
        return {name: ExportInfo(name, self.engine.size, description=f"colo-proxy {exp.value}")
                for name, exp in self.names.items()}

    def serve(self, export: Export, req: Request) -> bytes:
        """Carry out one valid request; return its reply."""
        eng = self.engine
        cmd = req.command
        try:
            if cmd is Command.READ:
                return reply(req.handle, 0, eng.read(export, req.offset, req.length))
            refusal: Refusal | None = None
            if cmd is Command.WRITE:
                refusal = eng.write(export, req.offset, req.data)
            elif cmd in (Command.WRITE_ZEROES, Command.TRIM):
                refusal = eng.write_zeroes(export, req.offset, req.length)
            elif cmd is Command.FLUSH:
                eng.flush(export)
            elif cmd is not Command.CACHE:
                return reply(req.handle, EINVAL)
            if refusal is Refusal.LIMIT and not self._limit_logged:
                self._limit_logged = True
                log.error("NBD writes refused (ENOSPC): this epoch's log reached its limit "
                          "of %d bytes (--max-epoch-bytes); checkpoint more often",
                          eng.max_log_bytes)
            if refusal is not None:
                return reply(req.handle, _REFUSAL_ERRNO[refusal])
            if req.fua:
                eng.flush(export)
            return reply(req.handle)
        except OSError as err:
            log.error("NBD %s at %d+%d failed: %s", cmd.name, req.offset, req.length, err)
            return reply(req.handle, EIO)
        except Exception:  # a bug must cost one request, not the connection
            log.exception("NBD %s at %d+%d failed", cmd.name, req.offset, req.length)
            return reply(req.handle, EIO)


class NbdProtocol(asyncio.Protocol):
    """One NBD client connection."""

    def __init__(self, exports: NbdExports, tls: ssl.SSLContext | None = None) -> None:
        self._exports = exports
        self._tls = tls
        self._conn = NbdServerConnection(exports.infos(), exports.default, tls is not None)
        self._export: Export | None = None
        self._transport: asyncio.Transport | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack alike.
        self._transport = cast(asyncio.Transport, transport)
        exports = self._exports
        if exports.connections >= exports.max_connections:
            exports.refused_connections += 1
            log.warning("NBD connection refused: %d connections already "
                        "(--nbd-max-connections)", exports.connections)
            self._refused = True
            self._transport.close()
            self._transport = None
            return
        exports.connections += 1
        self._transport.write(self._conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._refused:
            self._exports.connections -= 1
            self._exports.forget(self)
        self._transport = None

    async def _start_tls(self, transport: asyncio.Transport) -> None:
        """STARTTLS: the rest of the connection runs inside TLS (client certificate
        checked against the CA when the context requires one)."""
        assert self._tls is not None
        loop = asyncio.get_running_loop()
        try:
            tls_transport = await loop.start_tls(transport, self, self._tls, server_side=True)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as err:
            self._exports.tls_failures += 1
            log.warning("NBD TLS handshake failed: %s", err)
            transport.abort()
            return
        if tls_transport is None:  # pragma: no cover - closed meanwhile
            return
        self._transport = tls_transport
        self._conn.tls_started()

    def pause_input(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_input(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        events = self._conn.receive_data(data)
        out: list[bytes] = []
        closed: Closed | None = None
        for ev in events:
            if isinstance(ev, Request):
                assert self._export is not None
                out.append(self._exports.serve(self._export, ev))
            elif isinstance(ev, ExportChosen):
                self._export = self._exports.names[ev.export.name]
            elif isinstance(ev, StartTls):
                out.append(self._conn.data_to_send())
                transport.write(b"".join(out))
                out = []
                transport.pause_reading()  # the ClientHello is for the TLS layer
                asyncio.get_running_loop().create_task(self._start_tls(transport))
            else:
                closed = ev
        out.append(self._conn.data_to_send())
        self._exports.account(self, self._conn.buffered)
        payload = b"".join(out)
        if payload:
            transport.write(payload)
        if closed is not None:
            if closed.error:
                self._exports.protocol_errors += 1
                log.warning("NBD client dropped: %s", closed.error)
            transport.close()
