"""Packet ports that follow their interfaces: offloads checked, re-opened when links change.

Why: bridge mode runs for weeks beside VMs that are restarted.  A tap that
QEMU re-creates has a new index (the old socket is bound to nothing), an
interface that went down and up may have been reconfigured, an MTU change
changes the ring's slot size; and any of them may come back with offloads
on.  :class:`LinkFollower` checks offloads before the ports open (refusing
to start, naming interface and feature, unless told to fix them; a port
with virtio_net_hdr takes TCP super-frames, so only the few features it
cannot carry count there: links.NOT_CARRIED), then
watches link events and re-opens a port whose interface came back,
re-checking its offloads first.  Re-opening is deferred by a few
milliseconds so one burst of events (create, set MTU, set up) costs one
re-open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from colo_proxy.drivers.afpacket import PacketPort
from colo_proxy.drivers.links import (
    ALL_OFFLOADS,
    NOT_CARRIED,
    LinkEvent,
    LinkWatch,
    Offload,
    link_info,
    offloads_on,
    turn_off,
)
from colo_proxy.errors import ConfigError

log = logging.getLogger(__name__)

SETTLE = 0.05
"""Seconds a port waits after a link event before it is re-opened (coalesces bursts)."""


class LinkFollower:
    """Offload checks and link events for a set of packet ports."""

    def __init__(
        self, ports: Sequence[PacketPort], fix_offloads: bool,
        on_reopen: Callable[[PacketPort], None] | None = None,
    ) -> None:
        self.ports = tuple(ports)
        self._on_reopen = on_reopen
        self.fix_offloads = fix_offloads
        self.counters = {"link_events": 0, "reopens": 0, "reopen_failures": 0,
                         "offloads_fixed": 0, "offloads_left_on": 0}
        self._watch = LinkWatch(self._on_event)
        self._up = {port.ifname: True for port in self.ports}
        self._pending: dict[str, asyncio.TimerHandle] = {}

    def check_offloads(self) -> None:
        """Before the ports open: fix or refuse offloads (ConfigError names them)."""
        for port in self.ports:
            info = link_info(port.ifname)
            if info is None:
                raise ConfigError(f"{port.name}: no interface named {port.ifname!r}")
            found = offloads_on(info, _features(port))
            if found and not self.fix_offloads:
                how = ("" if port.vnet else
                       " (or let the bridge take super-frames: --offloads accept)")
                raise ConfigError(f"{port.name}: {_describe(found)} on: bridge mode cannot "
                                  f"compare or forward the super-frames they make; turn them "
                                  f"off (ethtool -K IF gro off tso off gso off) or start with "
                                  f"--fix-offloads{how}")
            if found:
                turn_off(found)
                self.counters["offloads_fixed"] += len(found)

    def start(self) -> None:
        """Follow link events (the ports are open and reading)."""
        for port in self.ports:
            info = link_info(port.ifname)
            self._up[port.ifname] = info is not None and info.up
        self._watch.start()

    def close(self) -> None:
        self._watch.close()
        for timer in self._pending.values():
            timer.cancel()
        self._pending.clear()

    def _on_event(self, event: LinkEvent | None) -> None:
        for port in self.ports:
            if event is None:
                self._schedule(port)
                continue
            if event.name != port.ifname and event.index != port.ifindex:
                continue
            self.counters["link_events"] += 1
            was_up = self._up.get(port.ifname, False)
            if event.deleted:
                if event.index == port.ifindex:
                    log.warning("%s: %s was removed: waiting for it to come back",
                                port.name, port.ifname)
                    self._up[port.ifname] = False
                continue
            if event.name != port.ifname:  # renamed away: the name may come back
                self._up[port.ifname] = False
                continue
            self._up[port.ifname] = event.up
            if not event.up and was_up:
                log.warning("%s: %s went down: nothing passes until it is up", port.name,
                            port.ifname)
            if event.index != port.ifindex or event.mtu != port.mtu or (event.up and not was_up):
                self._schedule(port)

    def _schedule(self, port: PacketPort) -> None:
        if port.ifname not in self._pending:
            loop = asyncio.get_running_loop()
            self._pending[port.ifname] = loop.call_later(SETTLE, self._reopen, port)

    def _reopen(self, port: PacketPort) -> None:
        self._pending.pop(port.ifname, None)
        info = link_info(port.ifname)
        if info is None:
            return  # gone again: the next event brings it back
        if port.is_open and (info.index, info.mtu) == (port.ifindex, port.mtu) and not info.up:
            return
        try:
            found = offloads_on(info, _features(port))
            if found and self.fix_offloads:
                turn_off(found)
                self.counters["offloads_fixed"] += len(found)
            elif found:
                self.counters["offloads_left_on"] += len(found)
                log.error("%s: %s came back with %s on: its super-frames will be dropped "
                          "(counted as gso_dropped); turn them off or run with --fix-offloads",
                          port.name, port.ifname, _describe(found))
            port.reopen()
            if self._on_reopen is not None:
                self._on_reopen(port)
        except Exception as err:  # keep bridging the other ports; the next event retries
            self.counters["reopen_failures"] += 1
            log.error("%s: re-opening %s failed: %s", port.name, port.ifname, err)
            return
        self.counters["reopens"] += 1
        log.warning("%s: %s is back (index %d, mtu %d, %s): re-opened", port.name, port.ifname,
                    info.index, info.mtu, "up" if info.up else "down")


def _features(port: PacketPort) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What to check on ``port``: all offloads, or only those its vnet header cannot carry."""
    return NOT_CARRIED if port.vnet else ALL_OFFLOADS


def _describe(found: list[Offload]) -> str:
    by_where: dict[str, list[str]] = {}
    for item in found:
        by_where.setdefault(item.where(), []).append(item.feature)
    return "; ".join(f"{where} has {', '.join(sorted(f))}" for where, f in by_where.items())
