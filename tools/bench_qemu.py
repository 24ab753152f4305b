#!/usr/bin/env python3
"""colo-proxy side by side with QEMU's colo-compare through the shared harness.

For every selected case of the harness's SUITE: ``harness.py gen``, then
``harness.py run`` once with QEMU's colo-compare and once with
``--impl cmd`` starting ``colo-proxy run``, then ``harness.py diff``.
Behaviour cases print whether the verdicts agree (released set, checkpoint
requested or not); bench cases print released packets per second of each
and the ratio colo-proxy / colo-compare (medians over ``--repeat`` runs).

    python3 tools/bench_qemu.py --harness ../shared/bench/colo-compare-harness/harness.py \
        --kind behaviour --out /tmp/cmp
    python3 tools/bench_qemu.py --kind bench --only tcp1448_identical,udp64_identical --repeat 3

Timing figures depend on the machine; compare them only within one series.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

DEFAULT_HARNESS = "/work/shared/bench/colo-compare-harness/harness.py"
PROXY_CMD = (
    "{python} -m colo_proxy.cli run --primary-in unix:{primary_in},server "
    "--secondary-in unix:{secondary_in},server --outdev unix:{outdev},server "
    "--vnet-hdr {vnet} --compare-timeout {compare_timeout_s} --log-level warning"
)


def load_suite(harness: str) -> list[tuple[str, str, str, str]]:
    spec = importlib.util.spec_from_file_location("colo_harness", harness)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.SUITE)


def proxy_cmd(run_args: list[str], notify: bool, extra: str) -> str:
    timeout_ms = 3000
    if "--compare-timeout" in run_args:
        timeout_ms = int(run_args[run_args.index("--compare-timeout") + 1])
    cmd = PROXY_CMD.replace("{compare_timeout_s}", f"{timeout_ms / 1000:g}")
    if notify:
        cmd += " --notify-dev unix:{notify_dev},server"
    return (cmd + " " + extra).strip()


def run_harness(harness: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, harness, *args], capture_output=True, text=True)


def gen_case(harness: str, case: Path, gen: str) -> str | None:
    """`harness.py gen` into `case` unless its pcaps exist; an error message or None."""
    case.mkdir(parents=True, exist_ok=True)
    if (case / "primary.pcap").exists():
        return None
    res = run_harness(harness, ["gen", "--out", str(case), *shlex.split(gen)])
    return "gen failed: " + res.stderr[-500:] if res.returncode else None


def one_case(
    harness: str, out: Path, name: str, gen: str, run: str, repeat: int, extra: str
) -> dict[str, Any]:
    case = out / name
    error = gen_case(harness, case, gen)
    if error:
        return {"case": name, "error": error}
    run_args = shlex.split(run)
    if "--impl" in run_args:
        return {"case": name, "skipped": "case runs its own implementation"}
    notify = "--no-notify" not in run_args
    rep = ["--repeat", str(repeat)] if repeat > 1 else []
    reports = {}
    for impl, impl_args in (
        ("qemu", []),
        ("colo-proxy", ["--impl", "cmd", "--cmd", proxy_cmd(run_args, notify, extra)]),
    ):
        path = case / f"{impl}.json"
        res = run_harness(
            harness, ["run", "--dir", str(case), "--json", str(path), *run_args, *impl_args, *rep]
        )
        if res.returncode or not path.exists():
            return {"case": name, "error": f"{impl} run failed: {res.stderr[-800:]}"}
        report = json.loads(path.read_text())
        if "runs" in report:  # --repeat: verdicts from the first run, medians kept
            first = dict(report["runs"][0], median=report["median"])
            path.with_suffix(".run0.json").write_text(json.dumps(report["runs"][0]))
            report = first
        reports[impl] = report
    suffix = ".run0.json" if repeat > 1 else ".json"
    diff = run_harness(
        harness, ["diff", str(case / f"qemu{suffix}"), str(case / f"colo-proxy{suffix}")]
    )
    summary: dict[str, Any] = {"case": name, "verdicts_equal": diff.returncode == 0}
    try:
        summary["diff"] = json.loads(diff.stdout)
    except json.JSONDecodeError:
        summary["diff"] = diff.stdout[-500:]
    for impl, rep_ in reports.items():
        summary[impl] = {
            "verdict": rep_.get("verdict"),
            "released": (rep_.get("released") or {}).get("count"),
            "notifications": (rep_.get("notifications") or {}).get("count", 0),
            "released_pps": _pps(rep_),
        }
    q, c = summary["qemu"]["released_pps"], summary["colo-proxy"]["released_pps"]
    if q and c and "capture" not in run_args:  # paced runs measure the pcap's rate
        summary["ratio_colo_proxy_over_qemu"] = round(c / q, 3)
    return summary


def _pps(report: dict[str, Any]) -> float | None:
    median = (report.get("median") or {}).get("released_pps") or {}
    if isinstance(median, dict) and median.get("median"):
        return float(median["median"])
    tp = report.get("throughput") or {}
    value = tp.get("released_pps") if isinstance(tp, dict) else None
    return float(value) if value else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--harness", default=DEFAULT_HARNESS)
    p.add_argument("--out", default="/tmp/colo-proxy-vs-qemu")
    p.add_argument("--kind", choices=["behaviour", "bench", "all"], default="behaviour")
    p.add_argument("--only", help="comma-separated case names")
    p.add_argument("--skip", default="", help="comma-separated case names to leave out")
    p.add_argument("--start-at", help="skip the cases listed before this one")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--proxy-args", default="", help="extra colo-proxy run arguments")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    skip = set(filter(None, args.skip.split(",")))
    results = []
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    started = args.start_at is None
    for name, gen, run, kind in load_suite(args.harness):
        started = started or name == args.start_at
        if not started:
            continue
        if (only and name not in only) or name in skip:
            continue
        if not only and args.kind != "all" and kind != args.kind:
            continue
        summary = one_case(args.harness, out, name, gen, run, args.repeat, args.proxy_args)
        results.append(summary)
        print(_line(summary), flush=True)
        (out / "summary.json").write_text(json.dumps(results, indent=1))
    agree = sum(1 for r in results if r.get("verdicts_equal"))
    print(f"{agree}/{len(results)} cases with equal verdicts; details in {out}/summary.json")
    return 0


def _line(s: dict[str, Any]) -> str:
    if "error" in s or "skipped" in s:
        return f"{s['case']:<48} {s.get('error') or s.get('skipped')}"
    q, c = s["qemu"], s["colo-proxy"]
    text = (
        f"{s['case']:<48} {'SAME' if s['verdicts_equal'] else 'DIFF'}  "
        f"qemu {q['verdict']} rel={q['released']} req={q['notifications']}  |  "
        f"colo-proxy {c['verdict']} rel={c['released']} req={c['notifications']}"
    )
    if "ratio_colo_proxy_over_qemu" in s:
        text += (
            f"  pps qemu={q['released_pps']:.0f} colo-proxy={c['released_pps']:.0f}"
            f" ratio={s['ratio_colo_proxy_over_qemu']}"
        )
    return text


if __name__ == "__main__":
    sys.exit(main())
