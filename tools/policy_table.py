#!/usr/bin/env python3
"""Pure COLO vs the default hybrid policy vs the policy with masks, on real-server captures.

For each golden case recorded from a real server (pcaps/*/expected.json gives
its replay arguments) it replays three ways and prints one markdown row each:
checkpoints and checkpoints/s by reason, added release latency (virtual time),
time in each VM mode, divergences, flows by class and masked bytes.

    tools/policy_table.py                      # the default cases
    tools/policy_table.py --case nginx-date --extra --checkpoint-latency 0.01
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PCAPS = ROOT / "pcaps"

MASKS: dict[str, list[str]] = {
    "nginx-date": ["80:\\r\\nDate: ([^\\r\\n]*)"],
    "nginx-real": ["80:\\r\\nDate: ([^\\r\\n]*)"],
    "redis-time": ["6379:\\$\\d+\\r\\n(\\d+)\\r\\n"],
}
"""The masks an operator would write for each case (same-length noise fields only)."""

DEFAULT_CASES = ["nginx-date", "nginx-real", "tls-real", "redis-time", "bulk-real"]


def replay(case: str, extra: list[str]) -> dict[str, Any]:
    expected = json.loads((PCAPS / case / "expected.json").read_text())
    cmd = [sys.executable, "-m", "colo_proxy.cli", "replay", str(PCAPS / case / "primary.pcap"),
           str(PCAPS / case / "secondary.pcap"), "--json", *expected.get("args", []), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    report: dict[str, Any] = json.loads(out)
    return report


def row(case: str, how: str, report: dict[str, Any]) -> str:
    p = report["policy"]
    lat = p["added_latency"]
    reasons = ", ".join(f"{r} {n}" for r, n in p["checkpoints_by_reason"].items()) or "-"
    classes = ", ".join(f"{k} {v}" for k, v in p["flows_by_class"].items() if v)
    modes = ", ".join(f"{m} {t:.2f}" for m, t in p["mode_time"].items())
    return (f"| {case} | {how} | {len(report['checkpoints'])} ({reasons}) | "
            f"{p['checkpoints_per_second']:.2f} | {lat['p50'] * 1000:.2f} / "
            f"{lat['p99'] * 1000:.2f} | {modes} | {len(report['divergences'])} | {classes} | "
            f"{p['masked_bytes']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="a pcaps/ case (repeatable)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more replay flags for every run")
    args = parser.parse_args()
    print("| case | policy | checkpoints (by reason) | ckpt/s | added latency p50 / p99 ms "
          "| time in mode s | divergences | flows by class | masked bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in args.case or DEFAULT_CASES:
        runs = [("pure COLO", ["--policy", "colo"]), ("default policy", [])]
        masks = MASKS.get(case)
        if masks:
            runs.append(("policy + masks", [a for m in masks for a in ("--mask", m)]))
        for how, flags in runs:
            print(row(case, how, replay(case, [*flags, *args.extra])), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
