#!/usr/bin/env python3
"""Frames/s and Gbit/s through `colo-proxy bridge`, with real TCP stacks in namespaces.

Builds a tools/bridge_lab.py lab, starts `colo-proxy bridge` on its three host
interfaces, and runs bulk TCP fetches: identical servers in the primary and
secondary namespaces each send SIZE bytes, the client reads them through the
proxy.  Printed per run: goodput (Gbit/s of TCP payload the client received),
frames the proxy read (client + primary + secondary) and sent, both per
second of wall time, the proxy's CPU seconds, and its ring drops.  The last
line is the median over ``--repeat`` runs.  Figures, never assertions.

Usage (root): ``python3 tools/bench_bridge.py [--quick] [--size MB] [--repeat N]``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bridge_lab import BridgeLab, available

ROOT = Path(__file__).resolve().parents[1]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _json_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if not out.strip():
        raise RuntimeError(f"no result: {err.strip()}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def one_run(lab: BridgeLab, size: int, extra: list[str], port: int) -> dict[str, float]:
    """One fetch of ``size`` bytes through a fresh proxy; its figures."""
    proxy = subprocess.Popen(
        [sys.executable, "-m", "colo_proxy.cli", "bridge", *lab.bridge_args(),
         "--log-level", "warning", *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.0)  # the rings are set up well within this
        if proxy.poll() is not None:
            raise RuntimeError(proxy.communicate()[1])
        args = ["tcp-server", "--size", str(size), "--port", str(port), "--timeout", "300"]
        servers = [lab.tool(role, *args) for role in ("primary", "secondary")]
        for server in servers:
            assert server.stdout is not None
            server.stdout.readline()
        cpu0, t0 = _cpu_seconds(proxy.pid), time.monotonic()
        client = _json_line(lab.tool("client", "tcp-client", "--host", lab.guest_ip,
                                     "--port", str(port), "--size", str(size),
                                     "--timeout", "300", "--idle", "60"), 600)
        wall, cpu = time.monotonic() - t0, _cpu_seconds(proxy.pid) - cpu0
        for server in servers:
            _json_line(server, 300)
        proxy.send_signal(signal.SIGINT)
        _, err = proxy.communicate(timeout=60)
    finally:
        if proxy.poll() is None:
            proxy.kill()
            proxy.wait()
    if not client.get("complete"):
        raise RuntimeError(f"transfer incomplete: {client}")
    report = json.loads(err.strip().splitlines()[-1])["colo_proxy_report"]
    ports = [report[name] for name in ("client-if", "primary-if", "secondary-if")]
    frames_in = sum(p["frames_in"] for p in ports)
    frames_out = sum(p["frames_out"] for p in ports)
    seconds = float(client["seconds"])
    return {
        "gbit_s": client["received"] * 8 / seconds / 1e9,
        "frames_in_s": frames_in / wall,
        "frames_out_s": frames_out / wall,
        "frames_in": frames_in,
        "cpu_s": cpu,
        "wall_s": wall,
        "ring_drops": sum(p["ring_drops"] for p in ports),
        "divergences": sum(report["core"]["divergences_by_kind"].values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=200, metavar="MB", help="bytes per fetch")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20 MB, one run")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args(argv)
    reason = available()
    if reason is not None:
        print(f"bench_bridge: {reason}", file=sys.stderr)
        return 2
    size = (20 if args.quick else args.size) * 1_000_000
    repeat = 1 if args.quick else args.repeat
    runs = []
    with BridgeLab() as lab:
        print(f"bulk TCP fetch of {size / 1e6:.0f} MB through colo-proxy bridge "
              f"(loop {args.loop}, MTU 1500, offloads off)")
        for i in range(repeat):
            r = one_run(lab, size, ["--loop", args.loop], 8080 + i)
            runs.append(r)
            print(f"run {i + 1}: {r['gbit_s']:.3f} Gbit/s goodput, "
                  f"{r['frames_in_s']:,.0f} frames/s read, {r['frames_out_s']:,.0f} frames/s "
                  f"sent, {r['frames_in']:,.0f} frames in {r['wall_s']:.2f} s, "
                  f"proxy CPU {r['cpu_s']:.2f} s, ring drops {r['ring_drops']:.0f}, "
                  f"divergences {r['divergences']:.0f}")
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"median: {med['gbit_s']:.3f} Gbit/s, {med['frames_in_s']:,.0f} frames/s read, "
          f"{med['frames_in'] / med['cpu_s']:,.0f} frames per proxy CPU second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
