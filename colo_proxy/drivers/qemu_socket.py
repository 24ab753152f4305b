"""asyncio socket channels standing in for QEMU chardevs.

Theory of operation
-------------------
A :class:`Channel` is one endpoint (``--primary-in``, ``--outdev`` ...).  It
holds at most one live connection at a time, like a QEMU socket chardev:

* as a server it listens for the whole run (unix sockets created 0600); a
  new client is refused (logged and counted) while the current peer is alive,
  so no other local process can take over ``outdev`` or ``primary_in``; a
  current peer that already hung up (a restarted QEMU reconnects before its
  EOF reached us) is replaced at once.  ``takeover=on`` on the endpoint lets
  any new client replace the current one (logged and counted);
* as a client it connects, and whenever the connection drops it retries
  with exponential backoff, for ever, until closed.

Bytes read are handed straight to ``on_data`` from ``data_received``, so
reading never waits for anything; decoding and the core run synchronously
in that callback on the loop thread.  Writing never blocks either: asyncio
transports buffer what the kernel does not take.  That buffer is bounded by
``max_buffer``.  An output given ``throttles`` (``run``'s outdev: primary_in
and secondary_in) that goes over it while its peer is taking output pauses
reading those inputs until it drains to half the bound: backpressure, as
colo-compare's blocking write gives, without a frame lost to a reader that is
slow but reading (meanwhile it may hold up to twice the bound: what the reads
already taken release).  If the peer takes nothing for ``THROTTLE_STALL_S``
the inputs resume: that peer may be waiting for us to read what it writes (a
QEMU that writes ``primary_in`` and reads ``outdev`` from one main loop
deadlocks otherwise, reference section 1), and output past the bound is
dropped, counted and logged once per episode, as it is on an output without
throttles (or while no peer is connected and the pending queue is full).
While no peer is connected, output waits in a pending queue (same bound) and
is written on the next connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from colo_proxy.core.framing import Frame, FrameDecoder, encode_frames
from colo_proxy.drivers.endpoints import (
    Endpoint,
    Transport,
    peer_alive,
    remove_stale_socket,
    unix_listener,
)
from colo_proxy.errors import ConfigError, TransportError

log = logging.getLogger(__name__)

INITIAL_BACKOFF = 0.05
MAX_BACKOFF = 2.0
THROTTLE_POLL_S = 0.01
"""While an output holds its inputs paused, how often it checks its draining."""
THROTTLE_STALL_S = 0.2
"""An output whose peer takes nothing for this long lets its inputs go (see above)."""


@dataclass(slots=True)
class ChannelStats:
    """Counters for one channel (reported by ``stats()`` and at shutdown)."""

    connects: int = 0
    disconnects: int = 0
    replaced: int = 0
    refused: int = 0
    resets: int = 0
    connect_failures: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped_writes: int = 0
    dropped_bytes: int = 0
    throttles: int = 0
    """Times this output paused its inputs (over its bound, its peer reading)."""
    throttle_stalls: int = 0
    """Times it let them go because its peer took nothing for THROTTLE_STALL_S."""


class _ChannelProtocol(asyncio.Protocol):
    """Forwards transport callbacks to its channel; one instance per connection."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        _keepalive(transport.get_extra_info("socket"))
        self._channel._attach(self)

    def data_received(self, data: bytes) -> None:
        self._channel._received(self, data)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._channel._detach(self, exc)
        if not self.lost.done():
            self.lost.set_result(None)


OnData = Callable[[bytes], None]
OnEvent = Callable[[], None]


class Channel:
    """One chardev-like endpoint with reconnection and bounded, non-blocking output."""

    def __init__(
        self,
        name: str,
        endpoint: Endpoint,
        on_data: OnData | None = None,
        on_connect: OnEvent | None = None,
        on_disconnect: OnEvent | None = None,
        max_buffer: int = 64 * 1024 * 1024,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.stats = ChannelStats()
        self._on_data = on_data
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._max_buffer = max_buffer
        self._current: _ChannelProtocol | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._overflowing = False
        self._server: asyncio.Server | None = None
        self._client_task: asyncio.Task[None] | None = None
        self._closed = False
        self.connected_event = asyncio.Event()
        self.throttles: list[Channel] = []
        """Inputs to pause while this output is over its bound and its peer drains it
        (empty: output over the bound is dropped at once)."""
        self._throttling = False
        self._stalled = False
        """The peer took nothing while the inputs were paused: drop, do not pause again,
        until the output is back under its bound."""
        self._mark = 0
        self._mark_time = 0.0
        self._reading_paused = False
        """(An input) reading paused by an output's throttle; kept across reconnections."""

    # ---- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Listen now (server) or start the connect loop (client)."""
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        if ep.server:
            try:
                if ep.transport is Transport.UNIX:
                    remove_stale_socket(ep.address)
                    self._server = await loop.create_unix_server(
                        lambda: _ChannelProtocol(self), sock=unix_listener(ep.address)
                    )
                else:
                    self._server = await loop.create_server(
                        lambda: _ChannelProtocol(self), ep.address, ep.port, reuse_address=True
                    )
            except (OSError, ConfigError) as err:
                raise TransportError(
                    f"{self.name}: cannot listen on {ep.describe()}: {err}"
                ) from err
            log.info("%s: listening on %s", self.name, ep.describe())
        else:
            self._client_task = asyncio.create_task(
                self._connect_loop(), name=f"{self.name}-connect"
            )

    async def close(self) -> None:
        """Stop listening/connecting and close the connection, flushing what we can."""
        self._closed = True
        if self._client_task is not None:
            self._client_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._client_task
        if self._server is not None:
            self._server.close()
            if self.endpoint.transport is Transport.UNIX:
                with contextlib.suppress(OSError):
                    os.unlink(self.endpoint.address)
        current = self._current
        if current is not None and current.transport is not None:
            current.transport.close()  # writes what is buffered, then closes
            await asyncio.wait({current.lost}, timeout=2.0)
            if current.transport is not None and not current.transport.is_closing():
                current.transport.abort()

    @property
    def connected(self) -> bool:
        """True while a peer is attached."""
        return self._current is not None

    @property
    def port(self) -> int:
        """The bound TCP port of a server (useful with port 0)."""
        # uvloop's Server.sockets is a list, asyncio's a tuple (and mypyc checks tuples)
        sockets: Any = getattr(self._server, "sockets", None)
        if not sockets:
            return self.endpoint.port
        return int(sockets[0].getsockname()[1])

    # ---- output -----------------------------------------------------------------------

    def buffered_bytes(self) -> int:
        """Output accepted but not yet taken by the kernel (or waiting for a peer)."""
        cur = self._current
        if cur is not None and cur.transport is not None:
            return cur.transport.get_write_buffer_size()
        return self._pending_bytes

    def write(self, data: bytes) -> bool:
        """Queue ``data`` without ever blocking; False if it was dropped (counted)."""
        if not data:
            return True
        size = self.buffered_bytes() + len(data)
        if size > self._max_buffer and not self._may_exceed(size):
            self.stats.dropped_writes += 1
            self.stats.dropped_bytes += len(data)
            if not self._overflowing:
                self._overflowing = True
                log.error(
                    "%s: output buffer full (%d bytes, peer %s): dropping output until it drains",
                    self.name,
                    self._max_buffer,
                    "connected" if self.connected else "not connected",
                )
            return False
        if self._stalled and size <= self._max_buffer:
            self._stalled = False
        if self._overflowing:
            self._overflowing = False
            log.warning(
                "%s: output buffer drained; %d writes dropped so far",
                self.name,
                self.stats.dropped_writes,
            )
        cur = self._current
        if cur is not None and cur.transport is not None:
            cur.transport.write(data)
            self.stats.bytes_out += len(data)
        else:
            self._pending.append(data)
            self._pending_bytes += len(data)
        return True

    def _may_exceed(self, size: int) -> bool:
        """Over the bound: pause the inputs (if any, and the peer is not stalled) and take
        up to twice the bound; False: drop."""
        if self._stalled:
            return False
        if not self.throttles or self._current is None or self._closed:
            return False
        if not self._throttling:
            self._throttle()
        return size <= 2 * self._max_buffer

    def _throttle(self) -> None:
        self._throttling = True
        self.stats.throttles += 1
        for channel in self.throttles:
            channel.pause_reading()
        loop = asyncio.get_running_loop()
        self._mark, self._mark_time = self.buffered_bytes(), loop.time()
        log.info("%s: output over %d bytes: inputs paused until it drains", self.name,
                 self._max_buffer)
        loop.call_later(THROTTLE_POLL_S, self._throttle_check)

    def _throttle_check(self) -> None:
        size = self.buffered_bytes()
        if self._current is None or self._closed or size <= self._max_buffer // 2:
            self._unthrottle(stalled=False)
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if size < self._mark:
            self._mark, self._mark_time = size, now
        elif now - self._mark_time >= THROTTLE_STALL_S:
            self.stats.throttle_stalls += 1
            log.warning("%s: peer took no output for %.1f s with the inputs paused: resuming "
                        "them (it may be waiting to write them); output past the bound is "
                        "dropped until it drains", self.name, THROTTLE_STALL_S)
            self._unthrottle(stalled=True)
            return
        loop.call_later(THROTTLE_POLL_S, self._throttle_check)

    def _unthrottle(self, stalled: bool) -> None:
        self._throttling = False
        self._stalled = stalled
        for channel in self.throttles:
            channel.resume_reading()

    def pause_reading(self) -> None:
        """Stop reading this input until resume_reading (an output's backpressure)."""
        self._reading_paused = True
        cur = self._current
        if cur is not None and cur.transport is not None and not cur.transport.is_closing():
            cur.transport.pause_reading()

    def resume_reading(self) -> None:
        self._reading_paused = False
        cur = self._current
        if cur is not None and cur.transport is not None and not cur.transport.is_closing():
            cur.transport.resume_reading()

    def reset(self, reason: str) -> None:
        """Drop the current connection (a broken stream); the peer may reconnect."""
        cur = self._current
        if cur is None or cur.transport is None:
            return
        self.stats.resets += 1
        log.error("%s: resetting connection: %s", self.name, reason)
        cur.transport.abort()

    # ---- transport callbacks ------------------------------------------------------------

    def _attach(self, proto: _ChannelProtocol) -> None:
        old = self._current
        if (old is not None and old.transport is not None and not self.endpoint.takeover
                and not self._closed and peer_alive(old.transport.get_extra_info("socket"))):
            self.stats.refused += 1
            log.warning("%s: refused a second client while the current peer is connected "
                        "(takeover=on on the endpoint allows it)", self.name)
            assert proto.transport is not None
            proto.transport.abort()
            return
        if old is not None and old.transport is not None:
            self.stats.replaced += 1
            log.warning("%s: a new peer connected; dropping the previous connection", self.name)
            self._current = None
            old.transport.abort()
        if self._closed:
            assert proto.transport is not None
            proto.transport.abort()
            return
        self._current = proto
        self.stats.connects += 1
        log.info("%s: peer connected (%s)", self.name, self.endpoint.describe())
        if self._reading_paused:
            assert proto.transport is not None
            proto.transport.pause_reading()
        if self._pending:
            assert proto.transport is not None
            proto.transport.writelines(self._pending)
            self.stats.bytes_out += self._pending_bytes
            self._pending = []
            self._pending_bytes = 0
        self.connected_event.set()
        if self._on_connect is not None:
            self._on_connect()

    def _received(self, proto: _ChannelProtocol, data: bytes) -> None:
        if proto is not self._current:
            return
        self.stats.bytes_in += len(data)
        if self._on_data is not None:
            self._on_data(data)

    def _detach(self, proto: _ChannelProtocol, exc: Exception | None) -> None:
        if proto is not self._current:
            return
        self._current = None
        self.connected_event.clear()
        self.stats.disconnects += 1
        log.info("%s: peer disconnected%s", self.name, f": {exc}" if exc else "")
        if self._on_disconnect is not None:
            self._on_disconnect()

    async def _connect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        first = ep.reconnect or INITIAL_BACKOFF
        backoff = first
        while not self._closed:
            proto: _ChannelProtocol | None = None
            try:
                if ep.transport is Transport.UNIX:
                    _, proto = await loop.create_unix_connection(
                        lambda: _ChannelProtocol(self), ep.address
                    )
                else:
                    _, proto = await loop.create_connection(
                        lambda: _ChannelProtocol(self), ep.address, ep.port
                    )
            except OSError as err:
                self.stats.connect_failures += 1
                if self.stats.connect_failures == 1 or backoff >= MAX_BACKOFF:
                    log.info(
                        "%s: cannot connect to %s (%s); retrying", self.name, ep.describe(), err
                    )
            if proto is not None:
                backoff = first
                await asyncio.shield(proto.lost)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)


def _keepalive(sock: socket.socket | None) -> None:
    """Notice a TCP peer whose host died (no FIN, no RST) within about 25 s."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


OnFrames = Callable[[list[Frame]], None]


class RecordChannel:
    """A :class:`Channel` speaking QEMU's record framing (primary_in, secondary_in, outdev).

    Decoding errors never reach the event loop: the frames before the bad
    record are delivered, the error is logged with what was wrong, the
    connection is reset and counted, and a fresh decoder waits for the peer
    to reconnect.  A partial record cut off by a disconnect is counted too.
    """

    def __init__(
        self,
        name: str,
        endpoint: Endpoint,
        vnet_hdr: bool,
        on_frames: OnFrames | None = None,
        max_buffer: int = 64 * 1024 * 1024,
    ) -> None:
        self.vnet_hdr = vnet_hdr
        self.decoder = FrameDecoder(vnet_hdr)
        self.frames_in = 0
        self.frames_out = 0
        self.dropped_frames = 0
        """Frames of batches the channel dropped (``send`` returned False)."""
        self.framing_errors = 0
        self.truncated_records = 0
        self.discarded_bytes = 0
        self._on_frames = on_frames
        self.channel = Channel(
            name,
            endpoint,
            on_data=self._data,
            on_connect=self._fresh,
            on_disconnect=self._fresh,
            max_buffer=max_buffer,
        )

    @property
    def name(self) -> str:
        return self.channel.name

    def _fresh(self) -> None:
        if self.decoder.pending_bytes:
            self.truncated_records += 1
            log.warning(
                "%s: connection ended inside a record; %d bytes discarded",
                self.name,
                self.decoder.pending_bytes,
            )
        self.decoder.reset()

    def _data(self, data: bytes) -> None:
        if self._on_frames is None:
            self.discarded_bytes += len(data)  # outdev: nothing is expected back
            return
        decoder = self.decoder
        frames = decoder.feed(data)
        if frames:
            self.frames_in += len(frames)
            self._on_frames(frames)
        error = decoder.error
        if error is not None:
            self.framing_errors += 1
            self.channel.reset(
                f"bad record ({error.describe()}; vnet_hdr_support="
                f"{'on' if self.vnet_hdr else 'off'}); {len(frames)} good frames kept"
            )
            decoder.reset()

    def send(self, frames: list[Frame]) -> bool:
        """Encode a batch into one write; False if the channel dropped it (counted there)."""
        if not frames:
            return True
        ok = self.channel.write(encode_frames(frames, self.vnet_hdr))
        if ok:
            self.frames_out += len(frames)
        else:
            self.dropped_frames += len(frames)
        return ok

    def counters(self) -> dict[str, int]:
        """Counters for stats and the shutdown report."""
        out = {
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "framing_errors": self.framing_errors,
            "truncated_records": self.truncated_records,
            "discarded_bytes": self.discarded_bytes,
        }
        for key in ChannelStats.__dataclass_fields__:
            out[key] = getattr(self.channel.stats, key)
        return out
