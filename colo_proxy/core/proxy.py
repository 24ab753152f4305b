"""The comparison proxy: frames and time in, released frames and requests out.

Theory of operation
-------------------
`feed` parses a frame, finds its flow and hands it to that flow's comparison
(tcp.py or datagram.py), which calls back `hold`, `release` and `diverge`.
Released primary frames accumulate until the driver takes them; so do
checkpoint requests and divergences.  Nothing here does I/O or reads a
clock: every method takes `now`.

Checkpoint states (rate limited, requests coalesced):

    IDLE --want--> REQUESTED --checkpoint_started--> RUNNING
      ^  \\--want, too soon--> DEFERRED --tick at due--> REQUESTED
      \\------------------ checkpoint_done (from any state) --------/

A checkpoint_done releases every held primary frame, drops secondary
output, and rebases every flow.  A divergence seen while RUNNING asks for
another checkpoint once this one is done (the snapshot predates it).

Frames that cannot be compared (not IP, malformed, ARP, NDP/MLD, IGMP, IP
datagrams whose fragments never complete) follow one rule: the primary's
are passed through at once, uncompared, and counted by reason; the
secondary's are dropped and counted.  That is QEMU's rule too; it loses
nothing the client would have received from an unprotected VM.
"""

from __future__ import annotations

import enum
import struct
from collections import Counter
from collections.abc import Sequence
from typing import cast

from colo_proxy.core.config import Config
from colo_proxy.core.datagram import DatagramFlow
from colo_proxy.core.events import (
    CheckpointReason,
    CheckpointRequest,
    Divergence,
    DivergenceKind,
    OverlapConflict,
    Side,
)
from colo_proxy.core.flows import FlowKey, HeldCounts, Rel, flow_label
from colo_proxy.core.fragments import FragKey, FragmentTable
from colo_proxy.core.packet import (
    ICMPV6_UNCOMPARED,
    IGMP,
    NDP_MLD,
    PASS_REASONS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_IGMP,
    PROTO_TCP,
    PROTO_UDP,
    IpPacket,
    TcpHeader,
    parse_ip,
    parse_tcp,
    parse_udp,
)
from colo_proxy.core.tcp import FAST_PROGRESS, TcpFlow

Flow = TcpFlow | DatagramFlow

_TIMEOUT_KINDS = (DivergenceKind.TIMEOUT, DivergenceKind.ACK)

# Ethernet type, IPv4 version/IHL, total length, flags/fragment, protocol,
# addresses and ports (12 bytes: the fast-path flow key), then TCP seq, ack, data
# offset, flags (for UDP the first word holds the length and checksum).
_FAST = struct.Struct("!12xHBxHxxHxBxx12sIIBB")


def _fast_key(key: FlowKey) -> bytes:
    """The raw IPv4 src/dst/sport/dport bytes of a flow, as the fast path sees them."""
    return key[2] + key[3] + key[4].to_bytes(2, "big") + key[5].to_bytes(2, "big")
MAX_DIVERGENCES_KEPT = 10000

SETTLE_FLOWS = 128
"""feed_many settles early once this many flows owe progress: a batch spread over
thousands of flows would otherwise revisit each flow's state after it left the CPU
caches (measured: 10k-flow mix, 1400-frame batches, 356k -> 490k frames/s when
settled every 128 frames), while a batch over a few flows keeps the whole saving."""


class CoreFault(Exception):
    """The core failed on frames[index] of a feed_many batch (a bug, never guest input).

    The frames before it were fed; the caller may log this one and go on
    with frames[index + 1:].  index -1: every frame was fed, and the failure
    came when the batch's flows were compared afterwards.
    """

    def __init__(self, index: int) -> None:
        super().__init__(f"core failed on frame {index} of the batch")
        self.index = index


class CheckpointState(enum.Enum):
    """Where the proxy is in its checkpoint cycle."""

    IDLE = "idle"
    DEFERRED = "deferred"
    REQUESTED = "requested"
    RUNNING = "running"


class Proxy:
    """The sans-IO comparison core.  One instance per primary/secondary pair."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = cfg = config or Config()
        self._flows: dict[FlowKey, Flow] = {}
        self._watch: dict[Flow, None] = {}
        """Flows that may hold or owe output: the scan checks their timeouts (see _scan)."""
        self._next_sweep = 0.0
        self._tcp4: dict[bytes, TcpFlow] = {}
        """Untagged IPv4 TCP flows by their raw address/port bytes, for the fast path."""
        self._udp4: dict[bytes, DatagramFlow] = {}
        """The same for UDP flows."""
        self._side_frames = [0, 0, 0]
        self._frags: tuple[FragmentTable[tuple[bytes, int]], FragmentTable[tuple[bytes, int]]] = (
            FragmentTable(cfg.max_fragments, cfg.max_fragment_bytes, cfg.fragment_timeout),
            FragmentTable(cfg.max_fragments, cfg.max_fragment_bytes, cfg.fragment_timeout),
        )
        self._released: list[tuple[bytes, int]] = []
        self._requests: list[CheckpointRequest] = []
        self._divergences: list[Divergence] = []
        self.overlap_conflicts: list[OverlapConflict] = []
        self.counters: Counter[str] = Counter()
        self.malformed: Counter[str] = Counter()
        self.uncompared: Counter[str] = Counter()
        self.divergence_kinds: Counter[str] = Counter()
        self.checkpoint_reasons: Counter[str] = Counter()
        self._held_frames = 0
        self._held_extra = 0
        """Frames held beyond one per unit: a reassembled datagram is one unit, n frames."""
        self._unit_extra = 0
        """Extra frames of the unit being dispatched (set around a reassembled datagram)."""
        self._evict_blocked = False
        """The last eviction scan found too little to evict: no new scan before the next
        sweep or checkpoint (each new flow would walk a table of holding flows)."""
        self._held_bytes = 0
        self._holding_flows = 0
        self._released_frames = 0
        self._released_payload = 0
        self.state = CheckpointState.IDLE
        self._deferred: tuple[CheckpointReason, float] | None = None
        self._again: CheckpointReason | None = None
        self._last_end = float("-inf")
        self._next_scan: float | None = None
        self._window = cfg.datagram_reorder_window
        self.max_sec_buffer = cfg.max_sec_buffer_bytes
        self.secondary_vote: str | None = None
        """The latest answer a flow found to what a checkpoint did to the secondary; kept
        across checkpoints (a real pair is reset by each, recordings never are)."""
        self._hold_limits = (
            cfg.max_hold_bytes, cfg.max_hold_frames, cfg.max_flow_hold_bytes, cfg.max_hold_flows,
        )

    # -- driver interface ----------------------------------------------------

    def feed(self, side: Side, data: bytes, now: float, offset: int = 0) -> None:
        """One frame from `side` at time `now`; data[offset:] is the Ethernet frame."""
        self.feed_many(side, ((data, offset),), now)

    def feed_many(self, side: Side, frames: Sequence[tuple[bytes, int]], now: float) -> None:
        """Frames from `side` that arrived together, as (data, offset) pairs.

        The loop is the hot path: untagged IPv4 TCP segments with ACK and no
        SYN/RST (FIN allowed), and UDP datagrams, on flows already known, are handled
        here with one struct unpack each; everything else takes the general
        path.  Each pair is kept by reference and handed back on release.
        """
        if self._next_scan is None:
            self._next_scan = now + self.config.scan_interval
        elif now >= self._next_scan or self._deferred is not None:
            self.tick(now)
        if side is Side.CLIENT:
            self._side_frames[2] += len(frames)
            return
        primary = side is Side.PRIMARY
        self._side_frames[side] += len(frames)
        unpack = _FAST.unpack_from
        tcp4, udp4, window, general = self._tcp4, self._udp4, self._window, self._feed_general
        dirty: dict[TcpFlow, None] = {}
        """Flows whose `progress` is owed: run once per flow when the batch ends."""
        watch = self._watch
        max_flow_bytes = self._hold_limits[2]
        held = held_bytes = holding = 0  # hold() inlined: totals added when the batch ends
        flow_over = False
        fault: Exception | None = None
        index = 0
        try:
            for index, frame in enumerate(frames):  # noqa: B007 - read by the except clause
                data, offset = frame
                flen = len(data) - offset
                if flen < 54:
                    general(primary, data, offset, frame, flen, now)
                    continue
                etype, vihl, total, frag, proto, key, seq, ack, doff, flags = unpack(data, offset)
                if etype != 0x0800 or vihl != 0x45 or frag & 0x3FFF or not 40 <= total <= flen - 14:
                    general(primary, data, offset, frame, flen, now)
                    continue
                if proto == PROTO_TCP:
                    tflow = tcp4.get(key)
                    start = offset + 34 + (doff >> 4) * 4
                    stop = offset + 14 + total
                    if (
                        tflow is not None and flags & 0x16 == 0x10 and doff >= 0x50
                        and start <= stop
                    ):
                        tflow.last_seen = now
                        if primary:
                            taken = tflow.fast_primary(
                                self, data, seq, ack, start, stop, frame, flen, now, flags & 1
                            )
                            if taken:
                                if not tflow.held_frames:
                                    holding += 1
                                    watch[tflow] = None
                                tflow.held_frames += 1
                                tflow.held_bytes += flen
                                held += 1
                                held_bytes += flen
                                if tflow.held_bytes > max_flow_bytes:
                                    flow_over = True
                        else:
                            taken = tflow.fast_secondary(
                                self, data, seq, ack, start, stop, now, flags & 1
                            )
                        if taken:
                            if taken == FAST_PROGRESS:
                                dirty[tflow] = None
                                if len(dirty) >= SETTLE_FLOWS:
                                    fault = self._settle(dirty, now) or fault
                            continue
                    elif flags & 0x07 == 0x02 and doff >= 0x50 and start <= stop:
                        # SYN or SYN-ACK (no FIN/RST) with a sane header: skip re-parsing
                        self._tcp4_syn(primary, data, key, tflow, seq, ack, flags, offset,
                                       start, stop, frame, flen, now)
                        continue
                elif proto == PROTO_UDP:
                    uflow = udp4.get(key)
                    ulen = seq >> 16  # the UDP length field sits where a TCP seq would be
                    if uflow is not None and 8 <= ulen <= total - 20:
                        uflow.last_seen = now
                        content = data[offset + 42 : offset + 34 + ulen]
                        if primary:
                            uflow.on_primary(self, content, frame, flen, now, window)
                        else:
                            uflow.on_secondary(self, content, now, window)
                        continue
                general(primary, data, offset, frame, flen, now)
        except Exception as err:  # a bug in the core: name the frame so the rest can go on
            if held:
                self._held_fast(held, held_bytes, holding, flow_over, now)
            self._settle(dirty, now)  # the frame's fault is the one to report
            raise CoreFault(index) from err
        if held:
            self._held_fast(held, held_bytes, holding, flow_over, now)
        if dirty:
            fault = self._settle(dirty, now) or fault
        if fault is not None:
            raise CoreFault(-1) from fault

    def _held_fast(
        self, frames: int, nbytes: int, flows: int, flow_over: bool, now: float
    ) -> None:
        """hold() for a batch's fast-path frames at once: totals, then the limits."""
        self._held_frames += frames
        self._held_bytes += nbytes
        self._holding_flows += flows
        max_bytes, max_frames, _, max_flows = self._hold_limits
        if (
            self._held_bytes > max_bytes or self._held_frames > max_frames or flow_over
            or self._holding_flows > max_flows
        ) and self.state is CheckpointState.IDLE:
            self.counters["hold_limit_hits"] += 1
            self.want_checkpoint(CheckpointReason.HOLD_LIMIT, now)

    def _tcp4_syn(
        self, primary: bool, data: bytes, raw: bytes, tflow: TcpFlow | None, seq: int, ack: int,
        flags: int, offset: int, start: int, stop: int, frame: tuple[bytes, int], flen: int,
        now: float,
    ) -> None:
        """An untagged IPv4 SYN or SYN-ACK that feed_many already validated.

        The same as the general path (_feed_general -> _dispatch), minus parsing the
        frame a second time: every new connection starts here.
        """
        if tflow is None:
            key: FlowKey = (PROTO_TCP, (), raw[:4], raw[4:8], int.from_bytes(raw[8:10], "big"),
                            int.from_bytes(raw[10:12], "big"))
            tflow = cast(TcpFlow, self._new_flow(key, now, None))
        tflow.last_seen = now
        hdr = TcpHeader(tflow.key[4], tflow.key[5], seq, ack, flags, offset + 54, start)
        if primary:
            tflow.on_primary(self, hdr, data, stop, frame, flen, now)
        else:
            tflow.on_secondary(self, hdr, data, stop, now)

    def _settle(self, dirty: dict[TcpFlow, None], now: float) -> Exception | None:
        """Compare and release on every flow the batch touched (diverged ones wait).

        Returns the first exception a flow raised (a core bug) instead of raising
        it, so the other flows and the rest of the batch still go on.
        """
        fault: Exception | None = None
        for flow in dirty:
            if not flow.diverged:
                try:
                    flow.progress(self, now)
                except Exception as err:  # one flow's bug must not stall the others
                    fault = fault or err
        dirty.clear()
        return fault

    def _feed_general(
        self, primary: bool, data: bytes, offset: int, frame: tuple[bytes, int], flen: int,
        now: float,
    ) -> None:
        ip = parse_ip(data, offset)
        if isinstance(ip, str):
            self._uncompared(primary, frame, flen, ip)
            return
        if ip.frag_id >= 0:
            self._fragment(primary, ip, data, offset, flen, now)
            return
        self._dispatch(primary, ip, data, ip.l4, ip.l4_end, frame, flen, now)

    def expire(self, now: float) -> None:
        """Check timeouts now, off the scan schedule (an offline driver at a timer's due time)."""
        self._scan(now)

    def tick(self, now: float) -> None:
        """Advance timers: rate-limited checkpoint requests, timeouts, expiry."""
        if self._deferred is not None and now >= self._deferred[1]:
            reason = self._deferred[0]
            self._deferred = None
            self.state = CheckpointState.IDLE
            self._emit(reason, now)
        if self._next_scan is not None and now >= self._next_scan:
            self._scan(now)

    def next_deadline(self) -> float | None:
        """When tick() next has work to do, or None when nothing is tracked."""
        times = []
        if self._deferred is not None:
            times.append(self._deferred[1])
        if self._next_scan is not None and (self._flows or any(len(t) for t in self._frags)):
            times.append(self._next_scan)
        return min(times) if times else None

    def deferred_due(self) -> float | None:
        """When a rate-limited checkpoint request falls due, if one waits."""
        return self._deferred[1] if self._deferred is not None else None

    def earliest_timer(self) -> float | None:
        """The earliest time a timeout or deferred request can fire (an O(flows) scan).

        Lets an offline driver skip idle stretches of virtual time instead of
        ticking through every scan interval; None when nothing is waiting.
        """
        if self._deferred is not None:
            return self._deferred[1]
        cfg = self.config
        times = []
        for flow in self._flows.values():
            if not flow.diverged:
                t = flow.due(cfg.compare_timeout)
                if t is not None:
                    times.append(t)
        for table in self._frags:
            t = table.oldest()
            if t is not None:
                times.append(t + cfg.fragment_timeout)
        return min(times) if times else None

    def take_released(self) -> list[tuple[bytes, int]]:
        """Primary frames safe to send to the client, as (data, offset), in order."""
        out, self._released = self._released, []
        return out

    def take_requests(self) -> list[CheckpointRequest]:
        """Checkpoint requests the driver must carry out."""
        out, self._requests = self._requests, []
        return out

    def take_divergences(self) -> list[Divergence]:
        """Divergences seen since the last call."""
        out, self._divergences = self._divergences, []
        return out

    def checkpoint_started(self, now: float) -> None:
        """The VMs stopped for a checkpoint (QMP STOP)."""
        self.state = CheckpointState.RUNNING
        self._deferred = None

    def checkpoint_done(self, now: float) -> None:
        """The checkpoint committed: release everything held, resynchronise flows.

        The state is IDLE before the flows go on, so a divergence they find at
        once (a secondary that goes on in its own state) asks for the next
        checkpoint under the rate limit.
        """
        again = self._again if self.state is CheckpointState.RUNNING else None
        self._again = None
        self._deferred = None
        self.counters["checkpoints_completed"] += 1
        self._evict_blocked = False
        self.state = CheckpointState.IDLE
        self._last_end = now
        grace = self.config.compare_timeout
        mode = self.config.secondary_after_checkpoint
        for flow in list(self._flows.values()):
            flow.after_checkpoint(self, now, grace, mode)
        for rel in self._frags[0].clear():
            self._pass(rel, "ip_fragment_incomplete_at_checkpoint")
        self.counters["secondary_fragments_dropped"] += len(self._frags[1].clear())
        if again is not None:
            self.want_checkpoint(again, now)

    def settle_undecided(self, now: float) -> None:
        """End of input: flows still undecided take the answer other flows found."""
        for flow in list(self._flows.values()):
            if isinstance(flow, TcpFlow):
                flow.adopt_vote(self, now)

    @property
    def released_frames(self) -> int:
        """Primary frames released so far (compared, passed through or flushed)."""
        return self._released_frames

    def held_frames(self) -> int:
        """Primary frames currently held back (fragments of incomplete datagrams too)."""
        return self._held_frames + self._held_extra + self._frags[0].held_rels

    def busy(self) -> bool:
        """Whether anything still waits: held output, unmatched input, a checkpoint."""
        if self.held_frames() or self.state is not CheckpointState.IDLE:
            return True
        return any(flow.pending() for flow in self._flows.values())

    def stats(self) -> dict[str, object]:
        """Counters for reports and metrics."""
        return {
            "primary_frames": self._side_frames[0],
            "secondary_frames": self._side_frames[1],
            "client_frames": self._side_frames[2],
            **self.counters,
            "released_frames": self._released_frames,
            "released_payload_bytes": self._released_payload,
            "held_frames": self.held_frames(),
            "held_bytes": self._held_bytes,
            "holding_flows": self._holding_flows,
            "flows": len(self._flows),
            "malformed": dict(self.malformed),
            "uncompared": dict(self.uncompared),
            "divergences_by_kind": dict(self.divergence_kinds),
            "checkpoints_requested_by_reason": dict(self.checkpoint_reasons),
            "checkpoint_state": self.state.value,
        }

    # -- FlowHost: called back by the flows ----------------------------------

    def hold(self, flow: HeldCounts, flen: int) -> None:
        """Account one more held primary frame; force a checkpoint past a limit."""
        if not flow.held_frames:
            self._holding_flows += 1
            self._watch[flow] = None  # type: ignore[index]
        flow.held_frames += 1
        flow.held_bytes += flen
        self._held_frames += 1
        self._held_extra += self._unit_extra
        self._held_bytes += flen
        max_bytes, max_frames, max_flow_bytes, max_flows = self._hold_limits
        if (
            self._held_bytes > max_bytes or self._held_frames > max_frames
            or flow.held_bytes > max_flow_bytes or self._holding_flows > max_flows
        ) and self.state is CheckpointState.IDLE:
            self.counters["hold_limit_hits"] += 1
            self.want_checkpoint(CheckpointReason.HOLD_LIMIT, flow.last_seen)

    def watch(self, flow: HeldCounts) -> None:
        """The flow now owes output (unmatched secondary data): check its timeout."""
        self._watch[flow] = None  # type: ignore[index]

    def release(self, flow: HeldCounts, rel: Rel, flen: int, payload: int) -> None:
        """A held unit may go to the client."""
        flow.held_frames -= 1
        flow.held_bytes -= flen
        if not flow.held_frames:
            self._holding_flows -= 1
        self._held_frames -= 1
        if type(rel) is not tuple:
            self._held_extra -= len(rel) - 1
        self._held_bytes -= flen
        self._released_payload += payload
        self.release_unheld(rel)

    def release_unheld(self, rel: Rel) -> None:
        """A primary unit that matched on arrival goes out without ever being held."""
        if type(rel) is tuple:
            self._released.append(rel)
            self._released_frames += 1
        else:
            self._released.extend(rel)  # type: ignore[arg-type]
            self._released_frames += len(rel)

    def release_run(self, flow: HeldCounts, run: list[list[object]]) -> None:
        """Held TCP queue entries that may go to the client, in order (one call per run)."""
        released = self._released
        frames = flen = payload = 0
        for e in run:
            rel = e[3]
            if type(rel) is tuple:
                released.append(rel)
                frames += 1
            else:
                released.extend(rel)  # type: ignore[arg-type]
                frames += len(rel)  # type: ignore[arg-type]
                self._held_extra -= len(rel) - 1  # type: ignore[arg-type]
            flen += e[7]  # type: ignore[operator]
            payload += e[6]  # type: ignore[operator]
        n = len(run)
        flow.held_frames -= n
        flow.held_bytes -= flen
        if not flow.held_frames:
            self._holding_flows -= 1
        self._held_frames -= n
        self._held_bytes -= flen
        self._released_frames += frames
        self._released_payload += payload

    def diverge(
        self, flow: HeldCounts, kind: DivergenceKind, offset: int | None,
        primary: bytes, secondary: bytes, now: float, detail: str = "",
    ) -> None:
        """Freeze the flow, record what differed, and ask for a checkpoint."""
        flow.diverged = True
        if offset is not None and offset < 0:  # a core bug: never report one
            self.counters["negative_offsets_clamped"] += 1
            offset = 0
        if isinstance(flow, TcpFlow) and flow.midstream:
            detail = "; ".join(filter(None, (detail, "picked up mid-stream: offsets count "
                                             "from the first byte each side was seen to send")))
        self.divergence_kinds[kind.value] += 1
        if len(self._divergences) < MAX_DIVERGENCES_KEPT:
            self._divergences.append(
                Divergence(now, flow_label(flow.key), kind, offset, primary, secondary, detail)
            )
        else:
            self.counters["divergences_not_kept"] += 1
        reason = CheckpointReason.TIMEOUT if kind in _TIMEOUT_KINDS else CheckpointReason.DIVERGENCE
        self.want_checkpoint(reason, now)

    def want_checkpoint(self, reason: CheckpointReason, now: float) -> None:
        """Ask for a checkpoint, honouring the rate limit and coalescing."""
        state = self.state
        if state is CheckpointState.RUNNING:
            if self._again is None:
                self._again = reason
            return
        if state is not CheckpointState.IDLE:
            self.counters["checkpoint_requests_coalesced"] += 1
            return
        due = self._last_end + self.config.min_checkpoint_interval
        if now >= due:
            self._emit(reason, now)
        else:
            self.counters["checkpoint_requests_rate_limited"] += 1
            self._deferred = (reason, due)
            self.state = CheckpointState.DEFERRED

    def overlap_conflict(
        self, flow: HeldCounts, side: str, offset: int | None, now: float
    ) -> None:
        """Record a within-side overlap whose bytes differ (kept: the first MAX)."""
        self.counters[f"tcp_overlap_conflicts_{side}"] += 1
        if len(self.overlap_conflicts) < MAX_DIVERGENCES_KEPT:
            self.overlap_conflicts.append(OverlapConflict(now, flow_label(flow.key), side, offset))

    def count(self, name: str, n: int = 1) -> None:
        """Bump a named counter (reported in stats)."""
        self.counters[name] += n

    # -- internals -----------------------------------------------------------

    def _emit(self, reason: CheckpointReason, now: float) -> None:
        self.state = CheckpointState.REQUESTED
        self.checkpoint_reasons[reason.value] += 1
        self._requests.append(CheckpointRequest(now, reason))

    def _pass(self, rel: tuple[bytes, int], reason: str) -> None:
        self.uncompared[reason] += 1
        self._released.append(rel)
        self._released_frames += 1

    def _uncompared(self, primary: bool, rel: tuple[bytes, int], flen: int, reason: str) -> None:
        if reason not in PASS_REASONS:
            self.malformed[reason] += 1
        if primary:
            self._pass(rel, reason)
        else:
            self.counters["secondary_frames_dropped_uncompared"] += 1
            if reason in PASS_REASONS:
                self.uncompared[reason] += 1

    def _fragment(
        self, primary: bool, ip: IpPacket, data: bytes, offset: int, flen: int, now: float
    ) -> None:
        key: FragKey = (ip.vlan, ip.version, ip.src, ip.dst, ip.proto, ip.frag_id)
        table = self._frags[0 if primary else 1]
        result = table.add(key, ip.frag_off, ip.more_frags, data[ip.l4 : ip.l4_end],
                           (data, offset), now)
        if result is None:
            return
        what, rels = result
        if isinstance(what, str):
            if what != "ip_fragment_of_given_up_datagram":
                self.malformed[what] += 1
            for rel in rels:
                self._uncompared(primary, rel, len(rel[0]) - rel[1], "ip_fragments_given_up")
            return
        self.counters["ip_datagrams_reassembled"] += 1
        total = sum(len(d) - o for d, o in rels)
        self._unit_extra = len(rels) - 1 if primary else 0
        try:
            self._dispatch(primary, ip, what, 0, len(what), rels, total, now)
        finally:
            self._unit_extra = 0

    def _dispatch(
        self, primary: bool, ip: IpPacket, buf: bytes, l4: int, end: int, rel: Rel, flen: int,
        now: float,
    ) -> None:
        proto = ip.proto
        if proto == PROTO_TCP:
            hdr = parse_tcp(buf, l4, end)
            if isinstance(hdr, str):
                self._bad_l4(primary, rel, hdr)
                return
            key: FlowKey = (proto, ip.vlan, ip.src, ip.dst, hdr.sport, hdr.dport)
            tflow = cast(TcpFlow, self._flow(key, now, None))
            if primary:
                tflow.on_primary(self, hdr, buf, end, rel, flen, now)
            else:
                tflow.on_secondary(self, hdr, buf, end, now)
            return
        if proto == PROTO_UDP:
            udp = parse_udp(buf, l4, end)
            if isinstance(udp, str):
                self._bad_l4(primary, rel, udp)
                return
            sport, dport, start, stop = udp
            key = (proto, ip.vlan, ip.src, ip.dst, sport, dport)
            content = buf[start:stop]
            kind = DivergenceKind.UDP
        elif proto in (PROTO_ICMP, PROTO_ICMPV6):
            if end - l4 < 4:
                self._bad_l4(primary, rel, "icmp_truncated")
                return
            if proto == PROTO_ICMPV6 and buf[l4] in ICMPV6_UNCOMPARED:
                self._bad_l4(primary, rel, NDP_MLD)
                return
            key = (proto, ip.vlan, ip.src, ip.dst, 0, 0)
            content = buf[l4 : l4 + 2] + buf[l4 + 4 : end]
            kind = DivergenceKind.ICMP
        elif proto == PROTO_IGMP:
            self._bad_l4(primary, rel, IGMP)
            return
        else:
            key = (proto, ip.vlan, ip.src, ip.dst, 0, 0)
            content = buf[l4:end]
            kind = DivergenceKind.OTHER
        gflow = cast(DatagramFlow, self._flow(key, now, kind))
        if primary:
            gflow.on_primary(self, content, rel, flen, now, self._window)
        else:
            gflow.on_secondary(self, content, now, self._window)

    def _bad_l4(self, primary: bool, rel: Rel, reason: str) -> None:
        rels = rel if isinstance(rel, list) else [rel]
        for one in rels:
            self._uncompared(primary, one, len(one[0]) - one[1], reason)

    def _flow(self, key: FlowKey, now: float, kind: DivergenceKind | None) -> Flow:
        """The flow for `key` (TCP when kind is None), created on first sight."""
        flow = self._flows.get(key)
        if flow is None:
            flow = self._new_flow(key, now, kind)
        flow.last_seen = now
        return flow

    def _new_flow(self, key: FlowKey, now: float, kind: DivergenceKind | None) -> Flow:
        if len(self._flows) >= self.config.max_flows:
            self._evict(now)
        flow: Flow
        fast = not key[1] and len(key[2]) == 4
        if kind is None:
            flow = TcpFlow(key, now)
            if fast:
                self._tcp4[_fast_key(key)] = flow
        else:
            flow = DatagramFlow(key, now, kind)
            if fast and key[0] == PROTO_UDP:
                self._udp4[_fast_key(key)] = flow
        self._flows[key] = flow
        self.counters["flows_created"] += 1
        return flow

    def _evict(self, now: float) -> None:
        """Make room by forgetting flows that hold nothing, oldest first.

        A scan that finds fewer than it wants blocks further scans until the next
        sweep or checkpoint: meanwhile new flows are created over the limit, counted
        (`flows_over_limit`), and each asks for a (rate-limited) checkpoint.
        """
        if self._evict_blocked:
            self.counters["flows_over_limit"] += 1
            self.want_checkpoint(CheckpointReason.FLOW_TABLE, now)
            return
        want = max(1, self.config.max_flows // 16)
        victims = []
        examined = 0
        for key, flow in self._flows.items():
            examined += 1
            if not flow.held_frames and not flow.pending():
                victims.append(key)
                if len(victims) >= want:
                    break
        self.counters["flow_evict_examined"] += examined
        for key in victims:
            self._forget(key)
        self.counters["flows_evicted"] += len(victims)
        if len(victims) < want:
            self._evict_blocked = True
        if not victims:
            self.counters["flow_table_full"] += 1
            self.want_checkpoint(CheckpointReason.FLOW_TABLE, now)

    def _forget(self, key: FlowKey) -> None:
        self._watch.pop(self._flows.pop(key), None)
        if not key[1] and len(key[2]) == 4:
            if key[0] == PROTO_TCP:
                self._tcp4.pop(_fast_key(key), None)
            elif key[0] == PROTO_UDP:
                self._udp4.pop(_fast_key(key), None)

    def _scan(self, now: float) -> None:
        """Timeouts every scan_interval; idle expiry in a slower sweep of every flow.

        Only watched flows are checked for timeouts: a flow is watched from the
        moment it holds a primary frame or keeps unmatched secondary output, and
        dropped once it owes nothing.  The sweep (every tenth of the shorter idle
        timeout, at least scan_interval) also re-watches any flow found owing
        output, so a missed hook would delay a timeout, never lose it.  An idle
        proxy with many flows thus costs O(watched) per scan, not O(flows).
        """
        cfg = self.config
        self._next_scan = now + cfg.scan_interval
        if now >= self._next_sweep:
            self._next_sweep = now + max(
                cfg.scan_interval, min(cfg.flow_idle_timeout, cfg.closed_flow_timeout) / 10
            )
            self._sweep(now)
        flows, watch = self._flows, self._watch
        timeout = cfg.compare_timeout
        for flow in list(watch):
            if (flow.held_frames or flow.pending()) and flows.get(flow.key) is flow:
                flow.expired(self, now, timeout)
            else:
                del watch[flow]
        for rel in self._frags[0].expire(now):
            self._pass(rel, "ip_fragments_timed_out")
        self.counters["secondary_fragments_dropped"] += len(self._frags[1].expire(now))

    def _sweep(self, now: float) -> None:
        """Forget idle flows that hold nothing; watch any flow that owes output."""
        cfg = self.config
        idle, closed_idle = cfg.flow_idle_timeout, cfg.closed_flow_timeout
        watch = self._watch
        stale = []
        for key, flow in self._flows.items():
            if flow.held_frames or flow.pending():
                watch[flow] = None
                continue
            limit = closed_idle if isinstance(flow, TcpFlow) and flow.closed else idle
            if now - flow.last_seen > limit:
                stale.append(key)
        for key in stale:
            self._forget(key)
        self.counters["flows_expired"] += len(stale)
        self._evict_blocked = False
