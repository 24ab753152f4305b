"""Resource bounds under attack: fragment floods, unfinished fragments, flow-table
exhaustion while checkpoints never complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from colo_proxy.cli import main
from colo_proxy.core.config import Config
from colo_proxy.core.events import Side
from colo_proxy.core.flowtable import HARD_FLOWS_FACTOR
from colo_proxy.core.fragments import FRAGMENT_OVERHEAD, FragmentTable
from colo_proxy.core.proxy import Proxy
from colo_proxy.drivers.pcap import PcapWriter
from colo_proxy.testing.synth import TcpServerStream
from tests.core.test_datagrams import fragments, udp

A, B = bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2))


def key(i: int) -> tuple[tuple[int, ...], int, bytes, bytes, int, int]:
    return ((), 4, A, B, 17, i)


def test_empty_fragments_count_toward_max_fragment_bytes() -> None:
    table: FragmentTable[int] = FragmentTable(64, 100 * FRAGMENT_OVERHEAD, 30.0)
    given_up = 0
    for i in range(10_000):
        if table.add(key(i), 0, True, b"", i, 0.0) is not None:
            given_up += 1
    assert table.held_bytes <= table.max_bytes
    assert len(table) <= 100 and given_up >= 9_900


def test_fragment_expiry_does_not_walk_the_table() -> None:
    table: FragmentTable[int] = FragmentTable(64, 1 << 30, 30.0)
    for i in range(10_000):
        table.add(key(i), 0, True, b"x" * 8, i, float(i) / 1000)
    before = table.examined
    for tick in range(100):
        assert table.expire(10.0 + tick / 100) == []
        assert table.oldest() == 0.0
    assert table.examined - before <= 2 * 100
    # and the old ones do go, oldest first, touching little more than what expires
    out = table.expire(30.5)
    assert out == list(range(500)) and len(table) == 9_500


def test_held_frames_counts_every_fragment_of_a_held_datagram() -> None:
    proxy = Proxy(Config())
    for i, frame in enumerate(fragments(b"p" * 3000, 1480, 7)):
        proxy.feed(Side.PRIMARY, frame, i / 1000)
    # the datagram is whole and waits for the secondary's: three frames held
    assert proxy.held_frames() == 3
    proxy.checkpoint_started(1.0)
    proxy.checkpoint_done(1.0)
    assert len(proxy.take_output().released) == 3 and proxy.held_frames() == 0


def test_unfinished_primary_fragments_are_held_then_released() -> None:
    proxy = Proxy(Config(fragment_timeout=5.0))
    first = fragments(b"p" * 3000, 1480, 9)[0]
    proxy.feed(Side.PRIMARY, first, 0.0)
    assert proxy.held_frames() == 1 and proxy.busy()
    proxy.tick(6.0)
    assert len(proxy.take_output().released) == 1 and proxy.held_frames() == 0


def write(path: Path, frames: list[bytes]) -> Path:
    w = PcapWriter(path)
    for i, f in enumerate(frames):
        w.write(100.0 + i * 0.001, f)
    w.close()
    return path


def test_replay_accounts_for_every_primary_frame_with_unfinished_fragments(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whole = udp(b"w" * 100)
    first = fragments(b"p" * 3000, 1480, 9)[0]
    p = write(tmp_path / "p.pcap", [whole, first])
    s = write(tmp_path / "s.pcap", [whole])
    assert main(["replay", str(p), str(s), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["primary_guest_frames"] == 2
    assert rep["released_frames"] + rep["held_frames"] + rep["flushed_frames"] == 2


def synack(i: int) -> bytes:
    """A SYN-ACK of flow i, from the primary only: it is held, never matched."""
    port = 1024 + i % 60000
    client = bytes((10, 1, (i // 60000) % 256, 2))
    stream = TcpServerStream(isn=1000 + i, sport=80, dport=port, src=A, dst=client)
    return stream.synack()


def test_flow_table_full_of_holding_flows_does_not_scan_per_new_flow() -> None:
    cfg = Config(max_flows=512, max_hold_flows=1 << 20, max_hold_frames=1 << 20)
    proxy = Proxy(cfg)
    hard = cfg.max_flows * HARD_FLOWS_FACTOR  # up to the hard cap (test_flow_cap.py: past it)
    frames = [synack(i) for i in range(hard)]
    for i, frame in enumerate(frames):
        proxy.feed(Side.PRIMARY, frame, i * 1e-5)
    stats = proxy.stats()
    # every flow holds its SYN-ACK, so none can be evicted: a checkpoint is asked
    # for, the limit hit is counted, and the frames stay held (never dropped)
    assert stats["held_frames"] == hard and stats["flow_table_full"] >= 1
    assert stats["checkpoints_requested_by_reason"]  # type: ignore[truthy-bool]
    # ... without walking all the flows again for each of the 1536 new ones
    assert stats["flow_evict_examined"] <= 4 * cfg.max_flows
    assert stats["flows_over_limit"] >= hard - 2 * cfg.max_flows
    proxy.checkpoint_started(1.0)
    proxy.checkpoint_done(1.0)
    assert len(proxy.take_output().released) == hard and proxy.held_frames() == 0
    # after the checkpoint the table can be trimmed again
    proxy.feed(Side.PRIMARY, synack(5000), 1.1)
    assert proxy.stats()["flows_evicted"] >= 1

