"""The hold ledger: the one owner of held and released primary output and its counters.

Flows keep their own frames; the ledger counts what is held (totals and per
flow), says when a hold limit is crossed, and collects released frames, in
order, until the driver takes them.
"""

from __future__ import annotations

from typing import final

from colo_proxy.core.config import Config
from colo_proxy.core.flows import HeldCounts, Rel
from colo_proxy.core.held import HeldFrame


@final
class HoldLedger:
    """Held and released primary frames, totals and limits."""

    __slots__ = ("class_latency", "held_bytes", "held_extra", "held_frames", "holding_flows",
                 "latency_frames", "latency_sum", "max_bytes", "max_flow_bytes", "max_flows",
                 "max_frames", "now", "released", "released_frames", "released_payload",
                 "unit_extra", "watch")

    def __init__(self, cfg: Config, watch: dict[HeldCounts, None]) -> None:
        self.watch = watch
        """The flow table's watch list: a flow that starts holding is watched for timeouts."""
        self.released: list[tuple[bytes, int]] = []
        """Released frames the driver has not taken yet, as (data, offset)."""
        self.held_frames = 0
        """Held units: a frame, or a whole reassembled datagram."""
        self.held_extra = 0
        """Frames held beyond one per unit: a reassembled datagram is one unit, n frames."""
        self.unit_extra = 0
        """Extra frames of the unit being dispatched (set around a reassembled datagram)."""
        self.held_bytes = 0
        self.holding_flows = 0
        self.released_frames = 0
        self.released_payload = 0
        self.max_bytes = cfg.max_hold_bytes
        self.max_frames = cfg.max_hold_frames
        self.max_flow_bytes = cfg.max_flow_hold_bytes
        self.max_flows = cfg.max_hold_flows
        self.now = 0.0
        """The proxy's current time (set by it), for the added latency of released runs."""
        self.latency_sum = 0.0
        self.latency_frames = 0
        """Added latency of output released by checkpoints, summed, and how many frames
        (see waited): the wait that checkpoints add; output the secondary matched goes out
        without it being measured here, to keep the compare path free of it."""
        self.class_latency = [[0.0, 0, 0.0] for _ in range(4)]
        """Per flow class (flows.CLASS_*): [latency sum, frames, max], as latency_sum."""

    def hold(self, flow: HeldCounts, flen: int) -> bool:
        """One more held primary frame; True when a hold limit is now exceeded."""
        if not flow.held_frames:
            self.holding_flows += 1
            self.watch[flow] = None
        flow.held_frames += 1
        flow.held_bytes += flen
        self.held_frames += 1
        self.held_extra += self.unit_extra
        self.held_bytes += flen
        return (
            self.held_bytes > self.max_bytes or self.held_frames > self.max_frames
            or flow.held_bytes > self.max_flow_bytes or self.holding_flows > self.max_flows
        )

    def held_batch(self, frames: int, nbytes: int, flows: int, flow_over: bool) -> bool:
        """hold() for a batch's fast-path frames, whose per-flow counts feed_many kept."""
        self.held_frames += frames
        self.held_bytes += nbytes
        self.holding_flows += flows
        return (
            self.held_bytes > self.max_bytes or self.held_frames > self.max_frames or flow_over
            or self.holding_flows > self.max_flows
        )

    def release(self, flow: HeldCounts, rel: Rel, flen: int, payload: int) -> None:
        """A held unit may go to the client."""
        flow.held_frames -= 1
        flow.held_bytes -= flen
        if not flow.held_frames:
            self.holding_flows -= 1
        self.held_frames -= 1
        if not isinstance(rel, tuple):
            self.held_extra -= len(rel) - 1
        self.held_bytes -= flen
        self.released_payload += payload
        self.release_unheld(rel)

    def release_unheld(self, rel: Rel) -> None:
        """A primary unit that goes out without ever being held (matched or passed)."""
        if isinstance(rel, tuple):
            self.released.append(rel)
            self.released_frames += 1
        else:
            self.released.extend(rel)
            self.released_frames += len(rel)

    def release_run(self, flow: HeldCounts, run: list[HeldFrame]) -> None:
        """Held TCP queue entries that may go to the client, in order (one call per run)."""
        released = self.released
        frames = flen = payload = 0
        for e in run:
            rel = e.rel
            if isinstance(rel, tuple):
                released.append(rel)
                frames += 1
            else:
                released.extend(rel)
                frames += len(rel)
                self.held_extra -= len(rel) - 1
            flen += e.flen
            payload += e.plen
        n = len(run)
        flow.held_frames -= n
        flow.held_bytes -= flen
        if not flow.held_frames:
            self.holding_flows -= 1
        self.held_frames -= n
        self.held_bytes -= flen
        self.released_frames += frames
        self.released_payload += payload

    def waited(self, flow: HeldCounts, since: float, frames: int) -> None:
        """Output of `flow` held since `since` goes out at a checkpoint (frames of it)."""
        wait = self.now - since
        self.latency_sum += wait * frames
        self.latency_frames += frames
        per = self.class_latency[flow.klass]
        per[0] += wait * frames
        per[1] += frames
        if wait > per[2]:
            per[2] = wait

    def take(self) -> list[tuple[bytes, int]]:
        out, self.released = self.released, []
        return out
