"""QMP driver on the official ``qemu.qmp`` asyncio client.

Theory of operation
-------------------
One :class:`QmpDriver` per QEMU (the primary's, optionally the secondary's).
It keeps a session up for the whole run: connect, negotiate (qemu.qmp does
the greeting and ``qmp_capabilities``), read ``query-status``,
``query-colo-status`` and ``query-migrate-parameters``, then follow events;
when QEMU goes away it reconnects with exponential backoff, for ever.

Checkpoints.  The only QMP way to force an immediate COLO checkpoint is to
set ``x-checkpoint-delay`` with ``migrate-set-parameters`` while migration
is in COLO state (QEMU calls ``colo_checkpoint_notify()`` on every set).  We
re-set the value QEMU already has, so the operator's delay is unchanged.  A
request is a flag, not a message: while disconnected it stays pending and
is sent on the next session (the output it protects stays held in the core
meanwhile, and the pending state is logged and reported).  A request QEMU
rejects is logged with QEMU's own message and retried with backoff.  A
request that QEMU accepted but that no ``STOP`` follows (outside COLO QEMU
accepts the parameter and does nothing) is re-sent after
``request_timeout``, doubling up to a minute, and counted.

Following checkpoints.  Every COLO checkpoint is ``STOP`` then ``RESUME``;
there is no dedicated event.  A user's ``stop``/``cont`` looks the same, and
treating it as a checkpoint would release unverified output.  So by default
(:attr:`FollowPolicy.COLO`) a ``STOP`` counts only while QEMU reports COLO
mode, and is confirmed with ``query-status``: a checkpoint stops the VM in
run state ``colo`` (``running`` if the checkpoint already finished); any
other state (``paused``) is a user pause and the following ``RESUME`` is
ignored.  :attr:`FollowPolicy.ALWAYS` follows every ``STOP``/``RESUME``
(tests, management layers that checkpoint by pausing).

``COLO_EXIT`` (failover, or the peer lost) is handed to ``on_colo_exit`` with
its data (``mode``, ``reason``), so the runtime can stop holding output once
the primary runs alone.

``checkpoint_delay`` overrides the value written on a request (by default
the current ``x-checkpoint-delay`` is read and written back, so an operator's
change made meanwhile is kept; QMP has no compare-and-set, so a change that
lands between a request's read and its write, one round trip, is overwritten).
A request sent while the COLO mode last read is not COLO asks for the mode
again first: COLO may have begun since (no event says so), and a request
outside COLO is accepted and never obeyed (``requests_outside_colo``).

MC periods.  When the policy moves the whole VM to MC,
:meth:`set_checkpoint_period` has QEMU checkpoint every MC period (its own
timer, ``x-checkpoint-delay``); the operator's value is read first and
written back when the VM returns to COLO.  Setting the parameter also
starts a checkpoint at once, which is what a switch wants anyway.

TLS.  ``ssl`` (a client context, e.g. from ``disk.tls.client_context``) wraps
the connection from its first byte, as QEMU's ``tls-creds`` on a QMP chardev
does.  A handshake failure (wrong CA, refused client certificate) is logged as
one error line and retried like any connection failure.  qemu.qmp's own
``disconnect()`` hangs for ever on a TLS transport (asyncio 3.11, uvloop: see
:class:`_Client`), so sessions are closed through that subclass, and every
disconnect is bounded by ``CLOSE_TIMEOUT`` besides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as _ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError, Runstate
from qemu.qmp.message import Message

from colo_proxy.drivers.endpoints import Endpoint
from colo_proxy.drivers.qmp_follow import FollowPolicy

__all__ = ["FollowPolicy", "QmpDriver", "QmpStats", "disconnect"]

log = logging.getLogger(__name__)

MAX_BACKOFF = 5.0
MAX_RESEND = 60.0
COLO_MODES = ("primary", "secondary")
CHECKPOINT_RUN_STATES = ("colo", "running")
CLOSE_TIMEOUT = 5.0
"""Seconds a disconnect may take before the session is abandoned (its socket closed)."""


@dataclass(slots=True)
class QmpStats:
    """Counters and last-known state, for stats() and the shutdown report."""

    sessions: int = 0
    connect_failures: int = 0
    requests_wanted: int = 0
    requests_sent: int = 0
    requests_resent: int = 0
    requests_outside_colo: int = 0
    """Requests sent while QEMU (asked again then) was not in COLO mode: none checkpoints."""
    request_errors: int = 0
    stops: int = 0
    resumes: int = 0
    checkpoints_started: int = 0
    checkpoints_done: int = 0
    pauses_ignored: int = 0
    period_changes: int = 0
    checkpoint_period_ms: int | None = None
    """The x-checkpoint-delay we set for MC (None: the operator's is in force)."""
    disconnects_abandoned: int = 0
    last_error: str = ""
    colo_status: dict[str, Any] = field(default_factory=dict)
    run_status: str = ""


Callback = Callable[[], None]

CONNECT_FAILURES = ("Failed to establish", "Failed to receive", "Did not understand",
                    "Negotiation failed")
"""How qemu.qmp's own ERROR lines about a failed connect begin."""


def _not_a_connect_failure(record: logging.LogRecord) -> bool:
    """qemu.qmp logs each failed connect at ERROR (on every retry); the driver reports
    failures itself, once and then at most every MAX_BACKOFF."""
    return not record.getMessage().startswith(CONNECT_FAILURES)


class _Client(QMPClient):
    """qemu.qmp's client with a disconnect that does not hang on TLS.

    ``disconnect()`` flushes with ``qemu.qmp.util.flush``: it sets the transport's
    write-buffer limits to (0, 0) and awaits ``drain()``.  CPython 3.11's SSL
    transport (``asyncio.sslproto``) pauses its protocol when the buffered size
    is ``>=`` the high-water mark, so with an empty buffer and high = 0 it pauses
    at once and, nothing being written, never resumes: ``drain()`` waits for
    ever (uvloop's SSL layer, a port of it, does the same).  Plain sockets test
    ``>`` and never pause on an empty buffer.  Flushing at the normal limits is
    enough: ``close()`` writes out what is buffered.
    """

    def __init__(self, name: str, nudge: bool = False) -> None:
        super().__init__(name)
        self.nudge = nudge
        """Follow every message with a newline of its own (TLS): QEMU's TLS chardev
        (7.2, seen here) leaves the last TLS record it read in gnutls' buffer until
        the socket is readable again, so a command alone is answered only when the
        next one comes; the newline is that next record, and JSON ignores it."""
        if _not_a_connect_failure not in self.logger.filters:
            self.logger.addFilter(_not_a_connect_failure)

    def _do_send(self, msg: Message) -> None:
        super()._do_send(msg)
        if self.nudge and self._writer is not None:
            self._writer.write(b"\n")

    async def _bh_flush_writer(self) -> None:
        if not self._writer_task:
            return
        await self._outgoing.join()
        if self._writer is not None:
            await self._writer.drain()


async def disconnect(client: QMPClient) -> bool:
    """Disconnect, never raising; False if it was abandoned after CLOSE_TIMEOUT."""
    try:
        await asyncio.wait_for(client.disconnect(), CLOSE_TIMEOUT)
    except TimeoutError:
        log.warning("%s: QMP disconnect did not finish in %gs; abandoned",
                    client.name, CLOSE_TIMEOUT)
        return False
    except Exception:  # the session is over, whatever went wrong
        pass
    return True


def _connect_error(err: QMPError, tls: bool) -> tuple[bool, str]:
    """Whether a connect failure is a TLS one, and its one-line description.

    A server that refuses our certificate under TLS 1.3 does so after our side of
    the handshake completed: we see the connection closed before the greeting.
    """
    cause = err.exc if isinstance(err, ConnectError) else err
    text = " ".join(str(err).split())
    if isinstance(cause, _ssl.SSLError):
        return True, text
    if tls and isinstance(cause, EOFError | ConnectionError):
        return True, (f"{text} (the server closed the TLS session before its greeting: "
                      "it refused our client certificate, or wants one)")
    return False, text


class QmpDriver:
    """A reconnecting QMP session that requests and follows COLO checkpoints."""

    def __init__(
        self,
        name: str,
        endpoint: Endpoint,
        *,
        on_checkpoint_started: Callback | None = None,
        on_checkpoint_done: Callback | None = None,
        on_colo_exit: Callable[[Mapping[str, object]], None] | None = None,
        follow: FollowPolicy = FollowPolicy.COLO,
        request_timeout: float = 5.0,
        backoff: float = 0.1,
        checkpoint_delay: int | None = None,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.follow = follow
        self.stats = QmpStats()
        self._on_started = on_checkpoint_started
        self._on_done = on_checkpoint_done
        self._on_colo_exit = on_colo_exit
        self._request_timeout = request_timeout
        self._backoff = backoff
        self._client: QMPClient | None = None
        self._pending = False
        self._sent_at: float | None = None
        self._resend_after = request_timeout
        self._in_checkpoint = False
        self._fixed_delay = checkpoint_delay
        self._ssl = ssl
        self._wake = asyncio.Event()
        self._reported_held = False
        self._task: asyncio.Task[None] | None = None
        self.connected_event = asyncio.Event()
        self._period_wanted: int | None = None
        self._period_applied: int | None = None
        self._operator_delay: int | None = None

    # ---- public ------------------------------------------------------------------------

    def start(self) -> None:
        """Run the session loop in the background."""
        self._task = asyncio.create_task(self._run(), name=f"qmp-{self.name}")

    async def close(self) -> None:
        """Stop the session loop and disconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        client = self._client
        if client is not None and not await disconnect(client):
            self.stats.disconnects_abandoned += 1

    @property
    def connected(self) -> bool:
        client = self._client
        return client is not None and client.runstate == Runstate.RUNNING

    @property
    def request_pending(self) -> bool:
        """A checkpoint is wanted and QEMU has not (yet) been told, or has not obeyed."""
        return self._pending or self._sent_at is not None

    def request_checkpoint(self) -> None:
        """Ask for a checkpoint; never lost, coalesced with one already pending."""
        self.stats.requests_wanted += 1
        if self._pending:
            return
        self._pending = True
        self._resend_after = self._request_timeout
        if not self.connected and not self._reported_held:
            self._reported_held = True
            log.warning(
                "%s: checkpoint wanted but QMP is disconnected; output stays held "
                "and the request is sent when QEMU is back",
                self.name,
            )
        self._wake.set()

    def set_checkpoint_period(self, period_ms: int | None) -> None:
        """MC: have QEMU checkpoint every period_ms; None: back to the operator's delay.

        Applied on the live session (or the next one), never lost.
        """
        self._period_wanted = period_ms
        self._wake.set()

    async def _apply_period(self, client: QMPClient) -> None:
        wanted = self._period_wanted
        if wanted == self._period_applied:
            return
        if wanted is not None:
            if self._operator_delay is None:
                params = await client.execute("query-migrate-parameters")
                value = params.get("x-checkpoint-delay") if isinstance(params, dict) else None
                self._operator_delay = value if isinstance(value, int) else 20000
            delay = wanted
        else:
            delay = self._fixed_delay or self._operator_delay or 20000
        await client.execute("migrate-set-parameters", {"x-checkpoint-delay": delay})
        self._period_applied = wanted
        self.stats.period_changes += 1
        self.stats.checkpoint_period_ms = wanted
        log.info("%s: x-checkpoint-delay set to %d ms (%s)", self.name, delay,
                 "MC period" if wanted is not None else "the operator's, COLO")

    async def execute(self, cmd: str, args: Mapping[str, object] | None = None) -> object:
        """Run one command on the live session (raises QMPError/ExecuteError)."""
        client = self._client
        if client is None or client.runstate != Runstate.RUNNING:
            raise QMPError(f"{self.name}: QMP not connected")
        return await client.execute(cmd, args)

    def report(self) -> dict[str, object]:
        """State and counters."""
        return {
            "connected": self.connected,
            "request_pending": self.request_pending,
            "in_checkpoint": self._in_checkpoint,
            **{k: getattr(self.stats, k) for k in QmpStats.__dataclass_fields__},
        }

    # ---- session loop ------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._backoff
        while True:
            client = _Client(self.name, nudge=self._ssl is not None)
            try:
                await client.connect(self.endpoint.qmp_address(), ssl=self._ssl)
            except QMPError as err:
                self.stats.connect_failures += 1
                tls, text = _connect_error(err, self._ssl is not None)
                self.stats.last_error = text
                if self.stats.connect_failures == 1 or backoff >= MAX_BACKOFF:
                    log.log(
                        logging.ERROR if tls else logging.INFO,
                        "%s: cannot connect to QMP %s%s: %s; retrying",
                        self.name,
                        self.endpoint.describe(),
                        " (TLS handshake failed)" if tls else "",
                        text,
                    )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = self._backoff
            try:
                await self._session(client)
            except (QMPError, OSError, EOFError) as err:
                log.warning("%s: QMP session ended: %s", self.name, err)
            finally:
                self._client = None
                self.connected_event.clear()
                if not await disconnect(client):
                    self.stats.disconnects_abandoned += 1
            if self._in_checkpoint:
                self._in_checkpoint = False
                log.warning("%s: QEMU went away during a checkpoint; output stays held", self.name)
            log.warning("%s: QMP disconnected; reconnecting", self.name)
            await asyncio.sleep(backoff)

    async def _session(self, client: QMPClient) -> None:
        self._client = client
        self.stats.sessions += 1
        await self._refresh(client)
        log.info(
            "%s: QMP connected (%s); status %s, COLO %s",
            self.name,
            self.endpoint.describe(),
            self.stats.run_status,
            self.stats.colo_status,
        )
        self.connected_event.set()
        if self._sent_at is not None:  # sent on the last session, never obeyed: send again
            self._sent_at = None
            self._pending = True
        self._reported_held = False
        self._wake.set()
        tasks = [
            asyncio.create_task(self._events(client)),
            asyncio.create_task(self._requests(client)),
            asyncio.create_task(self._watch(client)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self, client: QMPClient) -> None:
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()

    async def _refresh(self, client: QMPClient) -> None:
        status = await client.execute("query-status")
        if isinstance(status, dict):
            self.stats.run_status = str(status.get("status", ""))
        try:
            colo = await client.execute("query-colo-status")
        except ExecuteError as err:  # a QEMU built without COLO
            colo = {"error": str(err)}
        if isinstance(colo, dict):
            self.stats.colo_status = colo

    def _in_colo(self) -> bool:
        return self.stats.colo_status.get("mode") in COLO_MODES

    # ---- events ------------------------------------------------------------------------

    async def _events(self, client: QMPClient) -> None:
        client.events.clear()
        async for event in client.events:
            name = event.get("event")
            if name == "STOP":
                await self._stop(client)
            elif name == "RESUME":
                self._resume()
            elif name in ("MIGRATION", "COLO_EXIT"):
                data = event.get("data")
                log.info("%s: %s %s", self.name, name, data)
                if name == "COLO_EXIT" and self._on_colo_exit is not None:
                    self._on_colo_exit(data if isinstance(data, dict) else {})
                await self._refresh(client)
                if name == "MIGRATION" and self._in_colo():
                    self._wake.set()  # a request held for want of COLO can go now

    async def _stop(self, client: QMPClient) -> None:
        self.stats.stops += 1
        if self.follow is FollowPolicy.NONE:
            return
        if self.follow is FollowPolicy.COLO and not self._in_colo():
            # COLO may have begun since we last asked: QEMU sends MIGRATION events only
            # with the `events` migration capability, which COLO-FT.txt never sets
            await self._refresh(client)
        if self.follow is FollowPolicy.COLO and not self._in_colo():
            self.stats.pauses_ignored += 1
            log.info("%s: STOP outside COLO mode: a pause, not a checkpoint", self.name)
            return
        if self.follow is FollowPolicy.COLO:
            # confirm before telling the core: a pause must not look like a checkpoint
            try:
                status = await client.execute("query-status")
            except ExecuteError as err:
                status = {"status": f"unknown ({err})"}
            state = status.get("status") if isinstance(status, dict) else None
            if state not in CHECKPOINT_RUN_STATES:
                self.stats.pauses_ignored += 1
                log.warning(
                    "%s: VM stopped in state %s: a pause, not a checkpoint; output stays held",
                    self.name,
                    state,
                )
                return
        self._sent_at = None  # a checkpoint began: any request sent is answered
        self._in_checkpoint = True
        self.stats.checkpoints_started += 1
        if self._on_started is not None:
            self._on_started()

    def _resume(self) -> None:
        self.stats.resumes += 1
        if not self._in_checkpoint:
            return
        self._in_checkpoint = False
        self.stats.checkpoints_done += 1
        if self._on_done is not None:
            self._on_done()

    # ---- checkpoint requests -----------------------------------------------------------

    async def _requests(self, client: QMPClient) -> None:
        retry = self._backoff
        while True:
            timeout = None
            if self._sent_at is not None:
                timeout = max(0.0, self._sent_at + self._resend_after - time.monotonic())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            if self._sent_at is not None and time.monotonic() >= self._sent_at + self._resend_after:
                self.stats.requests_resent += 1
                log.warning(
                    "%s: no checkpoint %.1fs after the request (COLO mode: %s); asking again",
                    self.name,
                    self._resend_after,
                    self.stats.colo_status.get("mode"),
                )
                self._resend_after = min(self._resend_after * 2, MAX_RESEND)
                self._sent_at = None
                self._pending = True
            await self._apply_period(client)
            if not self._pending:
                continue
            try:
                await self._send_request(client)
                retry = self._backoff
            except ExecuteError as err:
                self.stats.request_errors += 1
                self.stats.last_error = str(err)
                log.error(
                    "%s: QEMU refused the checkpoint request: %s (%s)",
                    self.name,
                    err,
                    err.error_class,
                )
                await asyncio.sleep(retry)
                retry = min(retry * 2, MAX_RESEND)
                self._wake.set()

    async def _send_request(self, client: QMPClient) -> None:
        delay = self._fixed_delay
        if delay is None:  # read it each time: the operator may have changed it since
            params = await client.execute("query-migrate-parameters")
            value = params.get("x-checkpoint-delay") if isinstance(params, dict) else None
            delay = value if isinstance(value, int) else 20000
        await client.execute("migrate-set-parameters", {"x-checkpoint-delay": delay})
        self._pending = False
        self._sent_at = time.monotonic()
        self.stats.requests_sent += 1
        if not self._in_colo():  # the mode read at connect may be stale (COLO began since)
            with contextlib.suppress(ExecuteError):
                await self._refresh(client)
        if not self._in_colo():
            self.stats.requests_outside_colo += 1
            log.warning(
                "%s: checkpoint requested but QEMU is not in COLO mode (%s): "
                "it accepts the request and does not checkpoint; output stays held",
                self.name,
                self.stats.colo_status,
            )
