"""The flow table: every flow by key, the fast path's indexes, the watch list, expiry.

Untagged IPv4 TCP and UDP flows are also indexed by their raw address/port
bytes, so feed_many finds them with one dictionary lookup on bytes it
unpacked anyway.  The watch list holds the flows that may hold or owe
output: the proxy's scan checks only those for timeouts (see owing).

Two caps on new flows.  ``max_flows`` is soft: past it idle flows that hold
nothing are evicted, and if none can be (every flow holds output while
checkpoints do not complete) new flows are still created, counted
(``flows_over_limit``), and a checkpoint is asked for.  The hard cap
(``hard_flows`` entries, or ``hard_held_bytes`` of held primary output) is where
that stops: a new flow is not admitted (``flows_refused``) and its frames are
dropped and counted (``admission_refused_*``), while the checkpoint stays asked
for.  Dropping, not passing uncompared, because passing would release output no
secondary vouched for (a failover would lose those connections, and a flood of
new flows would switch protection off); a dropped SYN-ACK or datagram is a lost
packet the guests and clients retransmit, admitted once a checkpoint frees the
table, and flows already tracked are served throughout.  Memory thus stays
bounded by the hard cap whatever arrives (about 2 KiB per held flow measured).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import final

from colo_proxy.core.config import Config
from colo_proxy.core.datagram import DatagramFlow
from colo_proxy.core.events import DivergenceKind
from colo_proxy.core.flows import FlowKey, HeldCounts
from colo_proxy.core.packet import PROTO_TCP, PROTO_UDP
from colo_proxy.core.tcp import TcpFlow

Flow = TcpFlow | DatagramFlow

HARD_FLOWS_FACTOR = 4
"""max_flows_hard 0 (the default): the hard cap on flow-table entries is this multiple of
max_flows (262,144 by default: about 512 MiB of held flows)."""
HARD_HELD_FACTOR = 4
"""max_hold_bytes_hard 0 (the default): new flows are refused past this multiple of
max_hold_bytes held (256 MiB by default)."""


def fast_key(key: FlowKey) -> bytes:
    """The raw IPv4 src/dst/sport/dport bytes of a flow, as the fast path sees them."""
    return key[2] + key[3] + key[4].to_bytes(2, "big") + key[5].to_bytes(2, "big")


@final
class FlowTable:
    """Flows by key, fast indexes, the watch list; eviction and idle expiry."""

    __slots__ = ("config", "counters", "evict_blocked", "flows", "hard_flows", "hard_held_bytes",
                 "next_sweep", "tcp4", "udp4", "watch")

    def __init__(self, config: Config, counters: Counter[str]) -> None:
        self.config = config
        self.counters = counters
        self.flows: dict[FlowKey, Flow] = {}
        self.tcp4: dict[bytes, TcpFlow] = {}
        """Untagged IPv4 TCP flows by their raw address/port bytes, for the fast path."""
        self.udp4: dict[bytes, DatagramFlow] = {}
        """The same for UDP flows."""
        self.watch: dict[HeldCounts, None] = {}
        """Flows that may hold or owe output: the scan checks their timeouts."""
        self.next_sweep = 0.0
        self.evict_blocked = False
        """The last eviction scan found too little to evict: no new scan before the next
        sweep or checkpoint (each new flow would walk a table of holding flows)."""
        self.hard_flows = config.max_flows_hard or max(config.max_flows, 1) * HARD_FLOWS_FACTOR
        """No new flow beyond this many entries (see the module docstring)."""
        self.hard_held_bytes = (
            config.max_hold_bytes_hard or max(config.max_hold_bytes, 1) * HARD_HELD_FACTOR
        )
        """No new flow while this many primary bytes are held."""

    def __len__(self) -> int:
        return len(self.flows)

    def full(self) -> bool:
        return len(self.flows) >= self.config.max_flows

    def admit(self, held_bytes: int) -> bool:
        """Room for one more flow?  Past max_flows evict idle ones; False past the hard cap.

        The caller asks for a checkpoint whenever the table is still full after this.
        """
        if held_bytes >= self.hard_held_bytes:
            self.counters["flows_refused"] += 1
            return False
        if len(self.flows) >= self.config.max_flows and self.evict():
            return True
        if len(self.flows) >= self.hard_flows:
            self.counters["flows_refused"] += 1
            return False
        if len(self.flows) >= self.config.max_flows:
            self.counters["flows_over_limit"] += 1
        return True

    def new_tcp(self, key: FlowKey, now: float, raw: bytes | None = None) -> TcpFlow:
        """A new TCP flow (the caller made room first: see full and evict).

        raw: fast_key(key), when the caller read it from the frame already."""
        flow = TcpFlow(key, now)
        if not key[1] and len(key[2]) == 4:
            self.tcp4[raw if raw is not None else fast_key(key)] = flow
        self.flows[key] = flow
        self.counters["flows_created"] += 1
        return flow

    def new_datagram(self, key: FlowKey, now: float, kind: DivergenceKind) -> DatagramFlow:
        """A new UDP, ICMP or other-protocol flow (room made as for new_tcp)."""
        flow = DatagramFlow(key, now, kind)
        if not key[1] and len(key[2]) == 4 and key[0] == PROTO_UDP:
            self.udp4[fast_key(key)] = flow
        self.flows[key] = flow
        self.counters["flows_created"] += 1
        return flow

    def evict(self) -> bool:
        """Make room by forgetting flows that hold nothing, oldest first; False if none went.

        A scan that finds fewer than it wants blocks further scans until the next
        sweep or checkpoint: meanwhile new flows are created over the limit (up to the
        hard cap, see admit), and each asks for a (rate-limited) checkpoint.
        """
        if self.evict_blocked:
            return False
        want = max(1, self.config.max_flows // 16)
        victims = []
        examined = 0
        for key, flow in self.flows.items():
            examined += 1
            if not flow.held_frames and not flow.pending():
                victims.append(key)
                if len(victims) >= want:
                    break
        self.counters["flow_evict_examined"] += examined
        for key in victims:
            self.forget(key)
        self.counters["flows_evicted"] += len(victims)
        if len(victims) < want:
            self.evict_blocked = True
        if not victims:
            self.counters["flow_table_full"] += 1
        return bool(victims)

    def forget(self, key: FlowKey) -> None:
        self.watch.pop(self.flows.pop(key), None)
        if not key[1] and len(key[2]) == 4:
            if key[0] == PROTO_TCP:
                self.tcp4.pop(fast_key(key), None)
            elif key[0] == PROTO_UDP:
                self.udp4.pop(fast_key(key), None)

    def owing(self) -> Iterator[Flow]:
        """Watched flows that still hold or owe output; the others leave the watch list."""
        flows, watch = self.flows, self.watch
        for flow in list(watch):
            live = flows.get(flow.key)
            if live is flow and (live.held_frames or live.pending()):
                yield live
            else:
                del watch[flow]

    def sweep_due(self, now: float) -> bool:
        """Whether the slower idle sweep is due (every tenth of the shorter idle timeout)."""
        if now < self.next_sweep:
            return False
        cfg = self.config
        self.next_sweep = now + max(
            cfg.scan_interval, min(cfg.flow_idle_timeout, cfg.closed_flow_timeout) / 10
        )
        return True

    def sweep(self, now: float) -> None:
        """Forget idle flows that hold nothing; watch any flow that owes output."""
        cfg = self.config
        idle, closed_idle = cfg.flow_idle_timeout, cfg.closed_flow_timeout
        watch = self.watch
        stale = []
        for key, flow in self.flows.items():
            if flow.held_frames or flow.pending():
                watch[flow] = None
                continue
            limit = closed_idle if isinstance(flow, TcpFlow) and flow.closed else idle
            if now - flow.last_seen > limit:
                stale.append(key)
        for key in stale:
            self.forget(key)
        self.counters["flows_expired"] += len(stale)
        self.evict_blocked = False
