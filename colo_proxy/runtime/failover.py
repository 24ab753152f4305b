"""Failover orchestration for `colo-proxy run --failover`: heartbeats, then the takeover.

Theory of operation
-------------------
:class:`FailoverSupervisor` is the ``run`` supervisor plus one task that
follows :class:`~colo_proxy.core.heartbeat.Heartbeats`: every period it probes
the primary, the secondary and (with ``--disk-qmp``) the disk agent with a
QMP ``query-status`` on the sessions the proxy already holds.  When the core
of that module declares a peer lost, :func:`~colo_proxy.core.heartbeat.decide`
says what to do:

* **primary lost** -> the secondary's takeover sequence (reference sections
  5 and 8): primary input is dropped from then on and nothing held is ever
  released (it is output the secondary never produced); the disk agent
  drains its write-out buffers and discards speculation
  (``colo-disk-failover``); on the secondary ``nbd-server-stop``,
  ``x-colo-lost-heartbeat``, then ``object-del`` of its redirectors and
  ``chardev-remove`` of their chardevs, so the new primary's output leaves
  through its own netdev.
* **secondary lost** -> the primary goes on alone: ``x-colo-lost-heartbeat``
  on the primary, everything held is released and primary output passes
  through (``enter_passthrough``; its redirectors stay, colo-proxy stays in the
  path), its ``filter-mirror`` is deleted, and the primary's mirror into the disk
  agent is cancelled (``block-job-cancel``, with ``--failover-mirror-job``):
  replication has stopped, and the report says so.
* **disk agent lost** -> reported; output stays held until it is back (the
  disk link's own rule).

Every step is logged with its duration and kept in the report's
``failover`` entry, with the phase and when the loss was detected.  A step
that QEMU refuses is logged and the sequence goes on (``nbd-server-stop``
fails, for one, when the secondary runs no NBD server, as with the disk
agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from qemu.qmp import QMPError

from colo_proxy.core.config import Config
from colo_proxy.core.events import CheckpointRequest, Side
from colo_proxy.core.framing import Frame
from colo_proxy.core.heartbeat import Action, Heartbeats, Lost, Peer, Phase, decide
from colo_proxy.drivers.qmp import QmpDriver
from colo_proxy.runtime.supervisor import RunSettings, Supervisor

log = logging.getLogger(__name__)

STEP_TIMEOUT = 30.0
"""Seconds one takeover step may take (the disk agent's drain is the long one)."""


@dataclass(frozen=True, slots=True)
class FailoverSettings:
    """`--failover` and its knobs."""

    period: float = 0.5
    misses: int = 3
    secondary_objects: tuple[str, ...] = ("f2", "f1")
    secondary_chardevs: tuple[str, ...] = ("red1", "red0")
    primary_objects: tuple[str, ...] = ("m0",)
    mirror_job: str | None = None


class FailoverSupervisor(Supervisor):
    """``colo-proxy run`` that also watches its peers and fails over."""

    def __init__(
        self,
        config: Config,
        settings: RunSettings,
        failover: FailoverSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config, settings, clock)
        self.failover = failover
        peers = [Peer.PRIMARY, Peer.SECONDARY] + ([Peer.DISK] if self.disk_link else [])
        self.heartbeats = Heartbeats(tuple(peers), failover.period, failover.misses)
        self.phase = Phase.PROTECTED
        self.steps: list[dict[str, object]] = []
        self.losses: list[dict[str, object]] = []
        self.counters.update({
            "failover_primary_dropped": 0, "failover_secondary_dropped": 0,
            "failover_requests_ignored": 0,
        })  # fmt: skip
        self._hb_task: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()
        self._sequence: asyncio.Task[None] | None = None

    def _drivers(self) -> dict[Peer, QmpDriver]:
        out: dict[Peer, QmpDriver] = {}
        if self.qmp is not None:
            out[Peer.PRIMARY] = self.qmp
        if self.secondary_qmp is not None:
            out[Peer.SECONDARY] = self.secondary_qmp
        if self.disk_link is not None:
            out[Peer.DISK] = self.disk_link.driver
        return out

    # ---- life cycle -----------------------------------------------------------------

    async def start(self) -> None:
        await super().start()
        self._hb_task = asyncio.create_task(self._heartbeat_loop(), name="heartbeats")

    async def shutdown(self) -> dict[str, object]:
        for task in (self._hb_task, self._sequence, *self._probes):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return await super().shutdown()

    def stats(self) -> dict[str, object]:
        out = super().stats()
        out["failover"] = {
            "phase": self.phase.value,
            "period": self.failover.period,
            "misses": self.failover.misses,
            "losses": list(self.losses),
            "steps": list(self.steps),
            "heartbeats": self.heartbeats.report(),
        }
        return out

    # ---- frames during and after a takeover ------------------------------------------

    def _feed(self, side: Side, frames: list[Frame]) -> None:
        if self.phase in (Phase.TAKEOVER, Phase.PROMOTED):
            which = "primary" if side is Side.PRIMARY else "secondary"
            self.counters[f"failover_{which}_dropped"] += len(frames)
            return
        super()._feed(side, frames)

    def _checkpoint_done(self) -> None:
        if self.phase in (Phase.TAKEOVER, Phase.PROMOTED):
            return  # never release what the secondary did not produce
        super()._checkpoint_done()

    def _disk_released(self) -> None:
        if self.phase in (Phase.TAKEOVER, Phase.PROMOTED):
            return  # the outdev belonged to the dead primary: nothing may go out there now
        super()._disk_released()

    def _request(self, request: CheckpointRequest) -> None:
        if self.phase in (Phase.TAKEOVER, Phase.PROMOTED):
            self.counters["failover_requests_ignored"] += 1
            return  # a timer of the old epoch: there is no primary to checkpoint any more
        super()._request(request)

    def _colo_exit(self, data: Mapping[str, object]) -> None:
        if self.phase in (Phase.TAKEOVER, Phase.PROMOTED):
            return
        super()._colo_exit(data)

    # ---- heartbeats -----------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        drivers = self._drivers()
        while True:
            now = self._clock()
            for lost in self.heartbeats.tick(now):
                self._lost(lost)
            for peer in self.heartbeats.due(now):
                task = asyncio.create_task(self._probe(peer, drivers[peer]))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)
            deadline = self.heartbeats.next_deadline()
            if deadline is None:
                return
            await asyncio.sleep(max(0.01, deadline - self._clock()))

    async def _probe(self, peer: Peer, driver: QmpDriver) -> None:
        try:
            await asyncio.wait_for(driver.execute("query-status"), self.failover.period)
        except (TimeoutError, QMPError, OSError, EOFError):
            lost = self.heartbeats.failed(peer, self._clock())
            if lost is not None:
                self._lost(lost)
            return
        self.heartbeats.answered(peer, self._clock())

    def _lost(self, lost: Lost) -> None:
        armed = {p.value: self.heartbeats.armed(p) for p in self.heartbeats.peers}
        new_phase, action = decide(self.phase, lost.peer)
        log.error(
            "heartbeat: %s lost (%d misses of %.2fs; silent for %.2fs); phase %s -> %s, %s",
            lost.peer.value, self.failover.misses, self.failover.period, lost.silent_for,
            self.phase.value, new_phase.value, action.value,
        )
        self.losses.append({
            "peer": lost.peer.value, "at": lost.at, "silent_for": round(lost.silent_for, 3),
            "phase_before": self.phase.value, "action": action.value, "armed": armed,
        })  # fmt: skip
        self.phase = new_phase
        if action is Action.TAKEOVER:
            self._takeover_begins()
            self._sequence = asyncio.create_task(self._takeover(), name="takeover")
        elif action is Action.PRIMARY_ALONE:
            self._sequence = asyncio.create_task(self._primary_alone(), name="primary-alone")

    # ---- the sequences --------------------------------------------------------------

    def _takeover_begins(self) -> None:
        held = self.proxy.held_frames()
        self.counters["failover_primary_dropped"] += held
        log.warning(
            "takeover: %d held primary frames will never be released (the secondary never "
            "produced them); the new primary's TCP retransmits what the client lacks", held,
        )

    async def _takeover(self) -> None:
        t0 = self._clock()
        if self.disk_link is not None:
            await self._step("disk agent: colo-disk-failover", self.disk_link.driver,
                             "colo-disk-failover")
        sec = self.secondary_qmp
        if sec is not None:
            await self._step("secondary: nbd-server-stop", sec, "nbd-server-stop")
            await self._step("secondary: x-colo-lost-heartbeat", sec, "x-colo-lost-heartbeat")
            for obj in self.failover.secondary_objects:
                await self._step(f"secondary: object-del {obj}", sec, "object-del", {"id": obj})
            for dev in self.failover.secondary_chardevs:
                await self._step(f"secondary: chardev-remove {dev}", sec, "chardev-remove",
                                 {"id": dev})
        self.phase = Phase.PROMOTED
        log.warning("takeover complete in %.3fs: the former secondary is the primary",
                    self._clock() - t0)

    async def _primary_alone(self) -> None:
        t0 = self._clock()
        if self.qmp is not None:
            await self._step("primary: x-colo-lost-heartbeat", self.qmp, "x-colo-lost-heartbeat")
        self.enter_passthrough("secondary lost (heartbeat)")
        if self.qmp is not None:
            for obj in self.failover.primary_objects:  # the mirror to a secondary that is gone
                await self._step(f"primary: object-del {obj}", self.qmp, "object-del", {"id": obj})
        if self.qmp is not None and self.failover.mirror_job:
            await self._step(f"primary: block-job-cancel {self.failover.mirror_job}", self.qmp,
                             "block-job-cancel",
                             {"device": self.failover.mirror_job, "force": True})
        log.warning("primary continues alone (%.3fs): replication stopped, output passes through",
                    self._clock() - t0)

    async def _step(self, name: str, driver: QmpDriver, cmd: str,
                    args: dict[str, Any] | None = None) -> object:
        t = self._clock()
        result: object = None
        error = None
        try:
            result = await asyncio.wait_for(driver.execute(cmd, args), STEP_TIMEOUT)
        except (TimeoutError, QMPError, OSError, EOFError) as err:
            error = str(err) or type(err).__name__
        took = self._clock() - t
        self.steps.append({"step": name, "ok": error is None, "error": error,
                           "result": result, "seconds": round(took, 4)})
        if error is None:
            log.warning("failover step %s: ok in %.3fs %s", name, took, result or "")
        else:
            log.warning("failover step %s: failed in %.3fs: %s (going on)", name, took, error)
        return result
