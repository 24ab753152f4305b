"""Scraping a `--metrics` endpoint in tests: every listed metric, and whether it moved."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

# The metrics issue 14 lists, by the name a scrape shows (counters get _total).
LISTED = (
    "colo_frames_total", "colo_bytes_total", "colo_released_frames_total",
    "colo_released_bytes_total", "colo_held_bytes", "colo_held_frames", "colo_flows",
    "colo_divergences_total", "colo_checkpoints_total", "colo_checkpoints_completed_total",
    "colo_checkpoint_duration_seconds_count", "colo_release_added_latency_seconds_count",
    "colo_mode", "colo_malformed_frames_total", "colo_uncompared_frames_total",
    "colo_disk_epoch",
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int) -> Samples:
    """Every sample of http://127.0.0.1:PORT/metrics by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def by_name(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def moved(before: Samples, after: Samples, name: str) -> bool:
    """Some sample of `name` changed (a new label set counts)."""
    return by_name(before, name) != by_name(after, name)
