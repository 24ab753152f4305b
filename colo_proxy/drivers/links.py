"""Interfaces as netlink sees them: index, MTU, state, and offloads (pyroute2).

Why netlink: the bridge must know an interface's MTU and whether it is up
before it opens a ring there, and must notice when it goes down, comes back
or is re-created (a tap QEMU re-creates gets a new index).  ``IPRoute``
answers the first and its multicast groups deliver the second as events,
without hand-packed ioctls.

Offloads: a frame that the kernel coalesced (GRO/LRO) or that a sender
handed down unsegmented (TSO/GSO) is bigger than the wire carries.  A port
with ``virtio_net_hdr`` (the default) takes TCP super-frames whole and sends
them on whole, so only what it cannot carry matters (:data:`NOT_CARRIED`:
fraglist GRO/GSO, UDP GRO forwarding); without it (``--offloads off``, or a
kernel without vnet rings) every feature below does.  :func:`offloads_on`
names the features that would produce such frames on an interface we read,
and :func:`turn_off` switches them off (``--fix-offloads``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from colo_proxy.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

IFF_UP = 0x1
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

RX_COALESCING = ("rx-gro", "rx-lro", "rx-gro-hw", "rx-gro-list", "rx-udp-gro-forwarding")
"""Features of the interface we read that merge received frames into super-frames."""

TX_SEGMENTATION = (
    "tx-tcp-segmentation", "tx-tcp6-segmentation", "tx-tcp-ecn-segmentation",
    "tx-tcp-mangleid-segmentation", "tx-generic-segmentation", "tx-udp-segmentation",
    "tx-gso-list",
)
"""Features of a sender (a veth's peer) that hand its frames over unsegmented."""

NOT_CARRIED: tuple[tuple[str, ...], tuple[str, ...]] = (
    ("rx-gro-list", "rx-udp-gro-forwarding"), ())
"""(receive, sender) features whose super-frames a virtio_net_hdr port cannot carry:
fraglist GRO has no virtio_net_hdr type; UDP GRO would merge datagrams the core
compares one by one.  No sender feature: a veth's ``tx-gso-list`` (on by default)
only lets it take fraglist frames, which a guest's own stack does not make (its
UDP GSO, which it makes only when an application asks, is dropped and counted)."""
ALL_OFFLOADS = (RX_COALESCING, TX_SEGMENTATION)


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """One interface as netlink reported it."""

    name: str
    index: int
    mtu: int
    up: bool
    kind: str = ""
    peer_index: int = 0
    """A veth's peer (its index in ``peer_netnsid``'s namespace, or in ours)."""
    peer_netnsid: int | None = None


@dataclass(frozen=True, slots=True)
class Offload:
    """A feature that is on where it would hand the proxy super-frames."""

    ifname: str
    feature: str
    netns: str | None = None
    """The named network namespace the interface lives in (None: ours)."""

    def where(self) -> str:
        return self.ifname if self.netns is None else f"{self.ifname} (netns {self.netns})"


def off_loop(func: Callable[[], T]) -> T:
    """Run a blocking pyroute2 call on a thread of its own.

    pyroute2's synchronous classes drive an asyncio loop of their own, which
    cannot run inside the proxy's running loop; on a thread it can.  A thread
    may also enter another network namespace without moving the proxy.  These
    calls happen at start-up and when a link changes, never per frame.
    """
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(func).result()


def link_info(ifname: str) -> LinkInfo | None:
    """The interface named ``ifname`` now, or None when there is none."""
    return off_loop(lambda: _link_info(ifname))


def _info(msg: object) -> LinkInfo:
    get = msg.get_attr  # type: ignore[attr-defined]
    link_info = get("IFLA_LINKINFO")
    kind = str((link_info.get_attr("IFLA_INFO_KIND") if link_info is not None else "") or "")
    flags = int(msg["flags"])  # type: ignore[index]
    return LinkInfo(
        name=str(get("IFLA_IFNAME")), index=int(msg["index"]),  # type: ignore[index]
        mtu=int(get("IFLA_MTU") or 0), up=bool(flags & IFF_UP), kind=kind,
        peer_index=int(get("IFLA_LINK") or 0) if kind == "veth" else 0,
        peer_netnsid=get("IFLA_LINK_NETNSID") if kind == "veth" else None,
    )


def _link_info(ifname: str | None = None, index: int = 0) -> LinkInfo | None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            msgs = ipr.link("get", ifname=ifname) if ifname else ipr.link("get", index=index)
        except NetlinkError:
            return None
        return _info(msgs[0]) if msgs else None


def offloads_on(
    info: LinkInfo, features: tuple[Iterable[str], Iterable[str]] = ALL_OFFLOADS
) -> list[Offload]:
    """The features that would hand the proxy super-frames on ``info``; [] when none.

    Checks the interface's own receive coalescing and, for a veth, its peer's
    segmentation offloads, entering the peer's namespace when it has a name
    under /run/netns.  (A guest behind a tap is out of reach: its super-frames
    are caught as they arrive, counted and logged with the fix.)  ``features``
    is (receive, sender) names: :data:`ALL_OFFLOADS`, or :data:`NOT_CARRIED`
    for a port that takes super-frames.
    """
    return off_loop(lambda: _offloads_on(info, features))


def _offloads_on(info: LinkInfo, features: tuple[Iterable[str], Iterable[str]]) -> list[Offload]:
    rx, tx = tuple(features[0]), tuple(features[1])
    found = [Offload(info.name, f) for f in _enabled(info.name, rx)]
    if info.peer_index:
        netns = None if info.peer_netnsid is None else _netns_name(info.peer_netnsid)
        if info.peer_netnsid is None or netns is not None:
            found += off_loop(lambda: _peer_offloads(info.peer_index, netns, tx))
        else:
            log.info("%s: its veth peer is in a namespace without a name under %s: its "
                     "offloads cannot be checked (super-frames are still counted)",
                     info.name, NETNS_DIR)
    return found


def _peer_offloads(index: int, netns: str | None, tx: tuple[str, ...]) -> list[Offload]:
    """On a thread of its own (it may enter ``netns`` and never leave)."""
    if netns is not None:
        _enter(netns)
    peer = _link_info(index=index)
    if peer is None:
        return []
    return [Offload(peer.name, f, netns) for f in _enabled(peer.name, tx)]


def _netns_name(nsid: int) -> str | None:
    """The /run/netns name of the namespace our namespace knows as ``nsid``."""
    from pyroute2 import IPRoute

    try:
        names = sorted(os.listdir(NETNS_DIR))
    except OSError:
        return None
    with IPRoute() as ipr:
        for name in names:
            try:
                fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                if ipr.get_netnsid(fd=fd).get("nsid") == nsid:
                    return name
            except Exception:  # a namespace file being removed, or not a namespace
                continue
            finally:
                os.close(fd)
    return None


def _enter(netns: str) -> None:
    """Move the calling thread (only) into the named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _enabled(ifname: str, names: Iterable[str]) -> list[str]:
    from pyroute2.ethtool import Ethtool

    wanted = set(names)
    ethtool = Ethtool()
    try:
        features = ethtool.get_features(ifname).features
    except Exception as err:  # pyroute2 raises several kinds here
        raise ConfigError(f"cannot read the offloads of {ifname}: {err}") from err
    finally:
        ethtool.close()
    return sorted(n for n, f in features.items() if n in wanted and f.enable and f.available)


def turn_off(found: list[Offload]) -> None:
    """Switch the given features off, logging each; ConfigError when the kernel refuses."""
    by_place: dict[tuple[str, str | None], set[str]] = {}
    for item in found:
        by_place.setdefault((item.ifname, item.netns), set()).add(item.feature)
    for (ifname, netns), names in by_place.items():
        off_loop(lambda: _turn_off(ifname, netns, names))  # noqa: B023 - called at once
        where = Offload(ifname, "", netns).where()
        log.warning("--fix-offloads: turned %s off on %s", ", ".join(sorted(names)), where)


def _turn_off(ifname: str, netns: str | None, names: set[str]) -> None:
    from pyroute2.ethtool import Ethtool

    if netns is not None:
        _enter(netns)
    ethtool = Ethtool()
    try:
        features = ethtool.get_features(ifname)
        for name in names:
            features.features[name].enable = False
        ethtool.set_features(ifname, features)
    finally:
        ethtool.close()
    still = _enabled(ifname, names)
    if still:
        raise ConfigError(f"{ifname}: the kernel kept {', '.join(still)} on")


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """A link appeared, changed or went away (RTM_NEWLINK / RTM_DELLINK)."""

    name: str
    index: int
    up: bool
    mtu: int
    deleted: bool


RTMGRP_LINK = 0x1
NETLINK_ROUTE = 0
RTM_NEWLINK = 16
RTM_DELLINK = 17


class LinkWatch:
    """Link events from the kernel, read on the running loop.

    A plain ``NETLINK_ROUTE`` socket joined to ``RTMGRP_LINK``, read with
    ``add_reader`` and parsed by pyroute2's marshal: pyroute2's own async
    socket cannot run on uvloop (it refuses a netlink datagram endpoint).
    If the kernel dropped events (``ENOBUFS``) ``on_event`` gets None: look
    at every interface again.
    """

    def __init__(self, on_event: Callable[[LinkEvent | None], None]) -> None:
        self._on_event = on_event
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl

        self._marshal = MarshalRtnl()
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, RTMGRP_LINK))
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                log.warning("link events were lost (the kernel's queue overflowed): "
                            "looking at every interface again")
                self._on_event(None)
                continue
            for msg in self._marshal.parse(data):
                if msg["header"]["type"] not in (RTM_NEWLINK, RTM_DELLINK):
                    continue
                self._on_event(LinkEvent(
                    name=str(msg.get_attr("IFLA_IFNAME")), index=int(msg["index"]),
                    up=bool(int(msg["flags"]) & IFF_UP), mtu=int(msg.get_attr("IFLA_MTU") or 0),
                    deleted=msg["header"]["type"] == RTM_DELLINK,
                ))

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


INGRESS = 0xFFFF0000
ETH_P_ALL = 0x0003


ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
PRIO_TCP, PRIO_IP, PRIO_ARP, PRIO_REST = 1, 2, 3, 4
"""The client port's ingress filters, tried in this order (a redirect ends the search)."""


def redirect_ingress(src: str, dst: str) -> None:
    """Every frame arriving on ``src`` leaves on ``dst`` in the kernel (tc ingress + mirred).

    Packet sockets on ``src`` still see each frame: the kernel hands it to
    them before tc's ingress hook runs.  An ingress qdisc already there is
    replaced (a proxy that crashed left it).  IPv4 TCP and everything else
    get separate filters, so :func:`mirror_untranslated` can add the
    secondary's leg for what needs no translation between them.
    """
    off_loop(lambda: _redirect_ingress(src, dst))


def _redirect(index: int, mirror: int = 0) -> list[dict[str, object]]:
    actions: list[dict[str, object]] = []
    if mirror:
        actions.append({"kind": "mirred", "direction": "egress", "action": "mirror",
                        "ifindex": mirror})
    actions.append({"kind": "mirred", "direction": "egress", "action": "redirect",
                    "ifindex": index})
    return actions


def _redirect_ingress(src: str, dst: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        src_index, dst_index = ipr.link_lookup(ifname=src)[0], ipr.link_lookup(ifname=dst)[0]
        _del_ingress(ipr, src_index)
        ipr.tc("add", "ingress", src_index, "ffff:")
        # IPv4 whose protocol byte (offset 9 of the IP header) is 6: TCP
        ipr.tc("add-filter", "u32", src_index, parent=INGRESS, prio=PRIO_TCP,
               protocol=ETH_P_IP, target=0x10001, keys=["0x06/0xff+9"],
               action=_redirect(dst_index))
        ipr.tc("add-filter", "u32", src_index, parent=INGRESS, prio=PRIO_REST,
               protocol=ETH_P_ALL, target=0x10001, keys=["0x0/0x0+0"],
               action=_redirect(dst_index))


def mirror_untranslated(src: str, primary: str, secondary: str | None) -> None:
    """Client frames that need no translation also reach ``secondary`` in the kernel.

    ARP and IPv4 other than TCP (ICMP, UDP) pass to the secondary unchanged
    (see :func:`needs_no_translation`), so tc copies them there as it
    redirects them to ``primary``.  ``secondary`` None removes that leg
    (the early notice withholds the client's input from the secondary); those
    frames then fall through to the redirect to the primary alone.  Needs
    :func:`redirect_ingress` first.
    """
    off_loop(lambda: _mirror_untranslated(src, primary, secondary))


def _mirror_untranslated(src: str, primary: str, secondary: str | None) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        src_index, dst_index = ipr.link_lookup(ifname=src)[0], ipr.link_lookup(ifname=primary)[0]
        for prio, proto in ((PRIO_IP, ETH_P_IP), (PRIO_ARP, ETH_P_ARP)):
            with contextlib.suppress(NetlinkError):  # there was none
                ipr.tc("del-filter", "u32", src_index, parent=INGRESS, prio=prio, protocol=proto,
                       target=0x10001)
            if secondary is not None:  # (only u32 is sure to be there: no matchall here)
                mirror = ipr.link_lookup(ifname=secondary)[0]
                ipr.tc("add-filter", "u32", src_index, parent=INGRESS, prio=prio,
                       protocol=proto, target=0x10001, keys=["0x0/0x0+0"],
                       action=_redirect(dst_index, mirror))


def needs_no_translation(data: bytes, offset: int = 0) -> bool:
    """Whether the kernel's secondary leg (:func:`mirror_untranslated`) carries this frame.

    The same test as the filters: after at most one VLAN tag (the kernel
    strips one before tc looks), ARP, or IPv4 whose protocol is not TCP.
    The frame starts at ``offset`` (a virtio_net_hdr before it).
    """
    at = offset + 12
    if data[at : at + 2] in (b"\x81\x00", b"\x88\xa8"):
        at += 4
    kind = data[at : at + 2]
    if kind == b"\x08\x06":
        return True
    return kind == b"\x08\x00" and len(data) > at + 11 and data[at + 11] != 6


def remove_ingress(ifname: str) -> None:
    """Remove ``ifname``'s ingress qdisc and its filters (nothing if there is none)."""
    off_loop(lambda: _remove_ingress(ifname))


def _remove_ingress(ifname: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            _del_ingress(ipr, found[0])


def _del_ingress(ipr: object, index: int) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    with contextlib.suppress(NetlinkError):  # there was none
        ipr.tc("del", "ingress", index, "ffff:")  # type: ignore[attr-defined]
