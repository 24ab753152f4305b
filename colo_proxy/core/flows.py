"""Flow keys and the small interface flows use to talk back to the proxy.

A flow is one direction of guest output: what the primary and the secondary
send with the same addresses, ports, protocol and VLAN tags.  Keys are plain
tuples so a dictionary lookup per frame is all it costs.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from colo_proxy.core.events import CheckpointReason, DivergenceKind
from colo_proxy.core.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, format_addr

if TYPE_CHECKING:
    from colo_proxy.core.held import HeldFrame

FlowKey = tuple[int, tuple[int, ...], bytes, bytes, int, int]
"""(protocol, VLAN tags, source address, destination address, source port, destination port)."""

Rel = tuple[bytes, int] | list[tuple[bytes, int]]
"""What is released for one held unit: a (frame, offset) pair, or several for a
fragmented datagram."""

_PROTO_NAMES = {PROTO_TCP: "TCP", PROTO_UDP: "UDP", PROTO_ICMP: "ICMP", PROTO_ICMPV6: "ICMPv6"}


def flow_label(key: FlowKey) -> str:
    """Readable name of a flow for reports, e.g. 'TCP 10.0.0.1:80 > 10.0.0.2:5555 vlan 10'."""
    proto, vlan, src, dst, sport, dport = key
    version = 4 if len(src) == 4 else 6
    name = _PROTO_NAMES.get(proto, f"IP proto {proto}")
    s, d = format_addr(version, src), format_addr(version, dst)
    if version == 6:
        s, d = f"[{s}]", f"[{d}]"
    if proto in (PROTO_TCP, PROTO_UDP):
        text = f"{name} {s}:{sport} > {d}:{dport}"
    else:
        text = f"{name} {s} > {d}"
    if vlan:
        text += " vlan " + ".".join(str(v) for v in vlan)
    return text


MODE_COMPARE: Final = 0
MODE_UNDECIDED: Final = 1
"""After a checkpoint in auto mode: waiting for the secondary's next segment."""
MODE_PASS: Final = 2
"""After a close divergence, the secondary going on: the primary's output passes."""
MODE_MC: Final = 3
"""Held until the next checkpoint, uncompared (an mc flow, the VM in MC, or a resync due)."""
MODE_PASSTHROUGH: Final = 4
"""Released at once, uncompared: the operator's explicit choice."""
MODE_NAMES: Final = ("compare", "compare", "passed_after_close", "mc", "passthrough")
"""MODE_* by number, as reports name them (an undecided flow counts as compare)."""

CLASS_COMPARE: Final = 0
CLASS_MC: Final = 1
CLASS_MASK: Final = 2
CLASS_PASSTHROUGH: Final = 3
CLASS_NAMES: Final = ("compare", "mc", "mask", "passthrough")
"""Flow classes by number, as rules.FLOW_MODES names them."""


class FlowHost:
    """What a flow needs from the proxy: hold and release accounting, verdicts.

    Proxy is the one implementation.  A base class, not a Protocol: compiled, a flow's
    calls back are then native (vtable) calls and its reads of these attributes struct
    loads, where through a Protocol each was a method or attribute lookup by name (a
    tenth of a short connection's instructions)."""

    max_sec_buffer: int
    """Secondary bytes (or datagram bytes) one flow may buffer unmatched."""
    secondary_vote: str | None
    """What a checkpoint did to the secondary, as the latest flow to tell found it."""
    fast_path: bool
    """Whether segments may take fast_primary/fast_secondary (off: the general path only)."""

    def hold(self, flow: HeldCounts, flen: int) -> None:
        raise NotImplementedError

    def release(self, flow: HeldCounts, rel: Rel, flen: int, payload: int) -> None:
        raise NotImplementedError

    def release_run(self, flow: HeldCounts, run: list[HeldFrame]) -> None:
        raise NotImplementedError

    def release_unheld(self, rel: Rel) -> None:
        raise NotImplementedError

    def waited(self, flow: HeldCounts, since: float, frames: int) -> None:
        """Output held since `since` goes out at a checkpoint (added latency)."""
        raise NotImplementedError

    def watch(self, flow: HeldCounts) -> None:
        raise NotImplementedError

    def diverge(
        self, flow: HeldCounts, kind: DivergenceKind, offset: int | None,
        primary: bytes, secondary: bytes, now: float, detail: str = "",
    ) -> None:
        raise NotImplementedError

    def want_checkpoint(self, reason: CheckpointReason, now: float) -> None:
        raise NotImplementedError

    def overlap_conflict(
        self, flow: HeldCounts, side: str, offset: int | None, now: float
    ) -> None:
        raise NotImplementedError

    def count(self, name: str, n: int = 1) -> None:
        raise NotImplementedError

    hold_all: bool
    """A resync is due and not yet allowed: hold every flow's output, compare nothing."""
    mc_period: float
    """How long MC-held output may wait before a checkpoint is asked for."""

    def flow_mode(self, flow: HeldCounts, now: float) -> int:
        """The mode the flow takes after a checkpoint (policy, VM mode, cool-downs)."""
        raise NotImplementedError

    def encrypted(self, flow: HeldCounts, what: str, now: float) -> int:
        """A flow was recognised as TLS/SSH: the mode it takes now."""
        raise NotImplementedError

    def classify(self, flow: HeldCounts, now: float) -> bool:
        """A new flow: set its class and mode; True when no TLS/SSH check is wanted."""
        raise NotImplementedError


class HeldCounts:
    """Per-flow counters the proxy maintains for limits and reports, and the flow's mode."""

    __slots__ = ("diverged", "held_bytes", "held_frames", "key", "klass", "last_seen", "masks",
                 "mode")

    def __init__(self, key: FlowKey, now: float) -> None:
        self.key = key
        self.held_frames = 0
        self.held_bytes = 0
        self.diverged = False
        self.last_seen = now
        self.mode = MODE_COMPARE
        """What the flow does now (MODE_*; any non-zero mode leaves the fast path)."""
        self.klass = CLASS_COMPARE
        """What the operator's rules (or the encrypted-flow default) made it (CLASS_*)."""
        self.masks: tuple[re.Pattern[bytes], ...] = ()
        """Noise fields blanked before comparison (mask flows only)."""
