"""Offline replay: two captures through the core in virtual time.

The captures are merged in timestamp order (primary first on ties) and fed
with their own timestamps, relative to the first frame, as `now`, so a
replay never sleeps and always gives the same verdicts.  The secondary's
clock is first lined up with the primary's (drivers/align.py): two tcpdumps
started by hand seconds apart would otherwise look like a secondary seconds
late.  Checkpoints are simulated: a request starts one at once and it
completes `checkpoint_latency` seconds later in virtual time.  Between two
frames, virtual time stops at every timer that falls due in the gap, so a
timeout is reported (and a checkpoint released) when it was due, not when
the next frame happens to arrive.  After the last frame, virtual time runs
on until every pending timer fired; whatever is still held then is released
by a final "flush" checkpoint.

With a batch window (``--batch-window``), the frames that arrived within
that window are fed as one batch per side, stamped with the last one's time,
the way live reads of primary_in and secondary_in hand the core whatever
arrived meanwhile: verdicts stay the same (batch boundaries never change
them), times move by at most the window, and bulk captures replay faster
because each flow is compared and released once per batch.  A checkpoint
only takes effect between batches, so the window must stay shorter than the
capture's checkpoint round trip (frames recorded after a checkpoint must
not share a batch with the frames that caused it); a few ms is safe.
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from colo_proxy.core.config import Config
from colo_proxy.core.events import (
    CheckpointReason,
    Divergence,
    ModeSwitch,
    OverlapConflict,
    Side,
)
from colo_proxy.core.proxy import Proxy
from colo_proxy.drivers import align
from colo_proxy.drivers.guest import GuestFilter, infer_guest
from colo_proxy.drivers.pcap import read_frames

ReleaseSink = Callable[[float, bytes], None]
MAX_DRAIN_STEPS = 10_000_000
ALIGN_SCAN_FRAMES = 200_000
"""Frames of each capture looked at to estimate the clock offset."""


@dataclass
class ReplayResult:
    """Everything a report needs, with times relative to the first frame."""

    start_time: float = 0.0
    primary_frames: int = 0
    """Frames read from the primary capture (guest output and client input)."""
    secondary_frames: int = 0
    primary_guest_frames: int = 0
    secondary_guest_frames: int = 0
    client_frames: int = 0
    primary_bytes: int = 0
    secondary_bytes: int = 0
    released_frames: int = 0
    held_frames: int = 0
    flushed_frames: int = 0
    checkpoints: list[tuple[float, str]] = field(default_factory=list)
    divergences: list[Divergence] = field(default_factory=list)
    overlap_conflicts: list[OverlapConflict] = field(default_factory=list)
    guest: bytes | None = None
    stats: dict[str, object] = field(default_factory=dict)
    epoch: float = 0.0
    """Capture time of the first frame (times above are relative to it)."""
    alignment: align.Alignment | None = None
    config: Config | None = None
    """The thresholds the replay ran with (explain names the one that fired)."""
    checkpoint_latency: float = 0.0
    latency: dict[str, array[float]] = field(default_factory=dict)
    """Added release latency of each released primary frame (virtual seconds: release
    time minus arrival), by the VM's mode when it was released."""
    peak_held_bytes: int = 0
    switches: list[ModeSwitch] = field(default_factory=list)
    duration: float = 0.0
    """Virtual time from the first frame to the end of the replay."""


class Replay:
    """Drives one Proxy over two captures."""

    def __init__(
        self,
        config: Config,
        checkpoint_latency: float = 0.0,
        on_release: ReleaseSink | None = None,
        batch_window: float = 0.0,
        align_setting: str = "auto",
        fast_path: bool = True,
    ) -> None:
        self.proxy = Proxy(config, fast_path=fast_path)
        self.config = config
        self.latency = checkpoint_latency
        self.on_release = on_release
        self.batch_window = batch_window
        self.align_setting = align_setting
        self.result = ReplayResult(config=config, checkpoint_latency=checkpoint_latency)
        self._done_at: float | None = None
        self._epoch: float | None = None
        self._vt = 0.0
        """Virtual time reached (seconds from the first frame)."""
        self._arrivals: dict[int, float] = {}
        """Held primary frames' arrival times, by the identity of their bytes."""

    def run(
        self, primary: str, secondary: str, guest: bytes | None = None, infer: bool = True
    ) -> ReplayResult:
        """Replay the pair; `guest` selects guest output in two-way captures."""
        pri_iter = read_frames(primary)
        head = list(itertools.islice(pri_iter, 5000))
        if guest is None and infer:
            guest = infer_guest(frame for _, frame in head)
        self.result.guest = guest
        alignment = self.align(primary, secondary, GuestFilter(guest))
        merged = heapq.merge(
            self._tagged(itertools.chain(head, pri_iter), Side.PRIMARY, GuestFilter(guest)),
            self._tagged(read_frames(secondary), Side.SECONDARY, GuestFilter(guest),
                         alignment.applied),
        )
        self.feed_all(merged)
        return self.finish()

    def align(self, primary: str, secondary: str, guest: GuestFilter) -> align.Alignment:
        """Estimate the secondary capture's clock offset and decide what to apply."""
        scans = [
            align.scan(((ts, f, guest.is_guest(f)) for ts, f in read_frames(path)),
                       ALIGN_SCAN_FRAMES)
            for path in (primary, secondary)
        ]
        alignment = align.choose(self.align_setting, align.estimate(*scans),
                                 self.config.compare_timeout)
        self.result.alignment = alignment
        return alignment

    @staticmethod
    def _tagged(
        frames: Iterator[tuple[float, bytes]], side: Side, guest: GuestFilter,
        shift: float = 0.0,
    ) -> Iterator[tuple[float, int, int, Side, bytes]]:
        for n, (ts, frame) in enumerate(frames):
            who = side if guest.is_guest(frame) else Side.CLIENT
            yield ts - shift, int(side), n, who, frame

    def feed_all(self, merged: Iterator[tuple[float, int, int, Side, bytes]]) -> None:
        """Feed merged (time, _, _, side, frame) tuples, simulating checkpoints."""
        res = self.result
        window = self.batch_window
        batches: dict[Side, list[tuple[bytes, int]]] = {}
        batch_start = batch_end = 0.0
        epoch: float | None = None
        for stamp, source, _, side, frame in merged:
            if epoch is None:
                epoch = self._epoch = res.epoch = stamp
            ts = stamp - epoch  # virtual time: relative, whatever the capture's clock says
            done_at = self._done_at
            if batches and (ts - batch_start > window or (done_at is not None and ts >= done_at)):
                self._feed_batches(batches, batch_end)
            self._run_timers(ts)
            self._vt = max(self._vt, ts)
            if source == Side.PRIMARY:
                res.primary_frames += 1
                res.primary_bytes += len(frame)
            else:
                res.secondary_frames += 1
                res.secondary_bytes += len(frame)
            if side is Side.PRIMARY:
                res.primary_guest_frames += 1
            elif side is Side.SECONDARY:
                res.secondary_guest_frames += 1
            else:
                res.client_frames += 1
            if not batches:
                batch_start = ts
            batches.setdefault(side, []).append((frame, 0))
            batch_end = ts
            if window <= 0:
                self._feed_batches(batches, ts)
        if batches:
            self._feed_batches(batches, batch_end)

    def _feed_batches(self, batches: dict[Side, list[tuple[bytes, int]]], now: float) -> None:
        """Each side's frames of one window as one batch, sides in order of first arrival."""
        arrivals = self._arrivals
        for side, frames in batches.items():
            if side is Side.PRIMARY:
                for data, _ in frames:
                    arrivals[id(data)] = now
            self.proxy.feed_many(side, frames, now)
            held = self.proxy.ledger.held_bytes
            if held > self.result.peak_held_bytes:
                self.result.peak_held_bytes = held
            self._collect(now)
        batches.clear()

    def _run_timers(self, until: float) -> None:
        """Advance virtual time through every timer due before `until`.

        Each step fires the earliest of: the simulated checkpoint completing
        (also when due exactly at `until`, before that frame), a rate-limited
        request falling due, or a flow's timeout, found with the O(flows)
        earliest_timer, which is asked only when a scan is due before `until` or
        the traffic pauses for a scan interval or more (in dense traffic a timer
        fires at the next scan, as live).
        """
        proxy = self.proxy
        last = None
        gap = until - self._vt >= self.config.scan_interval / 2  # quiet: worth an O(flows) look
        for _ in range(MAX_DRAIN_STEPS):
            due = proxy.next_deadline()
            if due is not None and (due < until or gap):
                timer = proxy.earliest_timer()
                if timer is None:
                    due = proxy.deferred_due()
                elif timer != last:
                    due = max(timer, self._vt)  # the exact due time, not the next scan
                # else: that timer did not fire at its time; go on to the scheduled scan
            if due is not None and due >= until:
                due = None
            done_at = self._done_at
            if done_at is not None and done_at <= until and (due is None or done_at <= due):
                self._vt = max(self._vt, done_at)
                self._complete(done_at)
                continue
            if due is None:
                return
            last = due
            self._vt = now = max(self._vt, due)
            proxy.tick(now)
            proxy.expire(now)
            self._collect(now)

    def finish(self) -> ReplayResult:
        """Run virtual time on until timers fire; flush what is still held."""
        proxy, res = self.proxy, self.result
        proxy.settle_undecided(self._vt)
        self._collect(self._vt)
        self._run_timers(float("inf"))
        now = self._vt
        res.overlap_conflicts = list(proxy.overlap_conflicts)
        res.held_frames = proxy.held_frames()
        res.stats = proxy.stats()
        res.released_frames = proxy.released_frames
        if res.held_frames:
            res.checkpoints.append((now, CheckpointReason.FLUSH.value))
            proxy.checkpoint_started(now)
            proxy.checkpoint_done(now)
            self._collect(now)
            res.flushed_frames = proxy.released_frames - res.released_frames
        res.duration = now
        res.stats["policy"] = proxy.policy_report()
        res.switches = list(proxy.switch_log)
        return res

    def _complete(self, at: float) -> None:
        self._done_at = None
        self.proxy.checkpoint_done(at)
        self._collect(at)

    def _collect(self, now: float) -> None:
        proxy = self.proxy
        out = proxy.take_output()
        if out.released:
            arrivals = self._arrivals
            lat = self.result.latency.get(proxy.vm.mode)
            if lat is None:
                lat = self.result.latency[proxy.vm.mode] = array("d")
            for data, _ in out.released:
                t = arrivals.pop(id(data), None)
                if t is not None:
                    lat.append(now - t)
        if out.released and self.on_release is not None:
            sink = self.on_release
            stamp = now + (self._epoch or 0.0)
            for data, offset in out.released:
                sink(stamp, data[offset:] if offset else data)
        if out.divergences:  # before the requests: a checkpoint they complete may add more
            self.result.divergences.extend(out.divergences)
        for req in out.requests:
            self.result.checkpoints.append((req.time, req.reason.value))
            proxy.checkpoint_started(req.time)
            if self.latency <= 0:
                proxy.checkpoint_done(req.time)
                self._collect(now)
            else:
                self._done_at = req.time + self.latency
