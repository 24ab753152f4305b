"""The live proxy: QEMU chardev channels and QMP around one sans-IO core.

Theory of operation
-------------------
Everything runs on one asyncio loop thread, and only the callbacks below
touch the :class:`~colo_proxy.core.proxy.Proxy`, so the core has exactly one
owner without a queue in between.  A chunk read from ``primary_in`` or
``secondary_in`` is decoded into records, each fed to the core with the same
``now``; then :meth:`Supervisor._after` moves the results out at once:
released frames become one write to ``outdev`` (buffered by the transport,
never awaited, so reading never waits on writing), checkpoint requests go to
QMP, else ``notify_dev``, else the log, and divergences are logged (rate
limited, all counted).  One timer follows ``next_deadline()``.

Checkpoints come back as QMP ``STOP``/``RESUME`` (through the QMP driver's
follow policy) or as ``COLO_CHECKPOINT`` on ``notify_dev`` (Xen), and become
``checkpoint_started``/``checkpoint_done`` on the core.

Disk replication (``--disk-qmp``, Remus rule): a :class:`DiskLink` has the
disk agent commit epoch N on ``STOP``, and held output is released only once
``RESUME`` came *and* the agent acknowledged, in either order.  Input read
after ``RESUME`` N, while epoch N still waits for the agent, is output of
epoch N+1: it is deferred (bounded) and compared only after epoch N's
release, since epoch N's ``checkpoint_done`` releases everything held and
would otherwise let N+1's unverified output through with it.

Shutdown (SIGINT/SIGTERM): inputs are closed first so nothing new arrives;
then held primary frames are either flushed to ``outdev`` (``flush``) or
counted and reported (``report``, the default: releasing unverified output
is what COLO exists to prevent, and a guest's TCP retransmits what it never
saw acknowledged); ``outdev`` is drained with a time limit and whatever it
could not deliver is reported too.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from colo_proxy.core.config import Config
from colo_proxy.core.events import CheckpointRequest, Divergence, Side
from colo_proxy.core.framing import Frame
from colo_proxy.core.proxy import CoreFault, Proxy
from colo_proxy.core.xen_notify import NotifyDecoder, NotifyKind, do_checkpoint, init_reply
from colo_proxy.drivers.endpoints import Endpoint
from colo_proxy.drivers.qemu_socket import Channel, RecordChannel
from colo_proxy.drivers.qmp import FollowPolicy, QmpDriver
from colo_proxy.runtime.disk_link import DiskLink

log = logging.getLogger(__name__)

DIVERGENCE_LOG_BURST = 20
"""Divergences logged in full per second; the rest are only counted."""

DEFERRED_INPUT_LIMIT = 64 * 1024 * 1024
"""Bytes of input kept while the disk agent lags; beyond it input is dropped and counted
(memory stays bounded; a dropped primary frame is a lost packet, which TCP recovers)."""


class ShutdownMode(enum.Enum):
    """What happens to held primary frames when the proxy stops."""

    REPORT = "report"
    FLUSH = "flush"


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Everything `colo-proxy run` needs besides the core Config."""

    primary_in: Endpoint
    secondary_in: Endpoint
    outdev: Endpoint
    notify_dev: Endpoint | None = None
    vnet_hdr: bool = False
    qmp: Endpoint | None = None
    secondary_qmp: Endpoint | None = None
    disk_qmp: Endpoint | None = None
    qmp_follow: FollowPolicy = FollowPolicy.COLO
    qmp_request_timeout: float = 5.0
    outdev_buffer: int = 64 * 1024 * 1024
    on_shutdown: ShutdownMode = ShutdownMode.REPORT
    stats_interval: float = 0.0


class Supervisor:
    """Owns the core and wires the drivers to it."""

    def __init__(
        self, config: Config, settings: RunSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.proxy = Proxy(config)
        self._clock = clock
        self.counters: dict[str, int] = {
            "checkpoint_requests": 0,
            "requests_to_qmp": 0,
            "requests_to_notify_dev": 0,
            "requests_unrouted": 0,
            "notify_checkpoints_done": 0,
            "notify_unknown_messages": 0,
            "notify_errors": 0,
            "outdev_dropped_frames": 0,
            "divergences_not_logged": 0,
            "core_errors": 0,
            "passthrough_frames": 0,
            "passthrough_secondary_dropped": 0,
            "deferred_input_frames": 0,
            "deferred_input_dropped_frames": 0,
        }
        self.passthrough_reason: str | None = None
        vnet = settings.vnet_hdr
        self.primary_in = RecordChannel("primary_in", settings.primary_in, vnet, self._primary)
        self.secondary_in = RecordChannel(
            "secondary_in", settings.secondary_in, vnet, self._secondary
        )
        self.outdev = RecordChannel("outdev", settings.outdev, vnet, None, settings.outdev_buffer)
        self.notify: Channel | None = None
        self._notify_decoder = NotifyDecoder()
        self._notify_owed = False
        if settings.notify_dev is not None:
            self.notify = Channel(
                "notify_dev",
                settings.notify_dev,
                on_data=self._notify_data,
                on_connect=self._notify_connected,
                on_disconnect=self._notify_decoder.reset,
            )
        self.qmp: QmpDriver | None = None
        if settings.qmp is not None:
            self.qmp = QmpDriver(
                "primary-qmp",
                settings.qmp,
                on_checkpoint_started=self._checkpoint_started,
                on_checkpoint_done=self._checkpoint_done,
                on_colo_exit=self._colo_exit,
                follow=settings.qmp_follow,
                request_timeout=settings.qmp_request_timeout,
            )
        self.secondary_qmp: QmpDriver | None = None
        if settings.secondary_qmp is not None:
            self.secondary_qmp = QmpDriver(
                "secondary-qmp", settings.secondary_qmp, follow=FollowPolicy.NONE
            )
        self.disk_link: DiskLink | None = None
        if settings.disk_qmp is not None:
            self.disk_link = DiskLink(settings.disk_qmp, self._disk_released)
        self._deferred: deque[tuple[int, Side, list[Frame]]] = deque()
        self._deferred_bytes = 0
        self._vm_in_checkpoint = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._log_window = 0.0
        self._logged_in_window = 0
        self._stopping = asyncio.Event()

    # ---- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open every endpoint (outdev first, so the first release has somewhere to go)."""
        await self.outdev.channel.start()
        if self.notify is not None:
            await self.notify.start()
        await self.primary_in.channel.start()
        await self.secondary_in.channel.start()
        for driver in (self.qmp, self.secondary_qmp):
            if driver is not None:
                driver.start()
        if self.disk_link is not None:
            self.disk_link.start()

    def stop(self) -> None:
        """Ask :meth:`serve` to shut down (signal handlers call this)."""
        self._stopping.set()

    async def serve(self) -> dict[str, object]:
        """Run until :meth:`stop`; then shut down and return the final report."""
        await self.start()
        stats_task = None
        if self.settings.stats_interval > 0:
            stats_task = asyncio.create_task(self._log_stats())
        await self._stopping.wait()
        if stats_task is not None:
            stats_task.cancel()
        return await self.shutdown()

    async def shutdown(self) -> dict[str, object]:
        """Close inputs, settle held output as configured, drain outdev, report."""
        await self.primary_in.channel.close()
        await self.secondary_in.channel.close()
        if self._timer is not None:
            self._timer.cancel()
        held = self.proxy.held_frames()
        deferred = self._deferred_primary_frames()
        if (held or deferred) and self.settings.on_shutdown is ShutdownMode.FLUSH:
            log.warning(
                "shutdown: flushing %d held primary frames to outdev unverified", held + deferred
            )
            self.proxy.checkpoint_done(self._clock())
            self._after(self._clock())
            self._flush_deferred()
        elif held or deferred:
            log.warning(
                "shutdown: %d primary frames (%s bytes held, %d frames kept aside) awaiting "
                "comparison or a checkpoint were not released (--on-shutdown flush would send "
                "them)%s",
                held + deferred,
                self.proxy.stats().get("held_bytes"),
                deferred,
                self._disk_wait_note(),
            )
        for driver in (self.qmp, self.secondary_qmp):
            if driver is not None:
                if driver.request_pending:
                    log.warning("shutdown: %s had a checkpoint request pending", driver.name)
                await driver.close()
        if self.disk_link is not None:
            await self.disk_link.close()
        unsent = self.outdev.channel.buffered_bytes()
        await self.outdev.channel.close()
        if self.notify is not None:
            await self.notify.close()
        report = self.stats()
        report["passthrough"] = self.passthrough_reason
        report["shutdown"] = {
            "mode": self.settings.on_shutdown.value,
            "held_frames_at_stop": held,
            "held_frames_not_released": self.proxy.held_frames(),
            "deferred_primary_frames_at_stop": deferred,
            "deferred_primary_frames_not_released": self._deferred_primary_frames(),
            "waiting_for_disk_agent": self.disk_link is not None and self.disk_link.waiting,
            "outdev_bytes_buffered_at_close": unsent,
        }
        return report

    def stats(self) -> dict[str, object]:
        """Core, channel and QMP counters in one dict."""
        out: dict[str, object] = {"core": self.proxy.stats(), "supervisor": dict(self.counters)}
        for rc in (self.primary_in, self.secondary_in, self.outdev):
            out[rc.name] = rc.counters()
        if self.notify is not None:
            out["notify_dev"] = {
                k: getattr(self.notify.stats, k) for k in self.notify.stats.__dataclass_fields__
            }
        for driver in (self.qmp, self.secondary_qmp):
            if driver is not None:
                out[driver.name] = driver.report()
        if self.disk_link is not None:
            out["disk_link"] = self.disk_link.report()
        return out

    async def _log_stats(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats_interval)
            log.info("stats %s", json.dumps(self.stats(), default=str, sort_keys=True))

    # ---- frames in, results out ----------------------------------------------------------

    def _primary(self, frames: list[Frame]) -> None:
        self._feed(Side.PRIMARY, frames)

    def _secondary(self, frames: list[Frame]) -> None:
        self._feed(Side.SECONDARY, frames)

    def _feed(self, side: Side, frames: list[Frame]) -> None:
        if self.passthrough_reason is not None:
            self._pass_through(side, frames)
            return
        if self.disk_link is not None and self.disk_link.waiting:
            self._defer(side, frames)
            return
        now = self._clock()
        self._compare(side, frames, now)
        self._after(now)

    def _compare(self, side: Side, frames: list[Frame], now: float) -> None:
        """Feed one read's frames to the core at once; a core exception costs that frame only."""
        feed_many = self.proxy.feed_many
        done = 0
        while done < len(frames):
            try:
                feed_many(side, frames[done:] if done else frames, now)
                done = len(frames)
            except CoreFault as fault:  # a core bug must not cost the connection
                done += fault.index
                self._core_error(side, frames[done])
                done += 1

    def _core_error(self, side: Side, frame: Frame) -> None:
        self.counters["core_errors"] += 1
        if self.counters["core_errors"] <= DIVERGENCE_LOG_BURST:
            log.exception(
                "core failed on a %s frame (%d bytes, dropped): %s",
                side.name.lower(),
                len(frame[0]),
                frame[0][:64].hex(),
            )

    def _after(self, now: float) -> None:
        """Carry out everything the core produced; re-arm the timer."""
        proxy = self.proxy
        released = proxy.take_released()
        if released and not self.outdev.send(released):
            self.counters["outdev_dropped_frames"] += len(released)
        for request in proxy.take_requests():
            self._request(request)
        divergences = proxy.take_divergences()
        if divergences:
            self._log_divergences(divergences, now)
        deadline = proxy.next_deadline()
        if deadline is not None and (self._timer_at is None or deadline < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, deadline - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self._clock()
        self.proxy.tick(now)
        self._after(now)

    def _log_divergences(self, divergences: list[Divergence], now: float) -> None:
        if now - self._log_window >= 1.0:
            self._log_window = now
            self._logged_in_window = 0
        for d in divergences:
            if self._logged_in_window >= DIVERGENCE_LOG_BURST:
                self.counters["divergences_not_logged"] += 1
                continue
            self._logged_in_window += 1
            log.warning(
                "divergence %s %s at offset %s: primary %s secondary %s %s",
                d.kind.value,
                d.flow,
                d.offset,
                d.primary[:16].hex(),
                d.secondary[:16].hex(),
                d.detail,
            )

    # ---- checkpoints -----------------------------------------------------------------------

    def _request(self, request: CheckpointRequest) -> None:
        self.counters["checkpoint_requests"] += 1
        log.info("checkpoint wanted: %s", request.reason.value)
        if self.qmp is not None:
            self.counters["requests_to_qmp"] += 1
            self.qmp.request_checkpoint()
        elif self.notify is not None:
            self.counters["requests_to_notify_dev"] += 1
            if self.notify.connected:
                self.notify.write(do_checkpoint())
            else:
                self._notify_owed = True
                log.warning("notify_dev not connected: checkpoint request sent when it is")
        else:
            self.counters["requests_unrouted"] += 1
            log.warning(
                "checkpoint wanted (%s) but neither --qmp nor --notify-dev is given: "
                "affected output stays held (%d frames held)",
                request.reason.value,
                self.proxy.held_frames(),
            )

    def _checkpoint_started(self) -> None:
        self._vm_in_checkpoint = True
        self.proxy.checkpoint_started(self._clock())
        if self.disk_link is not None:
            self.disk_link.vm_stopped()

    def _checkpoint_done(self) -> None:
        """The VM checkpoint finished; with a disk agent, release waits for its ack too."""
        self._vm_in_checkpoint = False
        if self.disk_link is not None:
            self.disk_link.vm_resumed()
            return
        now = self._clock()
        self.proxy.checkpoint_done(now)
        self._after(now)

    def _disk_released(self) -> None:
        """Memory and disk of an epoch are both committed: release, then compare what waited.

        The input deferred behind this epoch is fed only now, after the core's
        ``checkpoint_done``, so it is compared afresh instead of being released
        with this epoch's held output.  If the VMs are already in (or past) the
        next checkpoint, the core is told so again.
        """
        assert self.disk_link is not None
        now = self._clock()
        self.proxy.checkpoint_done(now)
        released = self.disk_link.gate.released_epoch
        while self._deferred and self._deferred[0][0] <= released:
            _, side, frames = self._deferred.popleft()
            self._deferred_bytes -= sum(len(data) for data, _ in frames)
            self._compare(side, frames, now)
        if self._vm_in_checkpoint or self.disk_link.waiting:
            self.proxy.checkpoint_started(now)
        self._after(now)

    def _defer(self, side: Side, frames: list[Frame]) -> None:
        """Keep input of a later epoch until the disk agent acknowledged the current one."""
        assert self.disk_link is not None
        size = sum(len(data) for data, _ in frames)
        if self._deferred_bytes + size > DEFERRED_INPUT_LIMIT:
            if not self.counters["deferred_input_dropped_frames"]:
                log.error(
                    "disk agent lagging: %d bytes of input deferred; dropping new input "
                    "(counted) until it acknowledges",
                    self._deferred_bytes,
                )
            self.counters["deferred_input_dropped_frames"] += len(frames)
            return
        self._deferred.append((self.disk_link.gate.memory_epoch, side, frames))
        self._deferred_bytes += size
        self.counters["deferred_input_frames"] += len(frames)

    def _deferred_primary_frames(self) -> int:
        return sum(len(f) for _, side, f in self._deferred if side is Side.PRIMARY)

    def _flush_deferred(self) -> None:
        """Deferred input goes out as pass-through (failover, or a flush at shutdown)."""
        while self._deferred:
            _, side, frames = self._deferred.popleft()
            self._pass_through(side, frames)
        self._deferred_bytes = 0

    def _disk_wait_note(self) -> str:
        link = self.disk_link
        if link is None or not link.waiting:
            return ""
        return (
            f"; output was waiting for the disk agent to acknowledge epoch "
            f"{link.gate.released_epoch + 1} "
            f"(VM checkpoints done: {link.gate.memory_epoch}, disk acknowledged: "
            f"{link.gate.disk_epoch}, agent connected: {link.driver.connected})"
        )

    def _colo_exit(self, data: Mapping[str, object]) -> None:
        if data.get("mode") == "primary":
            self.enter_passthrough(f"COLO ended on the primary (reason {data.get('reason')})")

    def enter_passthrough(self, reason: str) -> None:
        """The primary runs alone now: release everything held and stop comparing.

        Called on the primary's ``COLO_EXIT`` (failover with the primary going on,
        or the secondary lost) and on SIGUSR2.  There is no secondary left to fail
        over to, so holding output would only stall the primary's clients.
        """
        if self.passthrough_reason is not None:
            return
        held = self.proxy.held_frames()
        log.warning("%s: releasing %d held frames; passing primary output through", reason, held)
        self.passthrough_reason = reason
        now = self._clock()
        self.proxy.checkpoint_done(now)
        self._after(now)
        self._flush_deferred()

    def _pass_through(self, side: Side, frames: list[Frame]) -> None:
        if side is Side.PRIMARY:
            self.counters["passthrough_frames"] += len(frames)
            if not self.outdev.send(frames):
                self.counters["outdev_dropped_frames"] += len(frames)
        else:
            self.counters["passthrough_secondary_dropped"] += len(frames)

    def _notify_connected(self) -> None:
        self._notify_decoder.reset()
        if self._notify_owed and self.notify is not None:
            self._notify_owed = False
            self.notify.write(do_checkpoint())

    def _notify_data(self, data: bytes) -> None:
        assert self.notify is not None
        for message in self._notify_decoder.feed(data):
            if message.kind is NotifyKind.INIT:
                self.notify.write(init_reply())
            elif message.kind is NotifyKind.CHECKPOINT_DONE:
                self.counters["notify_checkpoints_done"] += 1
                self._checkpoint_done()
            else:
                self.counters["notify_unknown_messages"] += 1
                log.warning("notify_dev: unsupported instruction %r", message.text)
        if self._notify_decoder.error is not None:
            self.counters["notify_errors"] += 1
            self.notify.reset(self._notify_decoder.error)
            self._notify_decoder.reset()


def print_report(report: dict[str, object]) -> None:
    """The final report, one JSON line on stderr (logs and reports never go to stdout)."""
    print(json.dumps({"colo_proxy_report": report}, default=str, sort_keys=True), file=sys.stderr)
