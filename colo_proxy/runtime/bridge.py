"""The proxy as a live bridge between three interfaces: client, primary guest, secondary guest.

Theory of operation
-------------------
Where ``colo-proxy run`` reads QEMU's chardevs, the bridge sits on the wire:
each of ``--client-if``, ``--primary-if`` and ``--secondary-if`` is a
:class:`~colo_proxy.drivers.afpacket.PacketPort` (a TPACKET_V3 ring).  The
core, QMP, timers, divergence log and shutdown are
:class:`~colo_proxy.runtime.host.CoreHost`'s, exactly as for ``run``; only
the frame paths differ:

* client-if -> core (``Side.CLIENT``), then out on primary-if unchanged (by
  the kernel: a tc ingress redirect, as nothing needs deciding; the frame
  still reaches our ring first, and a guest's answer is read only after the
  client frames before it) and on secondary-if translated by the
  :class:`~colo_proxy.core.rewrite.SecondaryRewriter` (the client
  acknowledges the primary's sequence numbers and timestamps; the secondary's
  kernel needs its own).  What needs no translation (ARP, IPv4 other than
  TCP) the kernel also copies to secondary-if (tc mirred mirror), so only
  TCP takes the way through this process;
* primary-if -> rewriter learns from it -> core (``Side.PRIMARY``); what the
  core releases goes out on client-if;
* secondary-if -> rewriter learns from it -> core (``Side.SECONDARY``); never
  sent anywhere, with one exception: its ARP requests and IPv6 neighbour and
  router solicitations also go out on client-if.  A secondary must resolve
  its neighbours as the primary does (it has the same MAC and IP, so the
  answers, sent to that MAC, reach both guests through the client path);
  the core drops the secondary's uncompared frames, so without this a
  secondary whose neighbour cache is cold never answers a new connection.

Offloads (``--offloads accept``, the default where the kernel can): the
ports read and write frames with their ``virtio_net_hdr``
(:mod:`colo_proxy.drivers.vnet`), so the guests' and the client's TSO/GSO
super-frames and open checksums pass whole, as ``(header + frame, 10)``
pairs; the core compares TCP as byte streams, so a 64 KiB super-frame costs
it about what a 1.5 KiB frame does, and the secondary may segment
differently.  The rewriter changes only ack, SACK edges and TSecr: a frame
whose checksum field holds just the pseudo-header sum (an open checksum) is
left so, and the receiver finishes it over the new bytes.  The sackers
(:mod:`.bridge_sack`) read bare frames: while active they get copies
without the header, checksums completed; a released frame whose TSval they
raised goes out behind its own header, its checksum field set back to the
pseudo-header sum if that header leaves it open.  ``--offloads off`` is the old
way: offloads must be off (checked; ``--fix-offloads``).

Early notice: while a resync is due but the rate limit holds its checkpoint
back (``Proxy.secondary_paused``), the client's input is withheld from the
secondary (its state is about to be replaced) and the core drops its output.
The kernel's copy to the secondary is removed then and put back after (one
netlink exchange each way, soon after the state changes; if the filter
cannot be changed, this process carries the secondary's input as before).

A completed VM checkpoint (QMP ``RESUME``) also tells the rewriter: the
secondary now runs with the primary's TCP state, so every offset is zero.
The rewriter's idle connections are expired on a slow periodic timer.

At shutdown the ports stop reading first, held output is settled by
``--on-shutdown`` like ``run``, then output still queued for the kernel is
drained with a time limit and what remained is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from colo_proxy.core.config import Config
from colo_proxy.core.events import Side
from colo_proxy.core.framing import Frame
from colo_proxy.core.rewrite import SecondaryRewriter
from colo_proxy.drivers.afpacket import PacketPort, RingSpec, busy_poll, vnet_supported
from colo_proxy.drivers.endpoints import Endpoint
from colo_proxy.drivers.links import (
    mirror_untranslated,
    needs_no_translation,
    redirect_ingress,
    remove_ingress,
)
from colo_proxy.drivers.port_links import LinkFollower
from colo_proxy.drivers.qmp import FollowPolicy
from colo_proxy.drivers.vnet import F_NEEDS_CSUM, plain, reopened
from colo_proxy.errors import ConfigError
from colo_proxy.runtime.bridge_sack import RECENT_BATCHES, HoleSacker
from colo_proxy.runtime.host import DIVERGENCE_LOG_BURST, CoreHost, ShutdownMode

log = logging.getLogger(__name__)

DRAIN_LIMIT = 2.0
"""Seconds shutdown waits for queued output to leave."""

BUSY_POLL_LIMIT = 0.002
"""The longest one busy poll keeps the loop from timers and QMP (seconds)."""

BUSY_POLL_BATCH = 8
"""Busy poll only after a wake-up this small: under load the next wake-up comes by itself,
and spinning would take the CPU the guests need to send."""


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    """Everything `colo-proxy bridge` needs besides the core Config."""

    client_if: str
    primary_if: str
    secondary_if: str
    qmp: Endpoint | None = None
    qmp_follow: FollowPolicy = FollowPolicy.COLO
    qmp_request_timeout: float = 5.0
    on_shutdown: ShutdownMode = ShutdownMode.REPORT
    stats_interval: float = 0.0
    ring: RingSpec = field(default_factory=RingSpec)
    output_buffer: int = 64 * 1024 * 1024
    secondary_qmp: Endpoint | None = None
    disk_qmp: Endpoint | None = None
    disk_tls_creds: Path | None = None
    qmp_tls_creds: Path | None = None
    busy_poll_us: int = 100
    """After a small wake-up, look at the rings this long without sleeping (0: never)."""
    fix_offloads: bool = False
    """Turn off offloads that make super-frames instead of refusing to start."""
    offloads: str = "accept"
    """accept: take super-frames and open checksums whole (virtio_net_hdr) where the kernel
    can; off: they must be off (refused, or turned off with fix_offloads)."""
    kernel_forward: bool = True
    """Client frames reach the primary in the kernel (tc mirred), not through us."""
    kernel_mirror: bool = True
    """With kernel_forward: what needs no translation reaches the secondary in the kernel too."""

    def validate(self) -> None:
        """Three distinct interfaces and a sane ring; ConfigError otherwise."""
        names = (self.client_if, self.primary_if, self.secondary_if)
        if len(set(names)) != 3:
            raise ConfigError(
                "bridge: --client-if, --primary-if and --secondary-if must be three "
                f"different interfaces, got {', '.join(names)}"
            )
        if self.output_buffer < 65536:
            raise ConfigError("output_buffer: must be at least 65536 bytes")
        if self.offloads not in OFFLOAD_MODES:
            raise ConfigError(f"offloads {self.offloads!r}: must be one of "
                              f"{', '.join(OFFLOAD_MODES)}")
        if not 0 <= self.busy_poll_us <= 10_000:
            raise ConfigError(f"busy_poll_us {self.busy_poll_us}: must be 0..10000")
        self.ring.validate()


IPV4 = b"\x08\x00"
OFFLOAD_MODES = ("accept", "off")


def neighbour_request(data: bytes, offset: int = 0) -> bool:
    """Whether a frame (from ``offset``) is an ARP request or an IPv6 neighbour/router
    solicitation."""
    at, size = offset + 12, len(data)
    while size >= at + 4 and (data[at], data[at + 1]) in ((0x81, 0x00), (0x88, 0xA8)):
        at += 4  # 802.1Q / 802.1ad tags
    if size < at + 10:
        return False
    if data[at] == 0x08 and data[at + 1] == 0x06:
        return data[at + 8] == 0 and data[at + 9] == 1  # ARP operation 1: request
    if data[at] == 0x86 and data[at + 1] == 0xDD and size > at + 42:
        return data[at + 8] == 58 and data[at + 42] in (133, 135)  # ICMPv6 RS, NS
    return False


def _behind(data: bytes, offset: int, changed: bytes) -> Frame:
    """``changed`` (a bare frame a sacker edited from ``(data, offset)``) behind that header.

    A header that leaves the checksum open gets the field set back to the
    pseudo-header sum: the sacker worked on a copy whose checksum was complete.
    """
    if not offset:
        return changed, 0
    if data[0] & F_NEEDS_CSUM:
        changed = reopened(changed)
    return data[:offset] + changed, offset


class Bridge(CoreHost):
    """The core between three interfaces (``colo-proxy bridge``)."""

    def __init__(
        self, config: Config, settings: BridgeSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        settings.validate()
        super().__init__(config, settings, clock)
        self.settings = settings
        self.rewriter = SecondaryRewriter(config.max_flows, config.flow_idle_timeout)
        self.sack_primary = HoleSacker(config.max_flows)
        self.sack_secondary = HoleSacker(config.max_flows, echo_recent=True)
        self._drops = 0
        self._recent: tuple[deque[list[Frame]], deque[list[Frame]]] = (
            deque(maxlen=RECENT_BATCHES), deque(maxlen=RECENT_BATCHES))
        """vnet: the last client batches (as the primary, as the secondary got them), kept by
        reference while the sackers are idle; they read them bare once a ring drops frames."""
        self.counters["rewriter_errors"] = 0
        self.counters["secondary_neighbour_requests"] = 0
        self.counters["secondary_input_withheld"] = 0
        ring, buf = settings.ring, settings.output_buffer
        self._vnet = vnet = (settings.offloads == "accept" and ring.version == 2
                             and vnet_supported())
        if settings.offloads == "accept" and not vnet:
            log.warning("offloads: super-frames cannot be taken here (ring version %d, or no "
                        "virtio_net_hdr on packet rings): offloads must be off", ring.version)
        self._busy_poll = settings.busy_poll_us / 1e6
        self._polling = False
        self._cycling = False
        self._owe_after = False
        self.client = PacketPort(
            "client-if", settings.client_if, self._woken(self._from_client), ring, buf,
            vnet=vnet,
        )
        self.primary = PacketPort(
            "primary-if", settings.primary_if, self._woken(self._from_primary), ring, buf,
            vnet=vnet,
        )
        self.secondary = PacketPort(
            "secondary-if", settings.secondary_if, self._woken(self._from_secondary), ring, buf,
            vnet=vnet,
        )
        self.ports = (self.client, self.primary, self.secondary)
        self.links = LinkFollower(self.ports, settings.fix_offloads, self._reopened)
        self._kernel_forward = settings.kernel_forward and settings.ring.version == 2
        self._forwarding = False
        self._mirror_wanted = self._kernel_forward and settings.kernel_mirror
        self._mirror_installed = False
        self._mirror_on = False
        """Whether the kernel copies untranslated client frames to the secondary now."""
        self._mirror_sync: asyncio.Handle | None = None
        self.counters["kernel_forward_installed"] = 0
        self.counters["kernel_mirror_changes"] = 0
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_every = max(1.0, min(30.0, config.flow_idle_timeout / 4))

    # ---- ports --------------------------------------------------------------------------

    async def _open_ports(self) -> None:
        self.links.check_offloads()
        opened: list[PacketPort] = []
        try:
            for port in self.ports:
                port.open()
                opened.append(port)
        except Exception:
            for port in opened:
                port.close()
            raise
        mtus = {port.ifname: port.mtu for port in self.ports}
        if len(set(mtus.values())) > 1:
            log.warning("interface MTUs differ (%s): larger frames will be dropped (counted)",
                        ", ".join(f"{k} {v}" for k, v in mtus.items()))
        for port in self.ports:
            port.start()
        if self._kernel_forward:
            self._forward_in_kernel()
        self.links.start()
        self._schedule_expiry()
        log.info("bridge up: client %s, primary %s, secondary %s",
                 self.client.ifname, self.primary.ifname, self.secondary.ifname)

    async def _close_inputs(self) -> None:
        self.links.close()
        if self._mirror_sync is not None:
            self._mirror_sync.cancel()
            self._mirror_sync = None
        if self._forwarding:
            self._forwarding = self._mirror_on = self._mirror_installed = False
            try:
                remove_ingress(self.client.ifname)
            except Exception as err:  # the interface may be gone: so is its qdisc
                log.warning("removing the tc redirect from %s: %s", self.client.ifname, err)
        for port in self.ports:
            port.stop_reading()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    async def _close_outputs(self) -> dict[str, object]:
        deadline = time.monotonic() + DRAIN_LIMIT
        while any(p.pending_frames for p in self.ports) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        pending = {p.name: p.pending_frames for p in self.ports}
        for port in self.ports:
            port.close()
        return {"output_frames_pending_at_close": pending}

    def _forward_in_kernel(self) -> None:
        """Client frames go to the primary by tc mirred: no decision, so no Python."""
        self._mirror_installed = self._mirror_on = False
        try:
            redirect_ingress(self.client.ifname, self.primary.ifname)
        except Exception as err:  # then this process forwards them, as before
            self._forwarding = False
            log.warning("cannot redirect %s to %s in the kernel (%s): forwarding client frames "
                        "here", self.client.ifname, self.primary.ifname, err)
            return
        self._forwarding = True
        self.counters["kernel_forward_installed"] += 1
        log.info("client frames reach %s by tc ingress mirred on %s", self.primary.ifname,
                 self.client.ifname)
        self._sync_mirror()

    def _sync_mirror(self) -> None:
        """Make the kernel's copy to the secondary follow the early notice.

        Runs between callbacks (never inside a batch: the frames read while
        putting the copy back are taken here, before any later batch, so the
        secondary's input keeps its order).  Turning it on, frames already in
        the client ring may have missed the copy: they are read and sent by
        us before the bridge trusts the kernel with the rest.
        """
        self._mirror_sync = None
        want = self._mirror_wanted and self._forwarding and not self.proxy.secondary_paused
        if want == self._mirror_installed:
            return
        client, primary = self.client.ifname, self.primary.ifname
        try:
            if not want:
                self._mirror_on = False  # from now on the secondary gets nothing from us either
                mirror_untranslated(client, primary, None)
                self._mirror_installed = False
            else:
                mirror_untranslated(client, primary, self.secondary.ifname)
                self._mirror_installed = True
                for _ in range(64):  # bounded: a client that never pauses cannot hold us here
                    if not self.client.ready():
                        break
                    self._client_first()
                self._mirror_on = True
        except Exception as err:  # this process carries the secondary's input, as before
            self._mirror_wanted = self._mirror_on = False
            log.warning("cannot change the tc copy of %s to %s (%s): sending the secondary "
                        "its input from here", client, self.secondary.ifname, err)
            with contextlib.suppress(Exception):
                mirror_untranslated(client, primary, None)
            self._mirror_installed = False
            return
        self.counters["kernel_mirror_changes"] += 1
        log.info("untranslated client frames %s %s in the kernel",
                 "reach" if want else "no longer reach", self.secondary.ifname)

    def _after(self, now: float) -> None:
        super()._after(now)
        if (self._mirror_sync is None and self._forwarding and self._mirror_wanted
                and self.proxy.secondary_paused == self._mirror_installed):
            self._mirror_sync = asyncio.get_running_loop().call_soon(self._sync_mirror)

    def _reopened(self, port: PacketPort) -> None:
        if self._kernel_forward:
            self._forward_in_kernel()  # a re-created interface lost its filter (or target)

    def _send_released(self, frames: list[Frame]) -> None:
        sacker = self.sack_secondary
        if self._vnet and sacker.active:
            self.client.send(self._released_vnet(frames))
        else:
            self.client.send(sacker.released(frames, self._clock()))

    def _released_vnet(self, frames: list[Frame]) -> list[Frame]:
        """The sacker's TSval fix (bridge_sack) on vnet frames: it reads and edits bare ones.

        A frame it changed goes out behind its own header again; if that header
        leaves the checksum open (a super-frame, or an offloaded one), the field
        is set back to the pseudo-header sum the receiver starts from.
        """
        bare = [(plain(data, offset), 0) for data, offset in frames]
        out = self.sack_secondary.released(bare, self._clock())
        if out is bare:
            return frames
        return [(data, offset) if after is before else _behind(data, offset, after[0])
                for (data, offset), before, after in zip(frames, bare, out, strict=True)]

    def _port_stats(self) -> dict[str, object]:
        out: dict[str, object] = {port.name: port.counters() for port in self.ports}
        out["rewriter"] = self.rewriter.stats()
        out["sack_primary"] = self.sack_primary.stats()
        out["sack_secondary"] = self.sack_secondary.stats()
        out["links"] = dict(self.links.counters)
        return out

    def _vm_checkpoint_done(self) -> None:
        self.rewriter.checkpoint_done()
        self.sack_primary.forget()
        self.sack_secondary.forget()

    # ---- frame paths --------------------------------------------------------------------

    def _woken(self, handler: Callable[[list[Frame]], None]) -> Callable[[list[Frame]], None]:
        """A wake-up's cycle: every ring read once, one settling, then a short busy poll.

        Whichever socket woke us, the other rings are read too (client, then
        primary, then secondary: a guest's answer never before the client frame
        it answers), and the core's output is carried out once for the whole
        cycle (:meth:`_feed`): one ``take_output``, one timer, one send of
        every released frame, instead of one per ring.  At low load a cycle is
        one frame; at high load every ring's backlog.  A read inside a cycle
        (``_client_first``, the drain) only feeds.
        """

        def on_frames(frames: list[Frame]) -> None:
            if self._cycling:
                handler(frames)
                return
            self._cycling = True
            try:
                handler(frames)
                for port in self.ports:
                    if port.ready():
                        port.read()
            finally:
                self._cycling = False
            if self._owe_after:
                self._owe_after = False
                self._after(self._clock())
            if self._busy_poll and not self._polling and len(frames) <= BUSY_POLL_BATCH:
                self._polling = True
                try:
                    busy_poll(self.ports, self._busy_poll, BUSY_POLL_LIMIT)
                finally:
                    self._polling = False

        return on_frames

    def _feed(self, side: Side, frames: list[Frame]) -> None:
        """Inside a cycle, compare only: the cycle carries out the output once at its end."""
        if (not self._cycling or self.passthrough_reason is not None
                or (self.disk_link is not None and self.disk_link.waiting)):
            super()._feed(side, frames)
            return
        self._compare(side, frames, self._clock())
        self._owe_after = True

    def _ring_losses(self) -> None:
        """A ring dropped frames: the sackers follow every flow for a while (bridge_sack)."""
        drops = sum(port.stats.ring_drops for port in self.ports)
        if drops != self._drops:
            self._drops = drops
            now = self._clock()
            for sacker, recent in zip((self.sack_primary, self.sack_secondary), self._recent,
                                      strict=True):
                was_active = sacker.active
                sacker.activate(now)
                if not was_active and recent:  # what they would have kept themselves
                    for batch in recent:
                        sacker.client_frames([(plain(d, o), 0) for d, o in batch])
                    recent.clear()

    def _from_client(self, frames: list[Frame]) -> None:
        self._ring_losses()
        now = self._clock()
        self._feed(Side.CLIENT, frames)
        if not self._forwarding:
            self.primary.send(frames)
        nudges = self._sack_client(self.sack_primary, frames, 0)
        if nudges:  # the primary's stream still has a hole: SACK past it again (bridge_sack)
            self.primary.send(nudges)
        if self.proxy.secondary_paused:  # early notice: a resync is due, its state is void
            self.counters["secondary_input_withheld"] += len(frames)
            return
        if self._mirror_on:  # the kernel copied what needs no translation (links.py)
            frames = [f for f in frames if not needs_no_translation(*f)]
            if not frames:
                return
        to_secondary = self.rewriter.to_secondary
        translated: list[Frame]
        try:
            if self._vnet:
                translated = [self._translate_vnet(data, offset, now) for data, offset in frames]
            else:
                translated = [(to_secondary(data, now), 0) for data, _ in frames]
        except Exception:  # a rewriter bug: translate one by one, pass the failing frame as is
            translated = [self._translate_one(data, offset, now) for data, offset in frames]
        self.secondary.send(translated + self._sack_client(self.sack_secondary, translated, 1))

    def _translate_vnet(self, data: bytes, offset: int, now: float) -> Frame:
        """The rewriter on the frame behind the virtio_net_hdr; the header stays as it was.

        An open checksum stays open: the rewriter leaves a field holding only
        the pseudo-header sum alone (the addresses and length it covers do
        not change), and the receiver sums the new ack and options itself.
        """
        if not offset:
            return self.rewriter.to_secondary(data, now), 0
        frame = data[offset:]
        out = self.rewriter.to_secondary(frame, now)
        return (data, offset) if out is frame else (data[:offset] + out, offset)

    def _translate_one(self, data: bytes, offset: int, now: float) -> Frame:
        try:
            if self._vnet:
                return self._translate_vnet(data, offset, now)
            return self.rewriter.to_secondary(data, now), 0
        except Exception:
            self._rewriter_error("to_secondary", data[offset:])
            return data, offset

    def _bare(self, sacker: HoleSacker, frames: list[Frame]) -> list[Frame] | None:
        """What a sacker may read of ``frames``: as is, bare copies (vnet), or None (skip).

        The sackers parse frames from byte 0 and rewrite checksums
        incrementally; with vnet headers they get bare frames with complete
        checksums, only while active (the copies cost; idle they need nothing
        but the client's latest frame, which the next client frame gives).
        """
        if not self._vnet:
            return frames
        if not sacker.active:
            return None
        return [(plain(data, offset), 0) for data, offset in frames]

    def _sack_client(self, sacker: HoleSacker, frames: list[Frame], which: int) -> list[Frame]:
        """The sacker's client_frames; a frame it replaced (TS.recent echo) is replaced in
        ``frames`` too, behind the original's header."""
        bare = self._bare(sacker, frames)
        if bare is None:
            self._recent[which].append(frames)
            return []
        if bare is frames:
            return sacker.client_frames(frames)
        before = list(bare)
        nudges = sacker.client_frames(bare)
        for i, (old, new) in enumerate(zip(before, bare, strict=True)):
            if new is not old:
                frames[i] = _behind(*frames[i], new[0])
        return nudges

    def _client_first(self) -> None:
        """Feed client frames already in the ring before a guest's answer to them.

        With kernel forwarding a guest can answer a client frame before we
        read it; the frame is in the client ring by then (packet sockets see
        it before tc forwards it), so reading that ring first keeps the order.
        """
        if self._forwarding and self.client.ready():
            polling, self._polling = self._polling, True
            try:
                self.client.read()
            finally:
                self._polling = polling

    def _from_primary(self, frames: list[Frame]) -> None:
        self._client_first()
        self._ring_losses()
        now = self._clock()
        self._observe(self.rewriter.observe_primary, frames)
        bare = self._bare(self.sack_primary, frames)
        nudges = self.sack_primary.guest_frames(bare, now)[0] if bare is not None else []
        # (the primary gets every client ACK: no probes for it)
        if nudges:  # frames lost before us: the primary resends them at once (bridge_sack)
            self.primary.send(nudges)
        self._feed(Side.PRIMARY, frames)

    def _from_secondary(self, frames: list[Frame]) -> None:
        self._client_first()
        self._ring_losses()
        self._observe(self.rewriter.observe_secondary, frames)
        if self.passthrough_reason is None:
            asks = [f for f in frames
                    if f[0][f[1] + 12 : f[1] + 14] != IPV4 and neighbour_request(*f)]
            if asks:  # the secondary must resolve its neighbours too (see the module's doc)
                self.counters["secondary_neighbour_requests"] += len(asks)
                self.client.send(asks)
        bare = self._bare(self.sack_secondary, frames)
        nudges, probes = (self.sack_secondary.guest_frames(bare, self._clock())
                          if bare is not None else ([], []))
        if nudges:  # frames lost before us: the secondary resends them at once (bridge_sack)
            self.secondary.send(nudges)
        if probes:  # the secondary missed the client's ACK: the client repeats it
            self.client.send(probes)
        self._feed(Side.SECONDARY, frames)

    def _observe(self, observe: Callable[[bytes, float], None], frames: list[Frame]) -> None:
        now = self._clock()
        for data, offset in frames:
            if offset:  # the rewriter reads bare frames; plain TCP segments teach it nothing
                at = offset + 14
                if (len(data) >= at + 40 and data[at - 2] == 8 and data[at - 1] == 0
                        and data[at] == 0x45 and data[at + 9] == 6 and not data[at + 33] & 7):
                    continue
                data = data[offset:]
            try:
                observe(data, now)
            except Exception:  # a rewriter bug costs what it learns from this frame only
                self._rewriter_error(observe.__name__, data)

    def _rewriter_error(self, what: str, data: bytes) -> None:
        self.counters["rewriter_errors"] += 1
        if self.counters["rewriter_errors"] <= DIVERGENCE_LOG_BURST:
            log.exception("rewriter %s failed on a %d-byte frame: %s",
                          what, len(data), data[:64].hex())

    def _schedule_expiry(self) -> None:
        self._expiry = asyncio.get_running_loop().call_later(self._expiry_every, self._expire)

    def _expire(self) -> None:
        self.rewriter.expire(self._clock())
        self._schedule_expiry()
