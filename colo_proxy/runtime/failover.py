"""Failover orchestration for `colo-proxy run --failover`: heartbeats, then the takeover.

Theory of operation
-------------------
:class:`FailoverSupervisor` is the ``run`` supervisor plus one task that
follows :class:`~colo_proxy.core.heartbeat.Heartbeats`: every period it probes
the primary, the secondary and (with ``--disk-qmp``) the disk agent with a
QMP ``query-status`` on the sessions the proxy already holds.

With ``--heartbeat-dev`` (a chardev feeding a ``filter-redirector`` on the
primary's *input*, placed before its ``filter-mirror``) and
``--heartbeat-guest-ip``, the data path is probed too: every period an ARP
probe for the guest's address goes into that chardev; the filter-mirror gives
it to the secondary as well, and each guest's reply comes back on
``primary_in`` / ``secondary_in``, where it is taken out before the core.
Chardevs, filters, NICs and guest network stacks are all on that path, so a
primary whose QMP answers while its network is dead is lost all the same
(and a secondary probe that could not get through a silent primary is not
counted against the secondary).

When the core of that module declares a peer lost,
:func:`~colo_proxy.core.heartbeat.decide` says what to do:

* **primary lost** -> the secondary's takeover sequence (reference sections
  5 and 8): primary input is dropped from then on and nothing held is ever
  released (it is output the secondary never produced); a primary lost on
  the data path whose QMP still answers is fenced (``stop``); the disk agent
  drains its write-out buffers and discards speculation
  (``colo-disk-failover``); on the secondary ``nbd-server-stop``,
  ``x-colo-lost-heartbeat``, then ``object-del`` of the redirector that fed
  it the primary's input and ``chardev-remove`` of its chardev.  QEMU's
  failover turns every filter of the secondary off; the ones on the output
  path through colo-proxy (``f2`` and ``f3``) are turned back on.  Then
  every NIC of the secondary gets its link up (``set_link``): a checkpoint
  taken while the primary's link was down left the secondary's down as well,
  and a NIC whose link is down sends nothing.  With
  ``--secondary-outdev`` (a chardev feeding a ``filter-redirector`` on the
  secondary's output, ahead of its other filters), the new primary's output
  keeps coming to colo-proxy on ``secondary_in`` and goes out through that
  chardev and the secondary's own netdev: the client is served through
  colo-proxy as before.  What it sends while the sequence runs waits and
  goes out once the secondary is promoted.  Without it, the redirector
  towards colo-proxy is deleted as well and the output leaves directly.
  With ``--promoted-heartbeat-dev`` (a ``filter-redirector`` into the
  secondary's guest, idle until then) the promoted secondary's data path is
  probed on its own from then on; its loss is reported.
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
from typing import TYPE_CHECKING, Any

from colo_proxy.core.config import Config
from colo_proxy.core.events import CheckpointRequest, Side
from colo_proxy.core.framing import Frame
from colo_proxy.core.heartbeat import (
    Action,
    Heartbeats,
    Lost,
    Peer,
    Phase,
    Probe,
    Via,
    arp_probe,
    decide,
    probe_reply_seq,
)
from colo_proxy.drivers.endpoints import Endpoint
from colo_proxy.drivers.qemu_socket import RecordChannel
from colo_proxy.runtime.supervisor import RunSettings, Supervisor

if TYPE_CHECKING:
    from colo_proxy.drivers.qmp import QmpDriver


def _qmp_error() -> type[Exception]:
    """qemu.qmp's base error, imported when an except clause needs it: `run` without
    failover flags never loads qemu.qmp (its drivers, which raise it, import it first)."""
    from qemu.qmp import QMPError

    return QMPError

log = logging.getLogger(__name__)

STEP_TIMEOUT = 30.0
"""Seconds one takeover step may take (the disk agent's drain is the long one)."""

TAKEOVER_HOLD_FRAMES = 4096
"""New-primary frames kept while the takeover runs; more are dropped (and counted)."""

MUTE_AFTER_ANSWERS = 10
"""Primary data-path answers after which a silent secondary is reported as mute."""

NBD_GREETING = b"NBDMAGIC" + b"IHAVEOPT"
"""What a newstyle NBD server sends first."""
NBD_ABORT = (1).to_bytes(4, "big") + b"IHAVEOPT" + (2).to_bytes(4, "big") + bytes(4)
"""Client flags (fixed newstyle), then option NBD_OPT_ABORT with no data."""

VNET_HDR_LEN = 12
"""virtio-net header put before an injected probe when records carry vnet headers."""


@dataclass(frozen=True, slots=True)
class FailoverSettings:
    """`--failover` and its knobs."""

    period: float = 0.5
    misses: int = 3
    secondary_objects: tuple[str, ...] = ("f2", "f1")
    secondary_chardevs: tuple[str, ...] = ("red1", "red0")
    primary_objects: tuple[str, ...] = ("m0",)
    mirror_job: str | None = None
    heartbeat_dev: Endpoint | None = None
    guest_ip: bytes | None = None
    secondary_outdev: Endpoint | None = None
    secondary_output_filters: tuple[str, ...] = ("f2", "f3")
    disk_nbd: Endpoint | None = None
    """The disk agent's NBD endpoint: its data path, probed with an NBD greeting."""
    secondary_nics: tuple[str, ...] = ()
    """The secondary's NICs whose link goes up at takeover; empty: what query-rx-filter lists."""
    promoted_heartbeat_dev: Endpoint | None = None
    """A redirector's chardev into the secondary's guest: its data probes after a takeover."""


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
        self.heartbeat_dev: RecordChannel | None = None
        data: tuple[Peer, ...] = ()
        if failover.heartbeat_dev is not None and failover.guest_ip is not None:
            self.heartbeat_dev = RecordChannel("heartbeat_dev", failover.heartbeat_dev,
                                               settings.vnet_hdr, None, 1024 * 1024)
            data = (Peer.PRIMARY, Peer.SECONDARY)
        if failover.disk_nbd is not None and self.disk_link is not None:
            data = (*data, Peer.DISK)
        carriers = {Peer.SECONDARY: Peer.PRIMARY} if Peer.SECONDARY in data else {}
        self.heartbeats = Heartbeats(tuple(peers), failover.period, failover.misses, data=data,
                                     carriers=carriers)
        self.promoted_hb: RecordChannel | None = None
        if self.heartbeat_dev is not None and failover.promoted_heartbeat_dev is not None:
            self.promoted_hb = RecordChannel("promoted_heartbeat_dev",
                                             failover.promoted_heartbeat_dev, settings.vnet_hdr,
                                             None, 1024 * 1024)
        self.secondary_out: RecordChannel | None = None
        if failover.secondary_outdev is not None:
            self.secondary_out = RecordChannel("secondary_outdev", failover.secondary_outdev,
                                               settings.vnet_hdr, None, settings.outdev_buffer)
        self.phase = Phase.PROTECTED
        self.steps: list[dict[str, object]] = []
        self.losses: list[dict[str, object]] = []
        self.counters.update({
            "failover_primary_dropped": 0, "failover_secondary_dropped": 0,
            "failover_secondary_passed": 0, "failover_requests_ignored": 0,
            "data_probes_sent": 0, "data_probes_unsent": 0, "data_probe_replies": 0,
            "data_probe_replies_stale": 0, "promoted_data_probes_sent": 0,
        })  # fmt: skip
        self._probe_seq = 0
        self.mute_secondary = False
        self._takeover_hold: list[Frame] = []
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

    async def _open_ports(self) -> None:
        for rc in (self.secondary_out, self.heartbeat_dev, self.promoted_hb):
            if rc is not None:
                await rc.channel.start()
        await super()._open_ports()

    async def _close_outputs(self) -> dict[str, object]:
        out = await super()._close_outputs()
        for rc in (self.secondary_out, self.heartbeat_dev, self.promoted_hb):
            if rc is not None:
                out[f"{rc.name}_bytes_buffered_at_close"] = rc.channel.buffered_bytes()
                await rc.channel.close()
        return out

    def _port_stats(self) -> dict[str, object]:
        out = super()._port_stats()
        for rc in (self.secondary_out, self.heartbeat_dev, self.promoted_hb):
            if rc is not None:
                out[rc.name] = rc.counters()
        return out

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
            "secondary_data_path_mute": self.mute_secondary,
        }
        return out

    # ---- frames during and after a takeover ------------------------------------------

    def _feed(self, side: Side, frames: list[Frame]) -> None:
        if self.heartbeat_dev is not None:
            frames = self._take_probe_replies(side, frames)
        if self.phase in (Phase.TAKEOVER, Phase.PROMOTED):
            if side is Side.SECONDARY and self.secondary_out is not None:
                self._new_primary_output(frames)
                return
            which = "primary" if side is Side.PRIMARY else "secondary"
            self.counters[f"failover_{which}_dropped"] += len(frames)
            return
        super()._feed(side, frames)

    def _new_primary_output(self, frames: list[Frame]) -> None:
        """The former secondary's output: out through colo-proxy once it is promoted."""
        assert self.secondary_out is not None
        if self.phase is Phase.TAKEOVER:
            room = TAKEOVER_HOLD_FRAMES - len(self._takeover_hold)
            self._takeover_hold.extend(frames[:room])
            self.counters["failover_secondary_dropped"] += max(0, len(frames) - room)
            return
        if self.secondary_out.send(frames):
            self.counters["failover_secondary_passed"] += len(frames)
        else:
            self.counters["failover_secondary_dropped"] += len(frames)

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
            self._watch_mute_secondary()
            for probe in self.heartbeats.due(now):
                if probe.via is Via.DATA and probe.peer is not Peer.DISK:
                    if probe.peer is Peer.PRIMARY:
                        self._send_data_probe(self.heartbeat_dev)
                    elif self.phase is Phase.PROMOTED and self.promoted_hb is not None:
                        self._send_data_probe(self.promoted_hb)  # the new primary's own
                        self.counters["promoted_data_probes_sent"] += 1
                    # else the secondary's comes through the primary's filter-mirror
                    continue
                if probe.via is Via.DATA:
                    task = asyncio.create_task(self._nbd_probe(probe))
                else:
                    task = asyncio.create_task(self._probe(probe, drivers[probe.peer]))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)
            deadline = self.heartbeats.next_deadline()
            if deadline is None:
                return
            await asyncio.sleep(max(0.01, deadline - self._clock()))

    def _watch_mute_secondary(self) -> None:
        """Say once if the secondary's guest never answers probes the primary's answers.

        Such a secondary never armed its data path, so it can never be *lost* on
        it; but a failover to it would leave a primary that sends nothing (a
        disabled NIC: see tools/patches/0004).  Better known before.
        """
        state = self.heartbeats.state
        pri, sec = Probe(Peer.PRIMARY, Via.DATA), Probe(Peer.SECONDARY, Via.DATA)
        if (self.mute_secondary or pri not in state or state[sec].answers
                or state[pri].answers < MUTE_AFTER_ANSWERS or self.phase is not Phase.PROTECTED):
            return
        self.mute_secondary = True
        log.error("the secondary's guest answered none of the %d data-path probes the "
                  "primary's answered: its network is dead (a disabled NIC?), and a "
                  "failover to it would leave a primary that sends nothing",
                  state[pri].answers)

    async def _probe(self, probe: Probe, driver: QmpDriver) -> None:
        try:
            await asyncio.wait_for(driver.execute("query-status"), self.failover.period)
        except (TimeoutError, _qmp_error(), OSError, EOFError):
            lost = self.heartbeats.failed(probe, self._clock())
            if lost is not None:
                self._lost(lost)
            return
        self.heartbeats.answered(probe, self._clock())

    async def _nbd_probe(self, probe: Probe) -> None:
        """The disk agent's data path: its NBD server must greet (NBDMAGIC, IHAVEOPT).

        The client then asks NBD_OPT_ABORT and closes, as qemu-nbd's own probes do.
        """
        assert self.failover.disk_nbd is not None
        address = self.failover.disk_nbd.qmp_address()
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.failover.period):
                if isinstance(address, str):
                    reader, writer = await asyncio.open_unix_connection(address)
                else:
                    reader, writer = await asyncio.open_connection(*address)
                greeting = await reader.readexactly(18)
                if greeting[:16] != NBD_GREETING:
                    raise OSError(f"not an NBD greeting: {greeting[:16]!r}")
                writer.write(NBD_ABORT)
                await writer.drain()
        except (TimeoutError, OSError, EOFError, asyncio.IncompleteReadError):
            lost = self.heartbeats.failed(probe, self._clock())
            if lost is not None:
                self._lost(lost)
            return
        finally:
            if writer is not None:
                writer.close()
        self.heartbeats.answered(probe, self._clock())

    def _send_data_probe(self, dev: RecordChannel | None) -> None:
        """One ARP probe into a guest's input; unsent (not connected) is a miss."""
        assert dev is not None and self.failover.guest_ip is not None
        self._probe_seq = (self._probe_seq + 1) & 0xFFFF
        frame = arp_probe(self._probe_seq, self.failover.guest_ip)
        vnet = VNET_HDR_LEN if dev.vnet_hdr else 0
        if dev.channel.connected and dev.send(
                [(bytes(vnet) + frame, vnet)]):
            self.counters["data_probes_sent"] += 1
        else:
            self.counters["data_probes_unsent"] += 1

    def _take_probe_replies(self, side: Side, frames: list[Frame]) -> list[Frame]:
        """Answers to our data probes, taken out (they are ours, not the guest's output)."""
        kept: list[Frame] | None = None
        for i, (data, off) in enumerate(frames):
            seq = probe_reply_seq(data, off) if data[off + 12:off + 14] == b"\x08\x06" else None
            if seq is None:
                if kept is not None:
                    kept.append((data, off))
                continue
            if kept is None:
                kept = frames[:i]
            # an answer to one of the last `misses` probes shows the path works
            if (self._probe_seq - seq) & 0xFFFF <= self.failover.misses:
                self.counters["data_probe_replies"] += 1
                peer = Peer.PRIMARY if side is Side.PRIMARY else Peer.SECONDARY
                probe = Probe(peer, Via.DATA)
                if not self.heartbeats.state[probe].lost:
                    self.heartbeats.answered(probe, self._clock())
            else:
                self.counters["data_probe_replies_stale"] += 1
        return frames if kept is None else kept

    def _lost(self, lost: Lost) -> None:
        armed = {p.value: self.heartbeats.armed(p) for p in self.heartbeats.peers}
        new_phase, action = decide(self.phase, lost.peer)
        log.error(
            "heartbeat: %s lost on %s (%d misses of %.2fs; silent for %.2fs); phase %s -> %s, %s",
            lost.peer.value, lost.via.value, self.failover.misses, self.failover.period,
            lost.silent_for, self.phase.value, new_phase.value, action.value,
        )
        self.losses.append({
            "peer": lost.peer.value, "via": lost.via.value, "at": lost.at,
            "silent_for": round(lost.silent_for, 3), "phase_before": self.phase.value,
            "action": action.value, "armed": armed,
        })  # fmt: skip
        self.phase = new_phase
        if action is Action.TAKEOVER:
            self._takeover_begins()
            self._sequence = asyncio.create_task(self._takeover(lost), name="takeover")
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

    async def _takeover(self, lost: Lost) -> None:
        t0 = self._clock()
        if lost.via is Via.DATA and self.qmp is not None:
            # its QMP still answers: stop it, so it can neither write its disk into the
            # replica nor talk to anyone while the secondary takes its place
            await self._step("primary: stop (fence)", self.qmp, "stop")
        if self.disk_link is not None:
            await self._step("disk agent: colo-disk-failover", self.disk_link.driver,
                             "colo-disk-failover")
        sec = self.secondary_qmp
        if sec is not None:
            await self._step("secondary: nbd-server-stop", sec, "nbd-server-stop")
            await self._step("secondary: x-colo-lost-heartbeat", sec, "x-colo-lost-heartbeat")
            if self.secondary_out is not None:
                # QEMU's failover turns every filter of the secondary off (the default
                # COLO_EVENT_FAILOVER handler); the output path through colo-proxy is
                # ours to keep, so back on (frames of the few ms between go out directly)
                for obj in self.failover.secondary_output_filters:
                    await self._step(f"secondary: {obj} status on", sec, "qom-set",
                                     {"path": f"/objects/{obj}", "property": "status",
                                      "value": "on"})
            for obj in self.failover.secondary_objects:
                await self._step(f"secondary: object-del {obj}", sec, "object-del", {"id": obj})
            for dev in self.failover.secondary_chardevs:
                await self._step(f"secondary: chardev-remove {dev}", sec, "chardev-remove",
                                 {"id": dev})
            await self._check_virtio(sec)
            await self._ensure_running(sec)
            await self._links_up(sec)  # before announce-self: a down link drops its RARPs
            # switches still send the guest's MAC to the old primary's port (a fenced
            # primary keeps its tap): the new primary announces itself, as after a migration
            await self._step("secondary: announce-self", sec, "announce-self",
                             {"initial": 50, "max": 550, "rounds": 5, "step": 100})
        if lost.via is Via.DATA and self.qmp is not None:
            # a checkpoint the primary had under way when it was stopped ends in
            # vm_start(); none can complete now that the secondary left COLO
            await self._step("primary: stop (fence, COLO over)", self.qmp, "stop")
        self.phase = Phase.PROMOTED
        self._probe_promoted()
        held, self._takeover_hold = self._takeover_hold, []
        if held:
            self._new_primary_output(held)
        log.warning("takeover complete in %.3fs: the former secondary is the primary; its "
                    "output goes %s", self._clock() - t0,
                    "through colo-proxy (secondary_outdev)" if self.secondary_out is not None
                    else "out of its own netdev, around colo-proxy")

    def _probe_promoted(self) -> None:
        """From now on the new primary's data probes go straight into its guest.

        Until the takeover they travelled through the primary's filter-mirror and a
        silent primary excused them (the carrier rule); now the path is the new
        primary's own, so its misses count and a dead path is reported (there is
        no one left to fail over to).  The probe still outstanding went the old way.
        """
        if self.promoted_hb is not None:
            self.heartbeats.reroute(Probe(Peer.SECONDARY, Via.DATA))

    async def _check_virtio(self, sec: QmpDriver) -> None:
        """Report a virtio device the new primary's QEMU left disabled or broken.

        A disabled device ignores its queues without a word: a QEMU without
        tools/patches/0004 could keep a COLO secondary's NIC disabled after a
        checkpoint, and the new primary then never sends anything.  A broken one
        (``virtio_error()``: its rings made no sense to QEMU) serves nothing either.
        Saying so turns a silent outage into a reported one.
        """
        t = self._clock()
        bad: list[str] = []
        error = None
        try:
            devices = await asyncio.wait_for(sec.execute("x-query-virtio"), STEP_TIMEOUT)
            for dev in devices if isinstance(devices, list) else []:
                status = await asyncio.wait_for(
                    sec.execute("x-query-virtio-status", {"path": dev["path"]}), STEP_TIMEOUT)
                if not isinstance(status, dict):
                    continue
                name = f"{dev.get('name')} {dev['path']}"
                bad += [name] if status.get("disabled") else []
                bad += [f"{name} (broken)"] if status.get("broken") else []
        except (TimeoutError, _qmp_error(), OSError, EOFError, KeyError, TypeError) as err:
            error = str(err) or type(err).__name__
        ok = error is None and not bad
        self.steps.append({"step": "secondary: virtio devices enabled", "ok": ok,
                           "error": error or (f"disabled or broken: {bad}" if bad else None),
                           "result": bad, "seconds": round(self._clock() - t, 4)})
        if bad:
            log.error("the new primary's virtio devices %s are DISABLED or BROKEN: they will "
                      "ignore their queues (QEMU without tools/patches/0004?)", bad)

    async def _links_up(self, sec: QmpDriver) -> None:
        """Put the link of every NIC of the new primary up (``set_link``).

        QEMU cannot migrate a NIC's link state, so a loaded virtio-net infers it
        from the status bit in the stream: a checkpoint taken while the
        primary's link was down (``set_link off``: its network cut at the NIC,
        QMP alive) leaves the secondary's NIC down too.  A NIC whose link is
        down drops everything it sends, announce-self's RARPs included, and its
        guest sees no carrier: the promoted secondary would never send a frame.
        The dead primary's link says nothing about the new primary's; a NIC that
        is up already is left as it is (no config interrupt).  Without
        ``failover_secondary_nics`` the NICs are the ones ``query-rx-filter`` lists.
        """
        nics = self.failover.secondary_nics
        if not nics:
            t = self._clock()
            error = None
            try:
                found = await asyncio.wait_for(sec.execute("query-rx-filter"), STEP_TIMEOUT)
                nics = tuple(str(nic["name"]) for nic in found
                             if isinstance(nic, dict) and "name" in nic) \
                    if isinstance(found, list) else ()
            except (TimeoutError, _qmp_error(), OSError, EOFError) as err:
                error = str(err) or type(err).__name__
            self.steps.append({"step": "secondary: query-rx-filter (its NICs)",
                               "ok": error is None, "error": error, "result": list(nics),
                               "seconds": round(self._clock() - t, 4)})
        for nic in nics:
            await self._step(f"secondary: set_link {nic} up", sec, "set_link",
                             {"name": nic, "up": True})

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

    async def _ensure_running(self, sec: QmpDriver) -> None:
        """The promoted secondary must run: a failover that caught it loading a checkpoint
        (stopped in run state colo) leaves it stopped, and nothing else restarts it."""
        try:
            status = await asyncio.wait_for(sec.execute("query-status"), STEP_TIMEOUT)
        except (TimeoutError, _qmp_error(), OSError, EOFError):
            return  # the next step's report says what is wrong with its QMP
        state = status.get("status") if isinstance(status, dict) else None
        if state != "running":
            await self._step(f"secondary: cont (it was {state})", sec, "cont")

    async def _step(self, name: str, driver: QmpDriver, cmd: str,
                    args: dict[str, Any] | None = None) -> object:
        t = self._clock()
        result: object = None
        error = None
        try:
            result = await asyncio.wait_for(driver.execute(cmd, args), STEP_TIMEOUT)
        except (TimeoutError, _qmp_error(), OSError, EOFError) as err:
            error = str(err) or type(err).__name__
        took = self._clock() - t
        self.steps.append({"step": name, "ok": error is None, "error": error,
                           "result": result, "seconds": round(took, 4)})
        if error is None:
            log.warning("failover step %s: ok in %.3fs %s", name, took, result or "")
        else:
            log.warning("failover step %s: failed in %.3fs: %s (going on)", name, took, error)
        return result
