"""The comparison proxy: frames and time in, released frames and requests out.

Theory of operation
-------------------
`feed` parses a frame, finds its flow and hands it to that flow's comparison
(tcp.py or datagram.py), which calls back `hold`, `release` and `diverge`.
Released primary frames accumulate until the driver takes them; so do
checkpoint requests and divergences.  Nothing here does I/O or reads a
clock: every method takes `now`.

The proxy owns the inline fast path and the timers; one object owns each other
concern: the FlowTable (flowtable.py) the flows and their indexes, the
HoldLedger (ledger.py) held and released output and its counters, the
CheckpointPolicy (checkpoint.py) the checkpoint cycle, a transition table.
A checkpoint_done releases every held primary frame, drops secondary
output, and rebases every flow.

Frames the inline fast path does not take go down the general path
(general.py), which also owns the rule for frames that cannot be compared.

The hybrid policy (policy.py) decides each flow's mode (compare, mc, mask,
passthrough) and the whole VM's (colo or mc); modes change at checkpoints.
While a resync is due but the rate limit holds it back (`hold_all`), no
flow compares: all primary output is held until the checkpoint and the
secondary's is dropped, and drivers stop feeding the secondary its input
(`secondary_paused`, the early notice).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Final

from colo_proxy.core.checkpoint import CheckpointPolicy, CheckpointState
from colo_proxy.core.config import Config
from colo_proxy.core.events import (
    CheckpointReason,
    CoreOutput,
    DivergenceKind,
    ModeSwitch,
    Side,
)
from colo_proxy.core.fastparse import (
    _FAST,
    ETH_IPV4,
    FAST_TCP_MASK,
    INTERPRETED,
    IP_FRAGMENT_MASK,
    IPV4_NO_OPTIONS,
    KEY_LEN,
    MIN_FAST_FRAME,
    NEVER_FAST,
    OFF_ACK,
    OFF_DOFF,
    OFF_ETYPE,
    OFF_FLAGS,
    OFF_FRAG,
    OFF_KEY,
    OFF_PROTO,
    OFF_SEQ,
    OFF_TOTAL,
    OFF_VIHL,
    SYN_MASK,
    _u32,
)
from colo_proxy.core.flows import CLASS_NAMES, MODE_MC, MODE_NAMES, FlowHost, HeldCounts, Rel
from colo_proxy.core.flowtable import FlowTable
from colo_proxy.core.general import GeneralPath
from colo_proxy.core.held import HeldFrame
from colo_proxy.core.ledger import HoldLedger
from colo_proxy.core.packet import (
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_SYN,
)
from colo_proxy.core.policy import RESYNC_REASONS, FlowPolicy, VmPolicy
from colo_proxy.core.tcp import FAST_PROGRESS, TcpFlow
from colo_proxy.core.verdicts import DivergenceLog

__all__ = ["CheckpointState", "CoreFault", "Proxy"]

SETTLE_FLOWS: Final = 128
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

    def __init__(self, index: int, cause: BaseException | None = None) -> None:
        super().__init__(f"core failed on frame {index} of the batch")
        self.index = index
        self.cause = cause
        """The exception the core raised (also __cause__: `raise ... from` is not
        kept by mypyc-compiled code, so it is set here for both builds)."""
        self.__cause__ = cause


class Proxy(FlowHost):
    """The sans-IO comparison core.  One instance per primary/secondary pair."""

    def __init__(self, config: Config | None = None, fast_path: bool = True) -> None:
        self.config = cfg = config or Config()
        self.fast_path = fast_path
        """False: every frame takes the general path (parse, dispatch, on_primary/
        on_secondary), never feed_many's inline parse nor fast_primary/fast_secondary;
        the tests run both ways so the two paths cannot drift apart."""
        self.counters: Counter[str] = Counter()
        self.table = FlowTable(cfg, self.counters)
        self.ledger = HoldLedger(cfg, self.table.watch)
        self.switches: list[ModeSwitch] = []
        """Mode switches the driver has not taken yet."""
        self.switch_log: list[ModeSwitch] = []
        """Every switch so far (reports)."""
        self.flow_policy = FlowPolicy(cfg, self.counters, self.switches)
        self.vm = VmPolicy(cfg, self.counters, self.switches)
        self.checkpoints = CheckpointPolicy(cfg.min_checkpoint_interval, self.counters,
                                            cfg.checkpoint_burst, self.vm.requested)
        self.hold_all = False
        """A resync is due and the rate limit holds it back: every flow holds, none compares."""
        self.mc_period = cfg.mc_period
        self.early_notice = cfg.policy != "colo"
        self._now = 0.0
        self._side_frames = [0, 0, 0]
        self.general = GeneralPath(self, cfg, self.table, self.ledger, self.counters)
        self.verdicts = DivergenceLog(self.counters)
        self.overlap_conflicts = self.verdicts.overlap_conflicts
        self.malformed = self.general.malformed
        self.uncompared = self.general.uncompared
        self.divergence_kinds = self.verdicts.kinds
        self._next_scan: float | None = None
        self._window = cfg.datagram_reorder_window
        self.max_sec_buffer = cfg.max_sec_buffer_bytes
        self.secondary_vote: str | None = None
        """The latest answer a flow found to what a checkpoint did to the secondary; kept
        across checkpoints (a real pair is reset by each, recordings never are)."""

    @property
    def state(self) -> CheckpointState:
        """Where the checkpoint cycle is (see checkpoint.py)."""
        return self.checkpoints.state

    # -- driver interface ----------------------------------------------------

    def feed(self, side: Side, data: bytes, now: float, offset: int = 0) -> None:
        """One frame from `side` at time `now`; data[offset:] is the Ethernet frame."""
        self.feed_many(side, ((data, offset),), now)

    def feed_many(self, side: Side, frames: Sequence[tuple[bytes, int]], now: float) -> None:
        """Frames from `side` that arrived together, as (data, offset) pairs.

        The loop is the hot path: untagged IPv4 TCP segments with ACK and no
        SYN/RST (FIN allowed), and UDP datagrams, on flows already known, are handled
        here, reading the header fields once; everything else takes the general
        path.  Each pair is kept by reference and handed back on release.
        """
        self._now = self.ledger.now = now
        if self._next_scan is None:
            self._next_scan = now + self.config.scan_interval
            self.vm.start(now)
        elif now >= self._next_scan or self.checkpoints.deferred is not None:
            self.tick(now)
        if side is Side.CLIENT:
            self._side_frames[2] += len(frames)
            return
        primary = side is Side.PRIMARY
        self._side_frames[side] += len(frames)
        table = self.table
        tcp4, udp4, window, general = table.tcp4, table.udp4, self._window, self.general.feed
        dirty: dict[TcpFlow, None] = {}
        """Flows whose `progress` is owed: run once per flow when the batch ends."""
        watch = table.watch
        max_flow_bytes = self.ledger.max_flow_bytes
        min_fast = MIN_FAST_FRAME if self.fast_path and not self.hold_all else NEVER_FAST
        unpack = _FAST.unpack_from
        etype: int
        vihl: int
        total: int
        frag: int
        proto: int
        key: bytes
        seq: int
        ack: int
        doff: int
        flags: int
        held = held_bytes = holding = 0  # hold() inlined: totals added when the batch ends
        flow_over = False
        fault: Exception | None = None
        index = 0
        try:
            for index, frame in enumerate(frames):  # noqa: B007 - read by the except clause
                data, offset = frame
                flen = len(data) - offset
                if flen < min_fast:
                    general(primary, data, offset, frame, flen, now)
                    continue
                # the fields of fastparse.FAST_FIELDS (see there for why two ways)
                if INTERPRETED:
                    etype, vihl, total, frag, proto, key, seq, ack, doff, flags = unpack(
                        data, offset
                    )
                else:
                    etype = data[offset + OFF_ETYPE] << 8 | data[offset + OFF_ETYPE + 1]
                    vihl = data[offset + OFF_VIHL]
                    total = data[offset + OFF_TOTAL] << 8 | data[offset + OFF_TOTAL + 1]
                    frag = data[offset + OFF_FRAG] << 8 | data[offset + OFF_FRAG + 1]
                    proto = data[offset + OFF_PROTO]
                    key = data[offset + OFF_KEY : offset + OFF_KEY + KEY_LEN]
                    seq = _u32(data, offset + OFF_SEQ)
                    ack = _u32(data, offset + OFF_ACK)
                    doff = data[offset + OFF_DOFF]
                    flags = data[offset + OFF_FLAGS]
                if (
                    etype != ETH_IPV4 or vihl != IPV4_NO_OPTIONS or frag & IP_FRAGMENT_MASK
                    or not 40 <= total <= flen - 14
                ):
                    general(primary, data, offset, frame, flen, now)
                    continue
                if proto == PROTO_TCP:
                    tflow = tcp4.get(key)
                    start = offset + 34 + (doff >> 4) * 4
                    stop = offset + 14 + total
                    if (
                        tflow is not None and flags & FAST_TCP_MASK == TCP_ACK and doff >= 0x50
                        and start <= stop
                    ):
                        tflow.last_seen = now
                        if primary:
                            taken = tflow.fast_primary(
                                self, data, seq, ack, start, stop, frame, flen, now,
                                flags & TCP_FIN,
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
                                self, data, seq, ack, start, stop, now, flags & TCP_FIN
                            )
                        if taken:
                            if taken == FAST_PROGRESS:
                                dirty[tflow] = None
                                if len(dirty) >= SETTLE_FLOWS:
                                    fault = self._settle(dirty, now) or fault
                            continue
                    elif flags & SYN_MASK == TCP_SYN and doff >= 0x50 and start <= stop:
                        # SYN or SYN-ACK (no FIN/RST) with a sane header: skip re-parsing
                        self.general.tcp4_syn(primary, data, key, tflow, seq, ack, flags, offset,
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
            raise CoreFault(index, err) from err
        if held:
            self._held_fast(held, held_bytes, holding, flow_over, now)
        if dirty:
            fault = self._settle(dirty, now) or fault
        if fault is not None:
            raise CoreFault(-1, fault) from fault

    def _held_fast(
        self, frames: int, nbytes: int, flows: int, flow_over: bool, now: float
    ) -> None:
        """hold() for a batch's fast-path frames at once: totals, then the limits."""
        if (
            self.ledger.held_batch(frames, nbytes, flows, flow_over)
            and self.checkpoints.state is CheckpointState.IDLE
        ):
            self.counters["hold_limit_hits"] += 1
            self.want_checkpoint(CheckpointReason.HOLD_LIMIT, now)

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

    def expire(self, now: float) -> None:
        """Check timeouts now, off the scan schedule (an offline driver at a timer's due time)."""
        self._scan(now)

    def tick(self, now: float) -> None:
        """Advance timers: rate-limited checkpoint requests, timeouts, expiry."""
        self._now = self.ledger.now = now
        self.checkpoints.tick(now)
        if self._next_scan is not None and now >= self._next_scan:
            self._scan(now)

    def next_deadline(self) -> float | None:
        """When tick() next has work to do, or None when nothing is tracked."""
        times = []
        deferred = self.checkpoints.deferred
        if deferred is not None:
            times.append(deferred[1])
        if self._next_scan is not None and (len(self.table) or self.general.fragments_waiting()):
            times.append(self._next_scan)
        return min(times) if times else None

    def deferred_due(self) -> float | None:
        """When a rate-limited checkpoint request falls due, if one waits."""
        deferred = self.checkpoints.deferred
        return deferred[1] if deferred is not None else None

    def earliest_timer(self) -> float | None:
        """The earliest time a timeout or deferred request can fire (an O(flows) scan).

        Lets an offline driver skip idle stretches of virtual time instead of
        ticking through every scan interval; None when nothing is waiting.
        """
        deferred = self.checkpoints.deferred
        if deferred is not None:
            return deferred[1]
        cfg = self.config
        times = []
        for flow in self.table.flows.values():
            if not flow.diverged:
                t = flow.due(cfg.mc_period if flow.mode == MODE_MC else cfg.compare_timeout)
                if t is not None:
                    times.append(t)
        oldest = self.general.oldest_fragment()
        if oldest is not None:
            times.append(oldest + cfg.fragment_timeout)
        return min(times) if times else None

    def take_output(self) -> CoreOutput:
        """Drain what the core produced: released frames, checkpoint requests, divergences.

        The one way drivers (live host, replay, test harness) collect output.
        """
        switches: list[ModeSwitch] = []
        if self.switches:  # rare: no copy on the batches without one
            switches = self.switches[:]
            self.switches.clear()  # the policies keep a reference to this list
            self.switch_log.extend(switches)
        return CoreOutput(self.ledger.take(), self.checkpoints.take(), self.verdicts.take(),
                          switches)

    @property
    def secondary_paused(self) -> bool:
        """The early notice: until the checkpoint the secondary's input may be withheld and
        its output dropped (its state is about to be replaced)."""
        return self.hold_all

    def observe_dirty_rate(self, mb_per_s: float) -> None:
        """QEMU's measured dirty-page rate (calc-dirty-rate), a signal for the VM's mode."""
        self.vm.dirty_rate = mb_per_s

    def checkpoint_started(self, now: float) -> None:
        """The VMs stopped for a checkpoint (QMP STOP)."""
        self.checkpoints.started()

    def checkpoint_done(self, now: float) -> None:
        """The checkpoint committed: release everything held, resynchronise flows.

        The state is IDLE before the flows go on, so a divergence they find at
        once (a secondary that goes on in its own state) asks for the next
        checkpoint under the rate limit.
        """
        self._now = self.ledger.now = now
        again = self.checkpoints.done(now)
        self.hold_all = False
        ledger = self.ledger
        self.vm.decide(now, self._side_frames[0], self.counters["frames_held_mc"],
                       ledger.latency_sum, ledger.released_frames)
        self.table.evict_blocked = False
        grace = self.config.compare_timeout
        mode = self.config.secondary_after_checkpoint
        for flow in list(self.table.flows.values()):
            flow.after_checkpoint(self, now, grace, mode)
        self.general.clear_fragments()
        if again is not None:
            self.want_checkpoint(again, now)

    def settle_undecided(self, now: float) -> None:
        """End of input: flows still undecided take the answer other flows found."""
        for flow in list(self.table.flows.values()):
            if isinstance(flow, TcpFlow):
                flow.adopt_vote(self, now)

    @property
    def released_frames(self) -> int:
        """Primary frames released so far (compared, passed through or flushed)."""
        return self.ledger.released_frames

    def held_frames(self) -> int:
        """Primary frames currently held back (fragments of incomplete datagrams too)."""
        ledger = self.ledger
        return ledger.held_frames + ledger.held_extra + self.general.fragment_frames_held()

    def busy(self) -> bool:
        """Whether anything still waits: held output, unmatched input, a checkpoint."""
        if self.held_frames() or self.checkpoints.state is not CheckpointState.IDLE:
            return True
        return any(flow.pending() for flow in self.table.flows.values())

    def stats(self) -> dict[str, object]:
        """Counters for reports and metrics."""
        ledger = self.ledger
        return {
            "primary_frames": self._side_frames[0],
            "secondary_frames": self._side_frames[1],
            "client_frames": self._side_frames[2],
            **self.counters,
            "released_frames": ledger.released_frames,
            "released_payload_bytes": ledger.released_payload,
            "held_frames": self.held_frames(),
            "held_bytes": ledger.held_bytes,
            "holding_flows": ledger.holding_flows,
            "flows": len(self.table),
            "malformed": dict(self.malformed),
            "uncompared": dict(self.uncompared),
            "divergences_by_kind": dict(self.divergence_kinds),
            "checkpoints_requested_by_reason": dict(self.checkpoints.reasons),
            "checkpoint_state": self.checkpoints.state.value,
            "policy": self.policy_report(),
        }

    def policy_report(self) -> dict[str, object]:
        """The hybrid policy's state and figures (reports, metrics)."""
        vm = self.vm
        vm.account(self._now)
        ledger = self.ledger
        by_mode: Counter[str] = Counter()
        for flow in self.table.flows.values():
            by_mode[MODE_NAMES[flow.mode]] += 1
        return {
            "vm_mode": vm.mode,
            "forced": vm.forced,
            "mode_time": dict(vm.time_in),
            "switches": len(self.switch_log) + len(self.switches),
            "flows_by_class": {name: self.counters["flows_" + name] for name in CLASS_NAMES},
            "flows_by_mode": dict(by_mode),
            "tls_flows": self.counters["flows_tls"],
            "ssh_flows": self.counters["flows_ssh"],
            "masked_bytes": self.counters["masked_bytes"],
            "frames_held_mc": self.counters["frames_held_mc"],
            "frames_passthrough": self.counters["frames_passthrough"],
            "early_notices": self.counters["early_notices"],
            "dirty_rate": vm.dirty_rate,
            "services_cooling": self.flow_policy.cooling_services(self._now),
            "mean_added_latency": (  # waits for checkpoints, over all released output
                ledger.latency_sum / ledger.released_frames if ledger.released_frames else 0.0
            ),
            "checkpoint_wait_by_class": {  # frames released by checkpoints, by class
                CLASS_NAMES[k]: {"frames": int(n), "mean": total / n, "max": top}
                for k, (total, n, top) in enumerate(ledger.class_latency) if n
            },
        }

    # -- FlowHost: called back by the flows ----------------------------------

    def hold(self, flow: HeldCounts, flen: int) -> None:
        """Account one more held primary frame; force a checkpoint past a limit."""
        if self.ledger.hold(flow, flen) and self.checkpoints.state is CheckpointState.IDLE:
            self.counters["hold_limit_hits"] += 1
            self.want_checkpoint(CheckpointReason.HOLD_LIMIT, flow.last_seen)

    def watch(self, flow: HeldCounts) -> None:
        """The flow now owes output (unmatched secondary data): check its timeout."""
        self.table.watch[flow] = None

    def release(self, flow: HeldCounts, rel: Rel, flen: int, payload: int) -> None:
        """A held unit may go to the client."""
        self.ledger.release(flow, rel, flen, payload)

    def waited(self, flow: HeldCounts, since: float, frames: int) -> None:
        """Output held since `since` goes out at a checkpoint (the added latency signal)."""
        self.ledger.waited(flow, since, frames)

    def release_unheld(self, rel: Rel) -> None:
        """A primary unit that matched on arrival goes out without ever being held."""
        self.ledger.release_unheld(rel)

    def release_run(self, flow: HeldCounts, run: list[HeldFrame]) -> None:
        """Held TCP queue entries that may go to the client, in order (one call per run)."""
        self.ledger.release_run(flow, run)

    def diverge(
        self, flow: HeldCounts, kind: DivergenceKind, offset: int | None,
        primary: bytes, secondary: bytes, now: float, detail: str = "",
    ) -> None:
        """Freeze the flow, record what differed, and ask for a checkpoint."""
        flow.diverged = True
        self.flow_policy.diverged(flow.key, now)
        midstream = isinstance(flow, TcpFlow) and flow.midstream
        reason = self.verdicts.divergence(flow.key, kind, offset, primary, secondary, now, detail,
                                          midstream)
        self.want_checkpoint(reason, now)

    def want_checkpoint(self, reason: CheckpointReason, now: float) -> None:
        """Ask for a checkpoint, honouring the rate limit and coalescing.

        A resync the rate limit holds back starts the early notice (hold_all).
        """
        checkpoints = self.checkpoints
        checkpoints.want(reason, now)
        if (
            reason in RESYNC_REASONS and not self.hold_all and self.early_notice
            and checkpoints.state is CheckpointState.DEFERRED
        ):
            self.hold_all = True
            self.counters["early_notices"] += 1

    def classify(self, flow: HeldCounts, now: float) -> bool:
        """A new flow: its class from the rules, its mode from the policy.

        Returns whether a rule decided it (else a TCP flow is watched for TLS/SSH).
        """
        explicit = self.flow_policy.classify(flow)
        flow.mode = self.flow_mode(flow, now)
        return explicit or not self.flow_policy.sniffs()

    def flow_mode(self, flow: HeldCounts, now: float) -> int:
        """The mode a flow runs in after a checkpoint."""
        return self.flow_policy.mode_of(flow, now, self.vm.mc)

    def encrypted(self, flow: HeldCounts, what: str, now: float) -> int:
        """A TCP flow's first bytes are TLS or SSH: its mode from now on."""
        return self.flow_policy.encrypted(flow, what)

    def overlap_conflict(
        self, flow: HeldCounts, side: str, offset: int | None, now: float
    ) -> None:
        """Record a within-side overlap whose bytes differ (kept: the first MAX)."""
        self.verdicts.overlap_conflict(flow.key, side, offset, now)

    def count(self, name: str, n: int = 1) -> None:
        """Bump a named counter (reported in stats)."""
        self.counters[name] += n

    # -- internals -----------------------------------------------------------

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
        table = self.table
        if table.sweep_due(now):
            table.sweep(now)
        timeout = cfg.compare_timeout
        for flow in table.owing():
            flow.expired(self, now, timeout)
        self.general.expire_fragments(now)
