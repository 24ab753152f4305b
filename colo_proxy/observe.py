"""A tap around a live host's core: what metrics and saved divergences need.

The live host (runtime/host.py) owns exactly one Proxy and calls it through a
handful of methods.  `TapProxy` stands in for it, delegates every call and
watches four of them: frames fed (bytes per side, arrival times of primary
frames, a bounded ring of recent frames), output taken (released frames and
their added latency, divergences, checkpoint requests), and checkpoint start
and completion (their duration).  Nothing here changes what the core decides;
with no observer attached the host runs the plain Proxy.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from colo_proxy.core.events import Divergence, Side
from colo_proxy.core.packet import TCP_SYN
from colo_proxy.drivers.pcap import PcapWriter
from colo_proxy.flowstream import frame_label

log = logging.getLogger("colo_proxy.observe")

Frame = tuple[bytes, int]
MAX_PENDING_ARRIVALS = 1 << 20
"""Primary frames remembered for the latency histogram (older ones are forgotten)."""


class Observer(Protocol):
    """What the tap tells: every hook is optional in spirit, all are called."""

    def fed(self, side: Side, frames: list[Frame], now: float) -> None: ...

    def released(self, latencies: list[float], nbytes: int, frames: int) -> None: ...

    def divergence(self, div: Divergence) -> None: ...

    def requested(self, reason: str) -> None: ...

    def checkpoint(self, duration: float) -> None: ...


class TapProxy:
    """Delegates to the real Proxy and reports to observers."""

    def __init__(self, inner: Any, observers: list[Observer]) -> None:
        self._inner = inner
        self._observers = observers
        self._arrivals: OrderedDict[int, float] = OrderedDict()
        self._ckpt_started: float | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def feed_many(self, side: Side, frames: list[Frame], now: float) -> Any:
        if side is Side.PRIMARY:
            arrivals = self._arrivals
            for data, _ in frames:
                arrivals[id(data)] = now
            while len(arrivals) > MAX_PENDING_ARRIVALS:
                arrivals.popitem(last=False)
        for obs in self._observers:
            obs.fed(side, frames, now)
        return self._inner.feed_many(side, frames, now)

    def feed(self, side: Side, frame: bytes, now: float, *rest: Any) -> Any:
        if side is Side.PRIMARY:
            self._arrivals[id(frame)] = now
        for obs in self._observers:
            obs.fed(side, [(frame, 0)], now)
        return self._inner.feed(side, frame, now, *rest)

    def take_output(self) -> Any:
        out = self._inner.take_output()
        now = time.monotonic()
        if out.released:
            lat: list[float] = []
            nbytes = 0
            pop = self._arrivals.pop
            for data, offset in out.released:
                nbytes += len(data) - offset
                t = pop(id(data), None)
                if t is not None:
                    lat.append(max(0.0, now - t))
            for obs in self._observers:
                obs.released(lat, nbytes, len(out.released))
        for div in out.divergences:
            for obs in self._observers:
                obs.divergence(div)
        for req in out.requests:
            for obs in self._observers:
                obs.requested(req.reason.value)
        return out

    def checkpoint_started(self, now: float) -> Any:
        self._ckpt_started = now
        return self._inner.checkpoint_started(now)

    def checkpoint_done(self, now: float) -> Any:
        if self._ckpt_started is not None:
            for obs in self._observers:
                obs.checkpoint(max(0.0, now - self._ckpt_started))
            self._ckpt_started = None
        return self._inner.checkpoint_done(now)


@dataclass
class _Ring:
    """Recent frames of one side, bounded in frames and bytes, plus each flow's SYN."""

    max_frames: int
    max_bytes: int
    frames: deque[tuple[float, bytes]] = field(default_factory=deque)
    nbytes: int = 0
    syns: OrderedDict[str, tuple[float, bytes]] = field(default_factory=OrderedDict)

    def add(self, stamp: float, data: bytes) -> None:
        self.frames.append((stamp, data))
        self.nbytes += len(data)
        while self.frames and (len(self.frames) > self.max_frames
                               or self.nbytes > self.max_bytes):
            self.nbytes -= len(self.frames.popleft()[1])
        got = frame_label(data)
        if got is not None and got[1] & TCP_SYN:
            self.syns[got[0]] = (stamp, data)
            self.syns.move_to_end(got[0])
            while len(self.syns) > 16384:
                self.syns.popitem(last=False)


class DivergenceSaver:
    """Writes the frames around each divergence as a pcap pair `explain` and `replay` read.

    Each divergence gets a directory NNNN-KIND/ with primary.pcap and
    secondary.pcap (the flow's SYN when it was seen, then the flow's frames among
    the recent ones kept) and meta.json (the divergence as a report would give
    it).  The whole directory is bounded by `max_bytes`: beyond it divergences
    are counted, not saved.
    """

    def __init__(self, directory: str, max_bytes: int, ring_frames: int = 4096,
                 ring_bytes: int = 8 << 20, clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.used = 0
        self.saved = 0
        self.not_saved = 0
        self.clock = clock
        self.rings = {Side.PRIMARY: _Ring(ring_frames, ring_bytes),
                      Side.SECONDARY: _Ring(ring_frames, ring_bytes)}
        self._t0: float | None = None

    def fed(self, side: Side, frames: list[Frame], now: float) -> None:
        ring = self.rings.get(side)
        if ring is None:
            return
        stamp = self.clock()
        if self._t0 is None:
            self._t0 = stamp
        for data, offset in frames:
            ring.add(stamp, data[offset:] if offset else data)

    def released(self, latencies: list[float], nbytes: int, frames: int) -> None:
        pass

    def requested(self, reason: str) -> None:
        pass

    def checkpoint(self, duration: float) -> None:
        pass

    def divergence(self, div: Divergence) -> None:
        picked = {side: self._flow_frames(ring, div.flow) for side, ring in self.rings.items()}
        size = sum(len(d) + 16 for frames in picked.values() for _, d in frames) + 2048
        if self.used + size > self.max_bytes:
            self.not_saved += 1
            return
        self.saved += 1
        out = self.dir / f"{self.saved:04d}-{div.kind.value}"
        out.mkdir(exist_ok=True)
        epoch = min((f[0][0] for f in picked.values() if f), default=self.clock())
        for side, name in ((Side.PRIMARY, "primary"), (Side.SECONDARY, "secondary")):
            writer = PcapWriter(out / f"{name}.pcap")
            for stamp, data in picked[side]:
                writer.write(stamp, data)
            writer.close()
        meta = {
            "divergence": {"time": round(self.clock() - epoch, 6), "flow": div.flow,
                           "kind": div.kind.value, "offset": div.offset, "detail": div.detail,
                           "primary_bytes": div.primary.hex(),
                           "secondary_bytes": div.secondary.hex()},
            "epoch": epoch, "clock_offset": 0.0, "checkpoints": [],
            "frames": {"primary": len(picked[Side.PRIMARY]),
                       "secondary": len(picked[Side.SECONDARY])},
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        self.used += size
        log.info("divergence saved to %s", out)

    @staticmethod
    def _flow_frames(ring: _Ring, label: str) -> list[tuple[float, bytes]]:
        frames = [(s, d) for s, d in ring.frames if (got := frame_label(d)) is not None
                  and got[0] == label]
        syn = ring.syns.get(label)
        if syn is not None and all(d is not syn[1] for _, d in frames):
            frames.insert(0, syn)
        return frames

    def report(self) -> dict[str, object]:
        return {"saved": self.saved, "not_saved": self.not_saved, "bytes": self.used}
