"""Interfaces as netlink sees them: index, MTU, state, and offloads (pyroute2).

Why netlink: the bridge must know an interface's MTU and whether it is up
before it opens a ring there, and must notice when it goes down, comes back
or is re-created (a tap QEMU re-creates gets a new index).  ``IPRoute``
answers the first and its multicast groups deliver the second as events,
without hand-packed ioctls.

Offloads: a frame that the kernel coalesced (GRO/LRO) or that a sender
handed down unsegmented (TSO/GSO) is bigger than the wire carries; the proxy
can neither compare it segment by segment nor send it on.  :func:`offloads_on`
names the features that would produce such frames on an interface we read,
and :func:`turn_off` switches them off (``--fix-offloads``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from colo_proxy.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

IFF_UP = 0x1
IFF_RUNNING = 0x40

RX_COALESCING = ("rx-gro", "rx-lro", "rx-gro-hw", "rx-gro-list", "rx-udp-gro-forwarding")
"""Features of the interface we read that merge received frames into super-frames."""

TX_SEGMENTATION = (
    "tx-tcp-segmentation", "tx-tcp6-segmentation", "tx-tcp-ecn-segmentation",
    "tx-tcp-mangleid-segmentation", "tx-generic-segmentation", "tx-udp-segmentation",
    "tx-gso-list",
)
"""Features of a sender (a veth's peer) that hand its frames over unsegmented."""


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """One interface as netlink reported it."""

    name: str
    index: int
    mtu: int
    up: bool
    kind: str = ""
    peer_index: int = 0
    """A veth's peer, when it lives in this namespace (0 otherwise)."""


def _info(msg: object) -> LinkInfo:
    get = msg.get_attr  # type: ignore[attr-defined]
    link_info = get("IFLA_LINKINFO")
    kind = link_info.get_attr("IFLA_INFO_KIND") if link_info is not None else None
    peer = get("IFLA_LINK") or 0
    if get("IFLA_LINK_NETNSID") is not None:
        peer = 0
    flags = int(msg["flags"])  # type: ignore[index]
    return LinkInfo(
        name=str(get("IFLA_IFNAME")), index=int(msg["index"]),  # type: ignore[index]
        mtu=int(get("IFLA_MTU") or 0), up=bool(flags & IFF_UP), kind=str(kind or ""),
        peer_index=int(peer) if kind == "veth" else 0,
    )


def off_loop(func: Callable[[], T]) -> T:
    """Run a blocking pyroute2 call on a thread of its own.

    pyroute2's synchronous classes drive an asyncio loop of their own, which
    cannot run inside the proxy's running loop; on a thread it can.  These
    calls happen at start-up and when a link changes, never per frame.
    """
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(func).result()


def link_info(ifname: str) -> LinkInfo | None:
    """The interface named ``ifname`` now, or None when there is none."""
    return off_loop(lambda: _link_info(ifname))


def _link_info(ifname: str) -> LinkInfo | None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            msgs = ipr.link("get", ifname=ifname)
        except NetlinkError:
            return None
        return _info(msgs[0]) if msgs else None


def _link_name(index: int) -> str | None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            msgs = ipr.link("get", index=index)
        except NetlinkError:
            return None
        return str(msgs[0].get_attr("IFLA_IFNAME")) if msgs else None


def offloads_on(info: LinkInfo) -> list[tuple[str, str]]:
    """(interface, feature) pairs that would hand the proxy super-frames; [] when none."""
    return off_loop(lambda: _offloads_on(info))


def _offloads_on(info: LinkInfo) -> list[tuple[str, str]]:
    """Checks the interface's own receive coalescing and, for a veth whose peer
    is in this namespace, the peer's segmentation offloads.  (A veth peer in
    another namespace or a guest behind a tap is out of reach: its super-frames
    are still caught as they arrive, counted and logged with the fix.)
    """
    found = [(info.name, f) for f in _enabled(info.name, RX_COALESCING)]
    if info.peer_index:
        peer = _link_name(info.peer_index)
        if peer is not None:
            found += [(peer, f) for f in _enabled(peer, TX_SEGMENTATION)]
    return found


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


def turn_off(found: list[tuple[str, str]]) -> None:
    """Switch the given features off; ConfigError when the kernel refuses one."""
    off_loop(lambda: _turn_off(found))


def _turn_off(found: list[tuple[str, str]]) -> None:
    from pyroute2.ethtool import Ethtool

    by_if: dict[str, set[str]] = {}
    for ifname, feature in found:
        by_if.setdefault(ifname, set()).add(feature)
    ethtool = Ethtool()
    try:
        for ifname, names in by_if.items():
            features = ethtool.get_features(ifname)
            for name in names:
                features.features[name].enable = False
            ethtool.set_features(ifname, features)
            still = _enabled(ifname, names)
            if still:
                raise ConfigError(f"{ifname}: the kernel kept {', '.join(still)} on")
            log.warning("--fix-offloads: turned off %s on %s", ", ".join(sorted(names)), ifname)
    finally:
        ethtool.close()
