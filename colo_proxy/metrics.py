"""Prometheus metrics for `run`, `bridge` and `disk-agent` (`--metrics ADDR`).

Counters that the tap sees as they happen (frames and bytes per side,
released, checkpoint durations, added release latency) are prometheus_client
objects updated on the event loop.  Everything the core and the drivers
already count (held bytes, divergences and checkpoints by reason, malformed
frames, flows, mode, disk epochs) is read at scrape time: the HTTP thread asks
the loop for a snapshot, so no dict is read while the loop changes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from colo_proxy.core.events import Divergence, Side
from colo_proxy.errors import ConfigError

log = logging.getLogger("colo_proxy.metrics")

DEFAULT_PORT = 9464
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
SIDES = {Side.PRIMARY: "primary", Side.SECONDARY: "secondary", Side.CLIENT: "client"}
Snapshot = Callable[[], Mapping[str, Any]]


def parse_addr(text: str) -> tuple[str, int]:
    """`PORT`, `:PORT`, `HOST:PORT` or `[V6]:PORT`; the host defaults to 127.0.0.1."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ConfigError(f"--metrics: bad address {text!r} (PORT or HOST:PORT)") from None
    if not 0 <= number < 65536:
        raise ConfigError(f"--metrics: port out of range in {text!r}")
    return host, number


def loop_snapshot(loop: asyncio.AbstractEventLoop, read: Snapshot, timeout: float = 2.0,
                  ) -> Snapshot:
    """A snapshot function safe to call from the HTTP thread: `read` runs on the loop."""

    async def _read() -> Mapping[str, Any]:
        return read()

    def snap() -> Mapping[str, Any]:
        try:
            return asyncio.run_coroutine_threadsafe(_read(), loop).result(timeout)
        except (FutureTimeout, RuntimeError) as err:
            log.warning("metrics snapshot failed: %s", err)
            return {}

    return snap


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


class _StatsCollector(Collector):
    """Turns a host's stats() snapshot into metric families at scrape time."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        stats = self.snapshot()
        core: Mapping[str, Any] = stats.get("core", {}) or {}
        g = GaugeMetricFamily("colo_held_bytes", "Primary bytes held, awaiting comparison")
        g.add_metric([], _num(core.get("held_bytes")))
        yield g
        g = GaugeMetricFamily("colo_held_frames", "Primary frames held")
        g.add_metric([], _num(core.get("held_frames")))
        yield g
        policy: Mapping[str, Any] = core.get("policy") or {}
        g = GaugeMetricFamily("colo_flows", "Flows in the table, by mode", labels=["mode"])
        by_mode = policy.get("flows_by_mode") or policy.get("flows_by_class")
        if not isinstance(by_mode, Mapping) or not by_mode:  # a core without modes
            by_mode = {"compare": core.get("flows", 0)}
        for mode, n in sorted(by_mode.items()):
            g.add_metric([str(mode)], _num(n))
        yield g
        g = GaugeMetricFamily("colo_mode", "Whole-VM mode (1 for the current one)",
                              labels=["mode"])
        current = str(policy.get("vm_mode", core.get("mode", "colo")))
        for mode in sorted({"colo", "mc", current}):
            g.add_metric([mode], 1.0 if mode == current else 0.0)
        yield g
        c = CounterMetricFamily("colo_mode_seconds", "Time spent in each whole-VM mode",
                                labels=["mode"])
        mode_time = policy.get("mode_time")
        for mode, t in sorted((mode_time if isinstance(mode_time, Mapping) else {}).items()):
            c.add_metric([str(mode)], _num(t))
        yield c
        for name, key, doc in (
            ("colo_mode_switches", "switches", "Whole-VM mode switches"),
            ("colo_masked_bytes", "masked_bytes", "Differing bytes blanked by masks"),
            ("colo_passthrough_frames", "frames_passthrough",
             "Primary frames passed unprotected by passthrough rules"),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], _num(policy.get(key)))
            yield c
        for name, key, doc, label in (
            ("colo_divergences", "divergences_by_kind", "Divergences by kind", "kind"),
            ("colo_checkpoints", "checkpoints_requested_by_reason",
             "Checkpoints requested by reason", "reason"),
            ("colo_malformed_frames", "malformed", "Malformed frames by reason", "reason"),
            ("colo_uncompared_frames", "uncompared", "Uncompared frames by reason", "reason"),
        ):
            c = CounterMetricFamily(name, doc, labels=[label])
            values = core.get(key)
            for k, v in sorted((values if isinstance(values, Mapping) else {}).items()):
                c.add_metric([str(k)], _num(v))
            yield c
        c = CounterMetricFamily("colo_checkpoints_completed", "Checkpoints completed")
        c.add_metric([], _num(core.get("checkpoints_completed")))
        yield c
        disk: Mapping[str, Any] = stats.get("disk_link", {}) or {}
        g = GaugeMetricFamily("colo_disk_epoch", "Disk replication epochs seen by the proxy",
                              labels=["state"])
        for state, key in (("vm", "vm_epoch"), ("acked", "disk_epoch_acked"),
                           ("released", "released_epoch")):
            g.add_metric([state], _num(disk.get(key)))
        yield g


def _disk_agent_families(st: Mapping[str, Any]) -> Iterator[Metric]:
    g = GaugeMetricFamily("colo_disk_agent_epoch", "The disk agent's epochs", labels=["state"])
    for state in ("sealed", "committed", "applied"):
        g.add_metric([state], _num(st.get(state)))
    yield g
    g = GaugeMetricFamily("colo_disk_agent_bytes", "Bytes the disk agent buffers",
                          labels=["kind"])
    for kind in ("speculation", "overlay"):
        g.add_metric([kind], _num(st.get(kind)))
    yield g


class _DiskAgentCollector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from _disk_agent_families(self.snapshot().get("disk_agent", {}) or {})


def disk_agent_registry(snapshot: Snapshot) -> CollectorRegistry:
    """The disk agent's registry: its epochs and buffered bytes, read at scrape time."""
    registry = CollectorRegistry()
    registry.register(_DiskAgentCollector(snapshot))
    return registry


class LiveMetrics:
    """The tap's observer feeding prometheus_client, plus the scrape-time collector."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("colo_frames", "Frames received, by side", ["side"], registry=r)
        self.bytes = Counter("colo_bytes", "Bytes received, by side", ["side"], registry=r)
        self.released_frames = Counter("colo_released_frames",
                                       "Primary frames released to the client", registry=r)
        self.released_bytes = Counter("colo_released_bytes",
                                      "Primary bytes released to the client", registry=r)
        self.checkpoint_seconds = Histogram(
            "colo_checkpoint_duration_seconds", "Checkpoint duration (STOP to RESUME)",
            buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram(
            "colo_release_added_latency_seconds",
            "Time a primary frame waited in the proxy before release",
            buckets=LATENCY_BUCKETS, registry=r)
        for side in SIDES.values():  # present from the first scrape
            self.frames.labels(side)
            self.bytes.labels(side)

    def attach(self, snapshot: Snapshot) -> None:
        self.registry.register(_StatsCollector(snapshot))

    # -- Observer ------------------------------------------------------------------------

    def fed(self, side: Side, frames: list[tuple[bytes, int]], now: float) -> None:
        name = SIDES.get(side, "client")
        self.frames.labels(name).inc(len(frames))
        self.bytes.labels(name).inc(sum(len(d) - o for d, o in frames))

    def released(self, latencies: list[float], nbytes: int, frames: int) -> None:
        self.released_frames.inc(frames)
        self.released_bytes.inc(nbytes)
        for t in latencies:
            self.latency.observe(t)

    def divergence(self, div: Divergence) -> None:
        pass

    def requested(self, reason: str) -> None:
        pass

    def checkpoint(self, duration: float) -> None:
        self.checkpoint_seconds.observe(duration)


def serve(addr: str, registry: CollectorRegistry) -> Callable[[], None]:
    """Serve /metrics on `addr`; returns the function that stops the server."""
    host, port = parse_addr(addr)
    try:
        server, thread = start_http_server(port, host, registry)
    except OSError as err:
        raise ConfigError(f"--metrics {addr}: cannot listen: {err.strerror or err}") from err
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
