#!/usr/bin/env python3
"""Drive the core (and an outdev channel) with hostile traffic; print peak RSS, frames
in and out, and what was counted, per attack.

    tools/attacks.py                      # every attack, full size (a million flows ...)
    tools/attacks.py flows --scale 0.1    # one attack, a tenth of the size

Each attack runs in its own process so its peak RSS is its own.  Virtual time moves
1 ms per batch of 64 frames; checkpoints complete 50 ms after they are requested
(as a real pair would), except in ``flows-stuck`` where they never do.  ``refused``
is the primary frames of new flows dropped at the flow table's hard cap (counted,
never released): frames in = out + held at the end + refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import resource
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from colo_proxy.core.config import Config  # noqa: E402
from colo_proxy.core.events import Side  # noqa: E402
from colo_proxy.core.proxy import Proxy  # noqa: E402
from colo_proxy.testing.synth import TcpServerStream, ipv4_frame  # noqa: E402

Frames = Iterator[tuple[Side, bytes]]

A = bytes((10, 0, 0, 1))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synacks(n: int) -> Frames:
    """n distinct flows, each a SYN-ACK from the primary only (the secondary never answers)."""
    for i in range(n):
        client = bytes((10, 1 + (i >> 24) % 200, (i >> 16) & 255, (i >> 8) & 255))
        stream = TcpServerStream(isn=i, src=A, dst=client, sport=80, dport=1024 + (i & 255))
        yield Side.PRIMARY, stream.synack()


def fragment_flood(n: int, size: int) -> Frames:
    """n first fragments (more-fragments set) of distinct datagrams that never complete."""
    l4 = bytes(size)
    for i in range(n):
        frame = ipv4_frame(A, bytes((10, 0, (i >> 16) & 255, 2)), 17, l4, ident=i & 0xFFFF)
        yield Side.PRIMARY, frame[:20] + struct.pack("!H", 0x2000) + frame[22:]


def gap_flood(n: int) -> Frames:
    """One TCP flow from both guests; the primary's segments land at huge random gaps."""
    p, s = TcpServerStream(isn=7), TcpServerStream(isn=7)
    yield Side.PRIMARY, p.synack()
    yield Side.SECONDARY, s.synack()
    rng = random.Random(13)
    for _ in range(n):
        yield Side.PRIMARY, p.data(rng.randrange(0, 1 << 30), b"g" * 1000)


def silent_secondary(n: int) -> Frames:
    """The primary streams for ever; the secondary answers the handshake, then says nothing."""
    p, s = TcpServerStream(isn=7), TcpServerStream(isn=7)
    yield Side.PRIMARY, p.synack()
    yield Side.SECONDARY, s.synack()
    for i in range(n):
        yield Side.PRIMARY, p.data(i * 1400, b"d" * 1400)


def run_core(frames: Frames, config: Config, complete: bool, batch: int = 64) -> dict[str, Any]:
    """Feed in batches; complete checkpoints 50 ms after each request (unless not)."""
    proxy = Proxy(config)
    now, fed, released, done_at = 0.0, 0, 0, None
    max_held = max_frag_bytes = 0
    pending: list[tuple[bytes, int]] = []
    side_now = Side.PRIMARY
    start = time.perf_counter()

    def flush() -> None:
        nonlocal released, done_at
        if pending:
            proxy.feed_many(side_now, pending, now)
            pending.clear()
        proxy.tick(now)
        drained = proxy.take_output()
        released += len(drained.released)
        for _ in drained.requests:
            proxy.checkpoint_started(now)
            if complete:
                done_at = now + 0.05

    for side, frame in frames:
        if side is not side_now or len(pending) >= batch:
            flush()
            side_now = side
            now += 0.001
            if done_at is not None and now >= done_at:
                proxy.checkpoint_done(now)
                done_at = None
            max_held = max(max_held, proxy.held_frames())
            max_frag_bytes = max(max_frag_bytes, proxy.general._frags[0].held_bytes)
        pending.append((frame, 0))
        fed += side is Side.PRIMARY
    flush()
    seconds = time.perf_counter() - start
    stats = proxy.stats()
    return {
        "frames_in": fed, "frames_out": released, "held_at_end": proxy.held_frames(),
        "refused": stats.get("admission_refused_primary_frames", 0),
        "max_held_frames": max_held, "max_fragment_bytes": max_frag_bytes,
        "flows_at_end": stats["flows"], "seconds": round(seconds, 2),
        "frames_per_s": round(fed / seconds) if seconds else 0,
        "counted": {k: v for k, v in stats.items()
                    if k in ("flow_table_full", "flows_over_limit", "flows_evicted",
                             "flows_refused", "admission_refused_primary_frames",
                             "flow_evict_examined", "hold_limit_hits", "checkpoints_completed",
                             "checkpoints_requested_by_reason", "uncompared", "malformed",
                             "divergences_by_kind", "checkpoint_requests_rate_limited")},
    }


async def _outdev(total: int, cap: int) -> dict[str, Any]:
    """A reader that never reads outdev: output is bounded by the buffer, drops counted."""
    import socket
    import tempfile

    from colo_proxy.drivers.endpoints import parse_endpoint
    from colo_proxy.drivers.qemu_socket import Channel

    d = tempfile.mkdtemp(prefix="hd13-", dir="/tmp")
    ch = Channel("outdev", parse_endpoint(f"unix:{d}/o,server"), max_buffer=cap)
    await ch.start()
    peer = socket.socket(socket.AF_UNIX)
    peer.connect(f"{d}/o")
    while not ch.connected:
        await asyncio.sleep(0.01)
    frame = b"o" * 1400
    sent = peak = 0
    for _ in range(total // len(frame)):
        sent += ch.write(frame)
        peak = max(peak, ch.buffered_bytes())
        if sent % 1000 == 0:
            await asyncio.sleep(0)
    stats = ch.stats
    peer.close()
    await ch.close()
    Path(f"{d}/o").unlink(missing_ok=True)
    Path(d).rmdir()
    return {"frames_in": total // len(frame), "frames_out": sent, "peak_buffered": peak,
            "buffer_cap": cap, "counted": {"dropped_writes": stats.dropped_writes,
                                           "dropped_bytes": stats.dropped_bytes}}


def attacks(scale: float) -> dict[str, Callable[[], dict[str, Any]]]:
    n = lambda full: max(1, int(full * scale))  # noqa: E731
    return {
        "flows-stuck": lambda: run_core(synacks(n(1_000_000)), Config(), complete=False),
        "flows": lambda: run_core(synacks(n(1_000_000)), Config(), complete=True),
        "fragments-empty": lambda: run_core(fragment_flood(n(1_000_000), 0), Config(), True),
        "fragments-1480": lambda: run_core(fragment_flood(n(300_000), 1480), Config(), True),
        "gaps": lambda: run_core(gap_flood(n(300_000)), Config(), complete=True),
        "silent-secondary": lambda: run_core(silent_secondary(n(1_000_000)), Config(), True),
        "outdev-unread": lambda: asyncio.run(_outdev(n(1 << 30), 64 << 20)),
    }


def _child(name: str, scale: float, out: Any) -> None:
    base = rss_mib()
    result = attacks(scale)[name]()
    result["peak_rss_mib"] = round(rss_mib(), 1)
    result["rss_at_start_mib"] = round(base, 1)
    out.put(result)


def run_isolated(name: str, scale: float) -> dict[str, Any]:
    """One attack in a fresh process (its own peak RSS)."""
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, scale, q))
    proc.start()
    result: dict[str, Any] = q.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    names = list(attacks(1.0))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("attacks", nargs="*", help=f"default all: {', '.join(names)}")
    ap.add_argument("--scale", type=float, default=1.0, help="size factor (1.0)")
    args = ap.parse_args(argv)
    for name in args.attacks or names:
        if name not in names:
            ap.error(f"unknown attack {name!r}")
        print(name, json.dumps(run_isolated(name, args.scale), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
