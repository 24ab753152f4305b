"""asyncio QMP control server: sessions from ``qmp_proto``, commands run in order.

Each connection runs its commands one at a time, in arrival order, as QEMU does
for in-band commands; events go to every negotiated connection.  Handlers raise
``QmpCommandError`` to answer with an error class; any other exception becomes a
GenericError reply, never a dead server.

Commands named in ``restricted`` (the destructive ones: ``quit``, failover) run
only for trusted connections: those on a unix socket (created 0600, so the
agent's own user), or any connection when the operator allowed it explicitly.
Every refusal is logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from colo_proxy.disk.qmp_proto import (
    GENERIC_ERROR,
    Closed,
    CommandSpec,
    Execute,
    QmpSession,
    event_message,
)
from colo_proxy.errors import ColoProxyError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class QmpCommandError(ColoProxyError):
    """A command failed; ``cls`` is the QMP error class sent back."""

    def __init__(self, desc: str, cls: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


class QmpServer:
    """The command table plus the set of live sessions (for events)."""

    def __init__(self) -> None:
        self.specs: dict[str, CommandSpec] = {}
        self.handlers: dict[str, Handler] = {}
        self.protocols: set[QmpProtocol] = set()
        self.restricted: set[str] = set()
        self.refused = 0

    def command(self, name: str, spec: CommandSpec, handler: Handler,
                restricted: bool = False) -> None:
        self.specs[name] = spec
        self.handlers[name] = handler
        if restricted:
            self.restricted.add(name)

    def protocol(self, trusted: bool = True) -> QmpProtocol:
        return QmpProtocol(self, trusted)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        msg = event_message(name, data, time.time())
        for proto in list(self.protocols):
            proto.send_event(msg)

    def close_all(self) -> None:
        for proto in list(self.protocols):
            proto.close()


class QmpProtocol(asyncio.Protocol):
    """One QMP client connection."""

    def __init__(self, server: QmpServer, trusted: bool = True) -> None:
        self._server = server
        self._trusted = trusted
        self._session = QmpSession(server.specs)
        self._transport: asyncio.Transport | None = None
        self._queue: asyncio.Queue[Execute] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack alike.
        self._transport = cast(asyncio.Transport, transport)
        self._server.protocols.add(self)
        self._worker = asyncio.get_running_loop().create_task(self._run())
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.protocols.discard(self)
        self._transport = None
        if self._worker is not None:
            self._worker.cancel()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _flush(self) -> None:
        data = self._session.data_to_send()
        if data and self._transport is not None:
            self._transport.write(data)

    def pause_writing(self) -> None:
        """A client that does not read its replies stops being read from."""
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def send_event(self, msg: bytes) -> None:
        if self._session.negotiated and self._transport is not None:
            self._transport.write(msg)

    def data_received(self, data: bytes) -> None:
        for ev in self._session.receive_data(data):
            if isinstance(ev, Closed):
                log.warning("QMP client dropped: %s", ev.error)
                self._flush()
                self.close()
                return
            self._queue.put_nowait(ev)
        self._flush()

    async def _run(self) -> None:
        while True:
            ex = await self._queue.get()
            handler = self._server.handlers[ex.command]
            try:
                if not self._trusted and ex.command in self._server.restricted:
                    self._server.refused += 1
                    log.warning("QMP %s refused on a TCP connection", ex.command)
                    raise QmpCommandError(
                        f"{ex.command} is only allowed on a unix socket "
                        "(or with --qmp-remote-control)")
                reply = self._session.result(ex, await handler(ex.arguments))
            except QmpCommandError as err:
                reply = self._session.error(ex, err.cls, err.desc)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a handler bug must not kill the server
                log.exception("QMP command %s failed", ex.command)
                reply = self._session.error(ex, GENERIC_ERROR, f"internal error: {err}")
            if self._transport is not None:
                self._transport.write(reply)
