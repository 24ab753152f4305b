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
  kernel needs its own);
* primary-if -> rewriter learns from it -> core (``Side.PRIMARY``); what the
  core releases goes out on client-if;
* secondary-if -> rewriter learns from it -> core (``Side.SECONDARY``); never
  sent anywhere, with one exception: its ARP requests and IPv6 neighbour and
  router solicitations also go out on client-if.  A secondary must resolve
  its neighbours as the primary does (it has the same MAC and IP, so the
  answers, sent to that MAC, reach both guests through the client path);
  the core drops the secondary's uncompared frames, so without this a
  secondary whose neighbour cache is cold never answers a new connection.

Early notice: while a resync is due but the rate limit holds its checkpoint
back (``Proxy.secondary_paused``), the client's input is withheld from the
secondary (its state is about to be replaced) and the core drops its output.

A completed VM checkpoint (QMP ``RESUME``) also tells the rewriter: the
secondary now runs with the primary's TCP state, so every offset is zero.
The rewriter's idle connections are expired on a slow periodic timer.

At shutdown the ports stop reading first, held output is settled by
``--on-shutdown`` like ``run``, then output still queued for the kernel is
drained with a time limit and what remained is reported.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from colo_proxy.core.config import Config
from colo_proxy.core.events import Side
from colo_proxy.core.framing import Frame
from colo_proxy.core.rewrite import SecondaryRewriter
from colo_proxy.drivers.afpacket import PacketPort, RingSpec, busy_poll
from colo_proxy.drivers.endpoints import Endpoint
from colo_proxy.drivers.links import redirect_ingress, remove_ingress
from colo_proxy.drivers.port_links import LinkFollower
from colo_proxy.drivers.qmp import FollowPolicy
from colo_proxy.errors import ConfigError
from colo_proxy.runtime.bridge_sack import HoleSacker
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
    fix_offloads: bool = False
    """Turn off offloads that make super-frames instead of refusing to start."""
    kernel_forward: bool = True
    """Client frames reach the primary in the kernel (tc mirred), not through us."""
    """After a frame, look at the rings this long without sleeping (0: never)."""

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
        if not 0 <= self.busy_poll_us <= 10_000:
            raise ConfigError(f"busy_poll_us {self.busy_poll_us}: must be 0..10000")
        self.ring.validate()


IPV4 = b"\x08\x00"


def neighbour_request(data: bytes) -> bool:
    """Whether a frame is an ARP request or an IPv6 neighbour/router solicitation."""
    at, size = 12, len(data)
    while size >= at + 4 and (data[at], data[at + 1]) in ((0x81, 0x00), (0x88, 0xA8)):
        at += 4  # 802.1Q / 802.1ad tags
    if size < at + 10:
        return False
    if data[at] == 0x08 and data[at + 1] == 0x06:
        return data[at + 8] == 0 and data[at + 9] == 1  # ARP operation 1: request
    if data[at] == 0x86 and data[at + 1] == 0xDD and size > at + 42:
        return data[at + 8] == 58 and data[at + 42] in (133, 135)  # ICMPv6 RS, NS
    return False


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
        self.sack_secondary = HoleSacker(config.max_flows)
        self._drops = 0
        self.counters["rewriter_errors"] = 0
        self.counters["secondary_neighbour_requests"] = 0
        self.counters["secondary_input_withheld"] = 0
        ring, buf = settings.ring, settings.output_buffer
        self._busy_poll = settings.busy_poll_us / 1e6
        self._polling = False
        self.client = PacketPort(
            "client-if", settings.client_if, self._woken(self._from_client), ring, buf
        )
        self.primary = PacketPort(
            "primary-if", settings.primary_if, self._woken(self._from_primary), ring, buf
        )
        self.secondary = PacketPort(
            "secondary-if", settings.secondary_if, self._woken(self._from_secondary), ring, buf
        )
        self.ports = (self.client, self.primary, self.secondary)
        self.links = LinkFollower(self.ports, settings.fix_offloads, self._reopened)
        self._kernel_forward = settings.kernel_forward and settings.ring.version == 2
        self._forwarding = False
        self.counters["kernel_forward_installed"] = 0
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
        if self._forwarding:
            self._forwarding = False
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

    def _reopened(self, port: PacketPort) -> None:
        if self._kernel_forward and port in (self.client, self.primary):
            self._forward_in_kernel()  # a re-created interface lost its filter (or target)

    def _send_released(self, frames: list[Frame]) -> None:
        self.client.send(self.sack_secondary.released(frames, self._clock()))

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
        """``handler``, then a short busy poll of every ring after a small wake-up."""

        def on_frames(frames: list[Frame]) -> None:
            handler(frames)
            if self._busy_poll and not self._polling and len(frames) <= BUSY_POLL_BATCH:
                self._polling = True
                try:
                    busy_poll(self.ports, self._busy_poll, BUSY_POLL_LIMIT)
                finally:
                    self._polling = False

        return on_frames

    def _ring_losses(self) -> None:
        """A ring dropped frames: the sackers follow every flow for a while (bridge_sack)."""
        drops = sum(port.stats.ring_drops for port in self.ports)
        if drops != self._drops:
            self._drops = drops
            now = self._clock()
            self.sack_primary.activate(now)
            self.sack_secondary.activate(now)

    def _from_client(self, frames: list[Frame]) -> None:
        self._ring_losses()
        now = self._clock()
        self._feed(Side.CLIENT, frames)
        if not self._forwarding:
            self.primary.send(frames)
        nudges = self.sack_primary.client_frames(frames)
        if nudges:  # the primary's stream still has a hole: SACK past it again (bridge_sack)
            self.primary.send(nudges)
        if self.proxy.secondary_paused:  # early notice: a resync is due, its state is void
            self.counters["secondary_input_withheld"] += len(frames)
            return
        to_secondary = self.rewriter.to_secondary
        try:
            translated = [(to_secondary(data, now), 0) for data, _ in frames]
        except Exception:  # a rewriter bug: translate one by one, pass the failing frame as is
            translated = [(self._translate_one(data, now), 0) for data, _ in frames]
        self.secondary.send(translated + self.sack_secondary.client_frames(translated))

    def _translate_one(self, data: bytes, now: float) -> bytes:
        try:
            return self.rewriter.to_secondary(data, now)
        except Exception:
            self._rewriter_error("to_secondary", data)
            return data

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
        nudges, _ = self.sack_primary.guest_frames(frames, now)  # it gets every client ACK
        if nudges:  # frames lost before us: the primary resends them at once (bridge_sack)
            self.primary.send(nudges)
        self._feed(Side.PRIMARY, frames)

    def _from_secondary(self, frames: list[Frame]) -> None:
        self._client_first()
        self._ring_losses()
        self._observe(self.rewriter.observe_secondary, frames)
        if self.passthrough_reason is None:
            asks = [f for f in frames if f[0][12:14] != IPV4 and neighbour_request(f[0])]
            if asks:  # the secondary must resolve its neighbours too (see the module's doc)
                self.counters["secondary_neighbour_requests"] += len(asks)
                self.client.send(asks)
        nudges, probes = self.sack_secondary.guest_frames(frames, self._clock())
        if nudges:  # frames lost before us: the secondary resends them at once (bridge_sack)
            self.secondary.send(nudges)
        if probes:  # the secondary missed the client's ACK: the client repeats it
            self.client.send(probes)
        self._feed(Side.SECONDARY, frames)

    def _observe(self, observe: Callable[[bytes, float], None], frames: list[Frame]) -> None:
        now = self._clock()
        for data, _ in frames:
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
