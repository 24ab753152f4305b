#!/usr/bin/env python3
"""Replay benchmark: frames/s and compared Gbit/s through the comparison core.

Builds identical primary/secondary TCP traffic in memory (different ISNs and
segmentation on the secondary is optional), feeds it through the core the
way `colo-proxy replay` does, and prints figures.  Pcap decoding is timed
separately (file reading, not the core).  Memory: peak traced
allocation during the run, which should follow bytes held, not bytes seen.

    python3 tools/bench_replay.py [--frames 200000] [--seg 1448] [--conns 50]
    python3 tools/bench_replay.py --builds pure compiled   # both cores, alternating runs

--pure loads the pure-Python core where the compiled one is built
(colo_proxy.testing.purecore); --builds runs this script once per build and
round, alternating, and prints each build's best and the ratio.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

if __name__ == "__main__" and "--pure" in sys.argv:
    from colo_proxy.testing.purecore import force_pure_core

    force_pure_core()

from colo_proxy.core import build_kind
from colo_proxy.core.config import Config
from colo_proxy.core.events import Side
from colo_proxy.core.proxy import Proxy
from colo_proxy.drivers.pcap import PcapWriter, read_frames
from colo_proxy.testing.synth import TcpServerStream


def build(frames: int, seg: int, conns: int, window: int, sec_isn_delta: int,
          ) -> list[tuple[Side, bytes]]:
    """Interleaved primary/secondary frames: `frames` in total (half each side)."""
    per_side = frames // 2
    per_conn = max(1, per_side // conns)
    rng = random.Random(7)
    block = bytes(rng.randrange(256) for _ in range(seg * 64))
    out: list[tuple[Side, bytes]] = []
    streams = []
    for c in range(conns):
        p = TcpServerStream(dport=20000 + c, isn=rng.randrange(2**32))
        s = TcpServerStream(dport=20000 + c, isn=(p.isn + sec_isn_delta) % 2**32)
        streams.append((p, s))
    pri: list[bytes] = [p.synack() for p, _ in streams]
    sec: list[bytes] = [s.synack() for _, s in streams]
    for i in range(per_conn):
        for p, s in streams:
            off = i * seg
            chunk = block[(i % 64) * seg:(i % 64 + 1) * seg]
            pri.append(p.data(off, chunk))
            sec.append(s.data(off, chunk))
    for i in range(0, len(pri), window):
        out.extend((Side.PRIMARY, f) for f in pri[i:i + window])
        out.extend((Side.SECONDARY, f) for f in sec[i:i + window])
    return out


def batches(frames: list[tuple[Side, bytes]]) -> list[tuple[Side, list[tuple[bytes, int]]]]:
    """Runs of same-side frames, as the live driver hands them over (one socket read)."""
    out: list[tuple[Side, list[tuple[bytes, int]]]] = []
    for side, frame in frames:
        if not out or out[-1][0] is not side:
            out.append((side, []))
        out[-1][1].append((frame, 0))
    return out


def run_core(frames: list[tuple[Side, bytes]], trace: bool,
             batched: bool = False) -> tuple[float, int, int]:
    proxy = Proxy(Config())

    def take() -> list[tuple[bytes, int]]:
        return proxy.take_output().released

    runs = batches(frames)
    released = 0
    gc.collect()
    if trace:
        tracemalloc.start()
    t0 = time.process_time()
    now = 0.0
    if batched:  # what `colo-proxy run` does: one feed_many per socket read
        feed_many = proxy.feed_many
        for side, run in runs:
            feed_many(side, run, now)
            now += 0.0001
            released += len(take())
    else:  # what replay does: one feed per frame, each with its own timestamp
        feed = proxy.feed
        for n, (side, frame) in enumerate(frames):
            feed(side, frame, now)
            if not n & 63:
                now += 0.0001
                released += len(take())
    released += len(take())
    elapsed = time.process_time() - t0
    peak = 0
    if trace:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return elapsed, released, peak


def compare_builds(args: argparse.Namespace) -> int:
    """Alternate child runs of each build (one repeat each); best of args.repeat rounds."""
    import re
    import subprocess

    best: dict[tuple[str, int], tuple[float, float]] = {}
    for rnd in range(args.repeat):
        for kind in args.builds:
            cmd = [sys.executable, __file__, "--frames", str(args.frames), "--conns",
                   str(args.conns), "--window", str(args.window), "--sec-isn-delta",
                   str(args.sec_isn_delta), "--repeat", "1", "--seg", *map(str, args.seg)]
            if kind == "pure":
                cmd.append("--pure")
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            if f", {kind} core," not in out:
                print(f"asked for the {kind} core, got: {out.splitlines()[0]}", file=sys.stderr)
                return 1
            for m in re.finditer(r"TCP +(\d+)-byte segments: core +([\d,]+) frames/s "
                                 r"\(batched as live: ([\d,]+)\)", out):
                seg = int(m.group(1))
                single = float(m.group(2).replace(",", ""))
                batched = float(m.group(3).replace(",", ""))
                old = best.get((kind, seg), (0.0, 0.0))
                best[(kind, seg)] = (max(old[0], single), max(old[1], batched))
            print(f"round {rnd + 1} {kind}: " + "; ".join(
                line.split(":", 1)[1].split("|")[0].strip()
                for line in out.splitlines() if line.startswith("TCP")), flush=True)
    print(f"best of {args.repeat} alternating rounds, frames/s (frame by frame | batched):")
    for seg in args.seg:
        cells = [f"{kind} {best[(kind, seg)][0]:>10,.0f} | {best[(kind, seg)][1]:>10,.0f}"
                 for kind in args.builds]
        line = f"TCP {seg:>5} B: " + "   ".join(cells)
        if set(args.builds) == {"pure", "compiled"}:
            p, c = best[("pure", seg)], best[("compiled", seg)]
            line += f"   compiled/pure {c[0] / p[0]:.2f}x | {c[1] / p[1]:.2f}x"
        print(line)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200_000, help="primary + secondary frames")
    ap.add_argument("--seg", type=int, nargs="+", default=[1448, 64])
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--window", type=int, default=32, help="frames per side per burst")
    ap.add_argument("--sec-isn-delta", type=int, default=100000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pure", action="store_true", help="load the pure-Python core")
    ap.add_argument("--builds", nargs="+", choices=["pure", "compiled"],
                    help="run once per build and round, alternating, and compare")
    args = ap.parse_args()
    if args.builds:
        return compare_builds(args)
    print(f"python {sys.version.split()[0]}, {build_kind()} core, {args.frames} frames per "
          f"case, {args.conns} conns, window {args.window}, best of {args.repeat}")
    for seg in args.seg:
        frames = build(args.frames, seg, args.conns, args.window, args.sec_isn_delta)
        payload = sum(len(f) - 54 for _, f in frames)
        best = min(run_core(frames, False)[0] for _ in range(args.repeat))
        best_batched = min(run_core(frames, False, True)[0] for _ in range(args.repeat))
        _, released, peak = run_core(frames, True)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "p.pcap")
            w = PcapWriter(path)
            for i, (_, f) in enumerate(frames):
                w.write(i * 1e-5, f)
            w.close()
            t0 = time.process_time()
            decoded = sum(1 for _ in read_frames(path))
            decode = time.process_time() - t0
        fps = len(frames) / best
        print(f"TCP {seg:>5}-byte segments: core {fps:>10,.0f} frames/s "
              f"(batched as live: {len(frames) / best_batched:,.0f})  "
              f"{payload * 8 / best / 1e9:6.2f} Gbit/s compared payload  "
              f"released {released}/{len(frames) // 2}  peak traced memory "
              f"{peak / 1e6:.1f} MB  | pcap decode {decoded / decode:,.0f} frames/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
