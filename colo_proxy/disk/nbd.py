"""asyncio NBD server driver: moves bytes between sockets and the sans-IO pieces.

Requests are served in order per connection, synchronously on the event loop
(reads are page-cache preads, writes are appends to the speculation log), which
keeps every request atomic with respect to checkpoints.  A client that does not
read its replies gets its input paused rather than growing our buffers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from colo_proxy.disk.buffers import Export, Refusal
from colo_proxy.disk.engine import DiskEngine
from colo_proxy.disk.nbd_proto import (
    EINVAL,
    EIO,
    ESHUTDOWN,
    Closed,
    Command,
    ExportChosen,
    ExportInfo,
    NbdServerConnection,
    Request,
)

reply = NbdServerConnection.reply

log = logging.getLogger(__name__)

_REFUSAL_ERRNO = {Refusal.SHUTDOWN: ESHUTDOWN, Refusal.FAULTED: EIO}


class NbdExports:
    """The exports one agent offers, by NBD name."""

    def __init__(self, engine: DiskEngine, names: dict[str, Export],
                 default: str | None) -> None:
        self.engine = engine
        self.names = names
        self.default = default
        self.connections = 0
        self.protocol_errors = 0

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

    def __init__(self, exports: NbdExports) -> None:
        self._exports = exports
        self._conn = NbdServerConnection(exports.infos(), exports.default)
        self._export: Export | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack alike.
        self._transport = cast(asyncio.Transport, transport)
        self._exports.connections += 1
        self._transport.write(self._conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self._exports.connections -= 1
        self._transport = None

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
            else:
                closed = ev
        out.append(self._conn.data_to_send())
        payload = b"".join(out)
        if payload:
            transport.write(payload)
        if closed is not None:
            if closed.error:
                self._exports.protocol_errors += 1
                log.warning("NBD client dropped: %s", closed.error)
            transport.close()
