"""The flow table's hard cap: when every flow holds output and checkpoints never
complete, new flows stop being admitted (their frames dropped and counted, never
released uncompared) while flows already tracked keep being served."""

from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path
from typing import Any

import pytest

from colo_proxy.core.config import Config
from colo_proxy.core.events import CheckpointReason, Side
from colo_proxy.core.flowtable import HARD_FLOWS_FACTOR, HARD_HELD_FACTOR
from colo_proxy.core.proxy import Proxy
from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.runtime.host import LIMIT_LOG_INTERVAL
from colo_proxy.runtime.supervisor import RunSettings, Supervisor
from colo_proxy.testing.synth import TcpServerStream, ipv4_frame

A = bytes((10, 0, 0, 1))


def stream(i: int) -> TcpServerStream:
    return TcpServerStream(isn=1000 + i, sport=80, dport=1024 + i % 60000, src=A,
                           dst=bytes((10, 1, (i // 60000) % 256, 2)))


def udp(i: int, payload: bytes = b"u" * 32) -> bytes:
    """A UDP datagram of flow i (the general path, not the SYN fast path)."""
    l4 = struct.pack("!HHHH", 53, 2000 + i, 8 + len(payload), 0) + payload
    return ipv4_frame(A, bytes((10, 2, (i >> 8) & 255, i & 255)), 17, l4, ident=i & 0xFFFF)


def stuck_proxy(**limits: Any) -> Proxy:
    """Hold limits out of the way: only the flow table's caps are under test."""
    return Proxy(Config(max_hold_flows=1 << 20, max_hold_frames=1 << 20, **limits))


def test_new_flows_past_the_hard_cap_are_refused_and_old_ones_still_served() -> None:
    cfg_flows = 64
    proxy = stuck_proxy(max_flows=cfg_flows)
    hard = cfg_flows * HARD_FLOWS_FACTOR
    total = 3 * hard
    for i in range(total):  # SYN-ACKs from the primary only: every flow holds, none evictable
        proxy.feed(Side.PRIMARY, stream(i).synack(), i * 1e-6)
    for i in range(total, total + 50):  # the general path too
        proxy.feed(Side.PRIMARY, udp(i), 0.01)
        proxy.feed(Side.SECONDARY, udp(i), 0.01)
    stats = proxy.stats()
    assert stats["flows"] == hard == stats["held_frames"]
    assert stats["flows_over_limit"] == hard - cfg_flows
    refused = total - hard + 50
    assert stats["flows_refused"] == refused + 50  # each secondary datagram tried too
    assert stats["admission_refused_primary_frames"] == refused
    assert stats["admission_refused_secondary_frames"] == 50
    assert stats["admission_refused_primary_bytes"] > 0
    out = proxy.take_output()
    assert out.released == []  # nothing refused goes out uncompared
    assert [r.reason for r in out.requests] == [CheckpointReason.FLOW_TABLE]
    # a flow already in the table is still compared and released
    proxy.feed(Side.SECONDARY, stream(0).synack(), 0.02)
    assert len(proxy.take_output().released) == 1
    # the checkpoint frees the table: new flows are admitted again
    proxy.checkpoint_started(1.0)
    proxy.checkpoint_done(1.0)
    assert len(proxy.take_output().released) == hard - 1 and proxy.held_frames() == 0
    proxy.feed(Side.PRIMARY, stream(total + 100).synack(), 1.01)
    assert proxy.held_frames() == 1 and proxy.stats()["flows_refused"] == refused + 50


def test_new_flows_are_refused_while_the_held_bytes_are_past_the_hard_cap() -> None:
    max_hold = 8192
    proxy = stuck_proxy(max_hold_bytes=max_hold, max_flow_hold_bytes=max_hold)
    payload = b"x" * 1000
    for i in range(200):
        proxy.feed(Side.PRIMARY, udp(i, payload), i * 1e-6)
    stats: dict[str, Any] = proxy.stats()
    hard = max_hold * HARD_HELD_FACTOR
    frame = len(udp(0, payload))
    assert hard <= stats["held_bytes"] < hard + frame
    assert stats["flows"] == stats["held_frames"] == -(-hard // frame)
    assert stats["admission_refused_primary_frames"] == 200 - stats["flows"]
    # an admitted flow goes on holding (its own limits ask for checkpoints): the cap
    # is on admission, a flow already tracked is never cut off
    proxy.feed(Side.PRIMARY, udp(0, payload), 0.01)
    assert proxy.stats()["held_frames"] == stats["held_frames"] + 1


def test_run_logs_refusals_once_per_interval(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The live host: refusals in stats, and one warning per LIMIT_LOG_INTERVAL."""
    clock = [0.0]
    settings = RunSettings(
        primary_in=parse_endpoint(f"unix:{sockdir}/pin,server"),
        secondary_in=parse_endpoint(f"unix:{sockdir}/sin,server"),
        outdev=parse_endpoint(f"unix:{sockdir}/out,server"),
    )
    sup = Supervisor(Config(max_flows=8, max_hold_flows=1 << 20), settings, lambda: clock[0])

    async def main() -> None:
        times = (0.0, 1.0, LIMIT_LOG_INTERVAL - 0.5, LIMIT_LOG_INTERVAL + 0.5, 100.0)
        for batch, t in enumerate(times):
            clock[0] = t
            sup._feed(Side.PRIMARY, [(stream(i).synack(), 0)
                                     for i in range(batch * 50, batch * 50 + 50)])

    caplog.set_level(logging.WARNING, logger="colo_proxy")
    asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if "hard cap" in r.getMessage()]
    hard = 8 * HARD_FLOWS_FACTOR
    assert len(lines) == 3, lines  # at 0, past the interval, and at 100
    assert lines[0].startswith(f"flow table at its hard cap ({hard} flows of {hard}")
    assert f"{50 - hard} new flows refused" in lines[0]
    assert "150 new flows refused" in lines[1] and "50 new flows refused" in lines[2]
    core = sup.stats()["core"]
    assert core["flows_refused"] == 250 - hard  # type: ignore[index]


def test_hard_caps_are_settings() -> None:
    from collections import Counter

    from colo_proxy.core.config import Config
    from colo_proxy.core.flowtable import FlowTable
    from colo_proxy.errors import ConfigError

    table = FlowTable(Config(max_flows=10, max_flows_hard=25, max_hold_bytes_hard=1000), Counter())
    assert (table.hard_flows, table.hard_held_bytes) == (25, 1000)
    default = FlowTable(Config(max_flows=10), Counter())
    assert default.hard_flows == 40
    with pytest.raises(ConfigError, match="max_flows_hard"):
        Config(max_flows=10, max_flows_hard=5)
