"""What every live proxy does around the core, whatever its frames travel on.

Theory of operation
-------------------
Everything runs on one asyncio loop thread, and only the callbacks below
touch the :class:`~colo_proxy.core.proxy.Proxy`, so the core has exactly one
owner without a queue in between.  A subclass owns the ports (QEMU chardev
sockets for ``colo-proxy run``, packet sockets on interfaces for
``colo-proxy bridge``) and calls :meth:`CoreHost._feed` with each read's
frames; :meth:`CoreHost._after` then moves the results out at once:
released frames go to the subclass's ``_send_released`` (never awaited, so
reading never waits on writing), checkpoint requests go to QMP, else to the
subclass's ``_route_request`` (``notify_dev``), else the log, and
divergences are logged (rate limited, all counted).  One timer follows
``next_deadline()``.

Checkpoints come back as QMP ``STOP``/``RESUME`` (through the QMP driver's
follow policy), or through the subclass (``COLO_CHECKPOINT`` on
``notify_dev``), and become ``checkpoint_started``/``checkpoint_done`` on
the core.

Disk replication (``--disk-qmp``, Remus rule): a :class:`DiskLink` has the
disk agent commit epoch N on ``STOP``, and held output is released only once
``RESUME`` came *and* the agent acknowledged, in either order.  Input read
after ``RESUME`` N, while epoch N still waits for the agent, is output of
epoch N+1: it is deferred (bounded) and compared only after epoch N's
release, since epoch N's ``checkpoint_done`` releases everything held and
would otherwise let N+1's unverified output through with it.

Shutdown (SIGINT/SIGTERM): inputs are closed first so nothing new arrives;
then held primary frames are either flushed (``flush``) or counted and
reported (``report``, the default: releasing unverified output is what COLO
exists to prevent, and a guest's TCP retransmits what it never saw
acknowledged); the subclass then closes its outputs and says what they
could not deliver.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from colo_proxy.core.config import Config
from colo_proxy.core.events import CheckpointRequest, CoreOutput, Divergence, ModeSwitch, Side
from colo_proxy.core.framing import Frame
from colo_proxy.core.proxy import Proxy
from colo_proxy.drivers.endpoints import Endpoint
from colo_proxy.drivers.qmp_follow import FollowPolicy
from colo_proxy.runtime.framepath import FramePath

if TYPE_CHECKING:  # imported when used: `run` without --qmp/--disk-qmp never loads qemu.qmp
    from colo_proxy.drivers.qmp import QmpDriver
    from colo_proxy.runtime.disk_link import DiskLink

log = logging.getLogger(__name__)

DIVERGENCE_LOG_BURST = 20
"""Divergences logged in full per second; the rest are only counted."""

LIMIT_LOG_INTERVAL = 10.0
"""Seconds between two log lines about new flows refused at the flow table's hard cap."""

DEFERRED_INPUT_LIMIT = 64 * 1024 * 1024
"""Bytes of input kept while the disk agent lags; beyond it input is dropped and counted
(memory stays bounded; a dropped primary frame is a lost packet, which TCP recovers)."""


GC_YOUNG_THRESHOLD = 20_000
"""Allocations between young-generation collections once running (CPython's default 700
collected every few batches of new flows, each time walking their fresh objects)."""


def tune_gc() -> None:
    """Start-up is over: keep its objects out of every later collection, collect less often.

    gc.freeze moves what imports and set-up allocated (tens of thousands of objects) to the
    permanent generation, so a full collection walks only the flows and what they hold;
    once per process, after a collection (a process that starts many hosts, as the tests
    do, must not freeze the garbage of earlier ones).  Reference cycles are rare on the
    frame path (the core's records are plain objects), so a larger young threshold mostly
    saves work; cycles are still collected.
    """
    global _gc_frozen
    if not _gc_frozen:
        _gc_frozen = True
        gc.collect()
        gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)


_gc_frozen = False


class ShutdownMode(enum.Enum):
    """What happens to held primary frames when the proxy stops."""

    REPORT = "report"
    FLUSH = "flush"


class HostSettings(Protocol):
    """The settings every live proxy shares (RunSettings and BridgeSettings have them)."""

    @property
    def qmp(self) -> Endpoint | None: ...
    @property
    def secondary_qmp(self) -> Endpoint | None: ...
    @property
    def disk_qmp(self) -> Endpoint | None: ...
    @property
    def disk_tls_creds(self) -> Path | None: ...
    @property
    def qmp_tls_creds(self) -> Path | None: ...
    @property
    def qmp_follow(self) -> FollowPolicy: ...
    @property
    def qmp_request_timeout(self) -> float: ...
    @property
    def on_shutdown(self) -> ShutdownMode: ...
    @property
    def stats_interval(self) -> float: ...


class CoreHost:
    """Owns the core and carries out its actions; subclasses move the frames."""

    REQUEST_ROUTES = "--qmp"
    """The flags that give checkpoint requests somewhere to go (named in the log)."""

    def __init__(
        self, config: Config, settings: HostSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._proxy = Proxy(config)
        self._clock = clock
        self._on_shutdown = settings.on_shutdown
        self._stats_interval = settings.stats_interval
        self.counters: dict[str, int] = {
            "checkpoint_requests": 0,
            "requests_to_qmp": 0,
            "requests_unrouted": 0,
            "divergences_not_logged": 0,
            "core_errors": 0,
            "passthrough_frames": 0,
            "passthrough_secondary_dropped": 0,
            "deferred_input_frames": 0,
            "deferred_input_dropped_frames": 0,
        }
        self.passthrough_reason: str | None = None
        qmp_tls = None
        if settings.qmp_tls_creds is not None:
            from colo_proxy.disk.tls import client_context

            qmp_tls = client_context(settings.qmp_tls_creds, "--qmp-tls-creds")
        self.qmp: QmpDriver | None = None
        if settings.qmp is not None or settings.secondary_qmp is not None:
            from colo_proxy.drivers.qmp import QmpDriver
        if settings.qmp is not None:
            self.qmp = QmpDriver(
                "primary-qmp",
                settings.qmp,
                on_checkpoint_started=self._checkpoint_started,
                on_checkpoint_done=self._checkpoint_done,
                on_colo_exit=self._colo_exit,
                follow=settings.qmp_follow,
                request_timeout=settings.qmp_request_timeout,
                ssl=qmp_tls,
            )
        self.secondary_qmp: QmpDriver | None = None
        if settings.secondary_qmp is not None:
            self.secondary_qmp = QmpDriver(
                "secondary-qmp", settings.secondary_qmp, follow=FollowPolicy.NONE, ssl=qmp_tls
            )
        self.disk_link: DiskLink | None = None
        if settings.disk_qmp is not None:
            from colo_proxy.runtime.disk_link import DiskLink

            self.disk_link = DiskLink(settings.disk_qmp, self._disk_released,
                                      tls=settings.disk_tls_creds)
        self._deferred: deque[tuple[int, Side, list[Frame]]] = deque()
        self._deferred_bytes = 0
        self._vm_in_checkpoint = False
        self._path = FramePath(self._proxy, clock, self._send_released, self._after_rare,
                               self._core_error, self._feed, self._after)
        """The per-read work, compiled; reads bypass it (to _feed) with a disk link."""
        self._path.bypass = self.disk_link is not None
        self._log_window = 0.0
        self._logged_in_window = 0
        self._refused_log_at: float | None = None
        self._stopping = asyncio.Event()

    @property
    def proxy(self) -> Proxy:
        """The core.  Replacing it (live_obs wraps it to observe) replaces it on the per-read
        path too."""
        return self._proxy

    @proxy.setter
    def proxy(self, value: Proxy) -> None:
        self._proxy = value
        self._path.proxy = value

    # ---- what a subclass provides ---------------------------------------------------------

    async def _open_ports(self) -> None:
        """Open every port (outputs first, so the first release has somewhere to go)."""
        raise NotImplementedError

    async def _close_inputs(self) -> None:
        """Stop reading: nothing new reaches the core after this."""
        raise NotImplementedError

    async def _close_outputs(self) -> dict[str, object]:
        """Close the outputs; what they could not deliver, for the shutdown report."""
        raise NotImplementedError

    def _send_released(self, frames: list[Frame]) -> None:
        """Send released primary frames towards the client (count what is dropped)."""
        raise NotImplementedError

    def _port_stats(self) -> dict[str, object]:
        """Counters of each port, by port name."""
        raise NotImplementedError

    def _route_request(self, request: CheckpointRequest) -> bool:
        """Carry out a checkpoint request without QMP; False if there is no way to."""
        return False

    def _vm_checkpoint_done(self) -> None:
        """The VMs finished a checkpoint (the secondary now holds the primary's state)."""

    # ---- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the ports, then connect QMP and the disk agent."""
        await self._open_ports()
        if self.qmp is not None and self.proxy.vm.mc:  # --mode mc: QEMU's timer from the start
            self.qmp.set_checkpoint_period(self._mc_period_ms())
        for driver in (self.qmp, self.secondary_qmp):
            if driver is not None:
                driver.start()
        if self.disk_link is not None:
            self.disk_link.start()
        tune_gc()

    def stop(self) -> None:
        """Ask :meth:`serve` to shut down (signal handlers call this)."""
        self._stopping.set()

    async def serve(self) -> dict[str, object]:
        """Run until :meth:`stop`; then shut down and return the final report."""
        await self.start()
        tasks = []
        if self._stats_interval > 0:
            tasks.append(asyncio.create_task(self._log_stats()))
        cfg = self.proxy.config
        if self.qmp is not None and cfg.vm_max_dirty_rate > 0 and self.proxy.vm.forced == "auto":
            tasks.append(asyncio.create_task(self._measure_dirty_rate(cfg.vm_window)))
        await self._stopping.wait()
        for task in tasks:
            task.cancel()
        return await self.shutdown()

    async def shutdown(self) -> dict[str, object]:
        """Close inputs, settle held output as configured, close outputs, report."""
        await self._close_inputs()
        self._path.cancel_timer()
        held = self.proxy.held_frames()
        deferred = self._deferred_primary_frames()
        if (held or deferred) and self._on_shutdown is ShutdownMode.FLUSH:
            log.warning("shutdown: flushing %d held primary frames unverified", held + deferred)
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
        undelivered = await self._close_outputs()
        report = self.stats()
        report["passthrough"] = self.passthrough_reason
        report["shutdown"] = {
            "mode": self._on_shutdown.value,
            "held_frames_at_stop": held,
            "held_frames_not_released": self.proxy.held_frames(),
            "deferred_primary_frames_at_stop": deferred,
            "deferred_primary_frames_not_released": self._deferred_primary_frames(),
            "waiting_for_disk_agent": self.disk_link is not None and self.disk_link.waiting,
            **undelivered,
        }
        return report

    def stats(self) -> dict[str, object]:
        """Core, port and QMP counters in one dict."""
        out: dict[str, object] = {"core": self.proxy.stats(), "supervisor": dict(self.counters)}
        out.update(self._port_stats())
        for driver in (self.qmp, self.secondary_qmp):
            if driver is not None:
                out[driver.name] = driver.report()
        if self.disk_link is not None:
            out["disk_link"] = self.disk_link.report()
        return out

    async def _measure_dirty_rate(self, period: float) -> None:
        """QEMU's dirty-page rate (calc-dirty-rate, 1 s sample) every period, for the policy.

        Only with --vm-max-dirty-rate: the measurement costs QEMU a little.
        A QEMU that cannot measure is logged once and asked no more.
        """
        assert self.qmp is not None
        from qemu.qmp import ExecuteError, QMPError

        while True:
            await asyncio.sleep(period)
            try:
                await self.qmp.execute("calc-dirty-rate", {"calc-time": 1})
                await asyncio.sleep(1.2)
                info = await self.qmp.execute("query-dirty-rate")
            except ExecuteError as err:  # this QEMU cannot measure: stop asking
                log.warning("dirty-rate measurement unavailable (%s); the policy goes on "
                            "without it", err)
                return
            except (QMPError, OSError):  # not connected now: try at the next period
                continue
            rate = info.get("dirty-rate") if isinstance(info, dict) else None
            if isinstance(rate, int | float):
                self.proxy.observe_dirty_rate(float(rate))

    async def _log_stats(self) -> None:
        while True:
            await asyncio.sleep(self._stats_interval)
            log.info("stats %s", json.dumps(self.stats(), default=str, sort_keys=True))

    # ---- frames in, results out ----------------------------------------------------------

    def _feed(self, side: Side, frames: list[Frame]) -> None:
        """One read's frames from ``side``: compare them and carry out the results."""
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
        self._path.compare(side, frames, now)

    def _core_error(self, side: Side, frame: Frame | None) -> None:
        self.counters["core_errors"] += 1
        if self.counters["core_errors"] > DIVERGENCE_LOG_BURST:
            return
        if frame is None:
            log.exception("core failed comparing a batch of %s frames", side.name.lower())
        else:
            log.exception(
                "core failed on a %s frame (%d bytes, dropped): %s",
                side.name.lower(),
                len(frame[0]),
                frame[0][:64].hex(),
            )

    def _after(self, now: float) -> None:
        """Carry out everything the core produced; re-arm the timer."""
        self._path.after(now)

    def _after_rare(self, out: CoreOutput, now: float) -> None:
        """What _after hands back to the host: switches, requests, divergences, refused flows."""
        for switch in out.switches:
            self._mode_switch(switch)
        for request in out.requests:
            self._request(request)
        if out.divergences:
            self._log_divergences(out.divergences, now)
        if self.proxy.counters["flows_refused"] != self._path.refused_logged:
            self._log_refused(now)

    def _log_refused(self, now: float) -> None:
        """New flows refused at the flow table's hard cap: one line per LIMIT_LOG_INTERVAL."""
        if self._refused_log_at is not None and now - self._refused_log_at < LIMIT_LOG_INTERVAL:
            return
        counters, table = self.proxy.counters, self.proxy.table
        refused = counters["flows_refused"]
        logged = self._path.refused_logged
        log.warning(
            "flow table at its hard cap (%d flows of %d, %d bytes held of %d): %d new flows "
            "refused since the last such line, their frames dropped (%d primary in all), "
            "until a checkpoint completes (%d checkpoint requests so far)",
            len(table), table.hard_flows, self.proxy.ledger.held_bytes, table.hard_held_bytes,
            refused - logged, counters["admission_refused_primary_frames"],
            self.counters["checkpoint_requests"],
        )
        self._path.refused_logged = refused
        self._refused_log_at = now

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

    def _mode_switch(self, switch: ModeSwitch) -> None:
        """Log every switch; the whole VM's sets QEMU's checkpoint period (MC) or restores it."""
        self.counters["mode_switches"] = self.counters.get("mode_switches", 0) + 1
        log.info("mode switch: %s %s -> %s (%s)", switch.scope, switch.old, switch.new,
                 switch.reason)
        if switch.scope == "vm" and self.qmp is not None:
            self.qmp.set_checkpoint_period(self._mc_period_ms() if switch.new == "mc" else None)

    def _mc_period_ms(self) -> int:
        return max(1, round(self.proxy.config.mc_period * 1000))

    def _request(self, request: CheckpointRequest) -> None:
        self.counters["checkpoint_requests"] += 1
        log.info("checkpoint wanted: %s", request.reason.value)
        if self.qmp is not None:
            self.counters["requests_to_qmp"] += 1
            self.qmp.request_checkpoint()
        elif not self._route_request(request):
            self.counters["requests_unrouted"] += 1
            log.warning(
                "checkpoint wanted (%s) but no %s is given: "
                "affected output stays held (%d frames held)",
                request.reason.value,
                self.REQUEST_ROUTES,
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
        self._vm_checkpoint_done()
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
        self._path.bypass = True
        now = self._clock()
        self.proxy.checkpoint_done(now)
        self._after(now)
        self._flush_deferred()

    def _pass_through(self, side: Side, frames: list[Frame]) -> None:
        if side is Side.PRIMARY:
            self.counters["passthrough_frames"] += len(frames)
            self._send_released(frames)
        elif side is Side.SECONDARY:
            self.counters["passthrough_secondary_dropped"] += len(frames)


def print_report(report: dict[str, object]) -> None:
    """The final report, one JSON line on stderr (logs and reports never go to stdout)."""
    print(json.dumps({"colo_proxy_report": report}, default=str, sort_keys=True), file=sys.stderr)
