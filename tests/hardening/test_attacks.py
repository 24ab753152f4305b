"""Generated attacks at test size (tools/attacks.py runs them full size and prints
peak RSS): memory within the configured caps, limits counted, no frame lost.

A hold limit asks for a checkpoint, and checkpoints are rate-limited, so what is
held is bounded by the limit plus what arrives during one checkpoint cycle
(min_checkpoint_interval plus the checkpoint's own 50 ms here): the harness feeds
64 frames per virtual millisecond, so that is the allowance checked.
"""

from __future__ import annotations

import asyncio
from types import ModuleType
from typing import Any

import pytest

from colo_proxy.core.config import Config
from colo_proxy.core.flowtable import HARD_FLOWS_FACTOR
from colo_proxy.core.fragments import FRAGMENT_OVERHEAD
from tests.tools_loader import load_tool


@pytest.fixture(scope="module")
def attacks() -> ModuleType:
    return load_tool("attacks")


PER_MS = 64


def cycle_frames(cfg: Config) -> int:
    """Frames the harness feeds during one rate-limited checkpoint cycle (plus a batch)."""
    return int(PER_MS * 1000 * (cfg.min_checkpoint_interval + 0.05)) + 2 * PER_MS


def conserved(res: dict[str, Any]) -> None:
    """Every primary frame fed went out, is held, or was refused at the flow cap (counted)."""
    assert res["frames_out"] + res["held_at_end"] + res["refused"] == res["frames_in"], res


def test_silent_secondary_is_bounded_by_the_hold_limit(attacks: ModuleType) -> None:
    cfg = Config(max_hold_bytes=1 << 20)
    res = attacks.run_core(attacks.silent_secondary(20_000), cfg, complete=True)
    conserved(res)
    assert res["max_held_frames"] <= cfg.max_hold_bytes // 1454 + cycle_frames(cfg)
    assert res["counted"]["hold_limit_hits"] >= 1
    assert res["counted"]["checkpoints_completed"] >= 2


def test_empty_fragment_flood_stays_within_its_cap(attacks: ModuleType) -> None:
    cfg = Config(max_fragment_bytes=1000 * FRAGMENT_OVERHEAD)
    res = attacks.run_core(attacks.fragment_flood(50_000, 0), cfg, complete=True)
    conserved(res)
    assert res["max_fragment_bytes"] <= cfg.max_fragment_bytes
    assert res["max_held_frames"] <= 1000
    assert res["counted"]["malformed"]["ip_fragment_memory"] >= 49_000


def test_gap_flood_is_bounded_by_the_hold_limit(attacks: ModuleType) -> None:
    cfg = Config(max_hold_bytes=1 << 20)
    res = attacks.run_core(attacks.gap_flood(20_000), cfg, complete=True)
    conserved(res)
    assert res["max_held_frames"] <= cfg.max_hold_bytes // 1054 + cycle_frames(cfg)
    assert res["counted"]["hold_limit_hits"] >= 1


def test_flow_flood_while_checkpoints_never_complete(attacks: ModuleType) -> None:
    cfg = Config(max_flows=1024)
    res = attacks.run_core(attacks.synacks(20_000), cfg, complete=False)
    conserved(res)
    counted = res["counted"]
    hard = cfg.max_flows * HARD_FLOWS_FACTOR
    # past max_flows new flows are still taken (counted), up to the hard cap; past it
    # they are refused, their frames dropped and counted: the table stops growing
    assert counted["flow_table_full"] >= 1 and counted["flows_over_limit"] == hard - 1024
    assert res["flows_at_end"] == hard and res["held_at_end"] == hard
    assert counted["flows_refused"] == res["refused"] == 20_000 - hard
    # one scan when the table filled, one more per sweep: not one per new flow
    assert counted["flow_evict_examined"] <= 2 * res["flows_at_end"]
    assert counted["checkpoints_requested_by_reason"]


def test_flow_flood_with_checkpoints_keeps_the_table_trimmed(attacks: ModuleType) -> None:
    cfg = Config(max_flows=1024, flow_idle_timeout=1.0, closed_flow_timeout=1.0)
    res = attacks.run_core(attacks.synacks(20_000), cfg, complete=True)
    conserved(res)
    counted = res["counted"]
    # each checkpoint frees the table; between two the flood refills it past max_flows
    # (64 flows per virtual ms, a cycle is 150 ms) up to the hard cap, and no further
    assert counted["flows_evicted"] >= counted["checkpoints_completed"] * cfg.max_flows
    assert res["flows_at_end"] <= cfg.max_flows * HARD_FLOWS_FACTOR
    # every new flow was either refused, or created and then evicted or still there
    assert counted["flows_evicted"] + res["flows_at_end"] + counted["flows_refused"] == 20_000


def test_outdev_that_is_never_read(attacks: ModuleType) -> None:
    res = asyncio.run(attacks._outdev(32 << 20, 1 << 20))
    assert res["peak_buffered"] <= 1 << 20
    assert res["frames_out"] + res["counted"]["dropped_writes"] == res["frames_in"]
    assert res["counted"]["dropped_writes"] > 0
