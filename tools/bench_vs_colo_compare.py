#!/usr/bin/env python3
"""colo-proxy against QEMU's colo-compare: throughput, latency and peak memory.

One command, one series: for every case, ``harness.py gen`` once, then
``harness.py run`` alternately with QEMU's colo-compare and with ``colo-proxy
run`` (``--impl cmd``) on the same pcaps through the same unix sockets,
``--repeat`` times each (the order alternates from one repeat to the next).
Both implementations run under tools/maxrss.py, which records the peak RSS
of the process (QEMU through the harness's ``--qemu WRAPPER``, colo-proxy as a
prefix of the ``--cmd`` template).  The table gives medians per
implementation and the ratio colo-proxy / colo-compare:

* released frames/s and Gbit/s (primary Ethernet frames read back from
  outdev, from the first byte offered to the last frame out; only when every
  primary frame came out: a run that lost frames counts as failed, and the
  table says how many runs and frames, rather than folding it into a median);
* release latency p50 / p99 in ms (outdev read time minus the time the frame
  was handed to primary_in; unpaced, that includes queueing);
* peak RSS in MiB of the implementation process;
* process CPU seconds of the implementation (user + system over its whole
  life, from rusage) and that per released frame, in microseconds.

Before the series it byte-compiles colo_proxy (an installed wheel ships its
.pyc; an editable checkout under PYTHONDONTWRITEBYTECODE=1 recompiles every
module at every start: ``--no-bytecode`` measures that) and measures the
start-up CPU of ``colo-proxy run`` alone (started, listening, stopped), and of
QEMU with the harness's colo-compare objects the same way, so CPU per frame can
be read with and without it: a steady-state figure (whole-life median minus
start-up median, for both) is printed beside the whole-life table, never
instead of it.  ``--pure`` runs the proxy on
the pure-Python build where the compiled one is built
(``python -m colo_proxy.testing.purecore``).

Finally it prints the core's memory per 10,000 active TCP flows (tracemalloc
around ``Proxy.feed_many``, no sockets).

    python3 tools/bench_vs_colo_compare.py --repeat 3
    python3 tools/bench_vs_colo_compare.py --only tcp1448 --repeat 1 --no-flows-memory
    python3 tools/bench_vs_colo_compare.py --repeat 3 --pure    # the pure build

Timing figures depend on the machine; compare them only within one series.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path[:0] = [str(TOOLS), str(ROOT)]

from bench_qemu import (  # noqa: E402
    DEFAULT_HARNESS,
    gen_case,
    load_suite,
    proxy_cmd,
    run_harness,
)

MAXRSS = TOOLS / "maxrss.py"
QEMU, PROXY = "colo-compare", "colo-proxy"
METRICS = ("frames_s", "gbit_s", "p50_ms", "p99_ms", "rss_mib", "cpu_s", "cpu_us_frame")
PURE_MODULE = "colo_proxy.testing.purecore"


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    gen: str
    run: str
    paced: bool


# key, label, harness SUITE case (its gen/run arguments are used) or our own (gen, run)
CASES: list[tuple[str, str, str | tuple[str, str]]] = [
    ("tcp1448", "TCP 1448 B, 50 conns", "tcp1448_identical"),
    ("tcp64", "TCP 64 B, 100 conns", "tcp64_identical"),
    ("udp1448", "UDP 1448 B, 50 flows", "udp1448_identical"),
    # 10,000 concurrent connections (round robin: all SYN-ACKs, then all ACKs, ...),
    # 4000 bytes each = 1448 + 1448 + 1104-byte segments, plus 4 54-byte control frames:
    # 70,000 frames per side, under colo-compare's 16384-flow table limit.
    ("mix10k", "TCP mix, 10k flows", ("--proto tcp --conns 10000 --bytes 4000 --seg 1448", "")),
    ("latency", "TCP 1448 B paced 1k/s", "tcp1448_paced_latency"),
]


def cases(harness: str) -> list[Case]:
    suite = {name: (gen, run) for name, gen, run, _kind in load_suite(harness)}
    out = []
    for key, label, source in CASES:
        gen, run = suite[source] if isinstance(source, str) else source
        out.append(Case(key, label, gen, run, "capture" in shlex.split(run)))
    return out


def qemu_wrapper(case_dir: Path, rss: Path, qemu: str, tag: str) -> Path:
    """An executable for the harness's --qemu: QEMU under tools/maxrss.py."""
    script = case_dir / f"qemu-maxrss.{tag}.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"exec {shlex.quote(sys.executable)} {shlex.quote(str(MAXRSS))} "
        f'--out {shlex.quote(str(rss))} -- {shlex.quote(qemu)} "$@"\n'
    )
    script.chmod(0o755)
    return script


def run_impl(
    harness: str, case_dir: Path, case: Case, impl: str, tag: str, qemu: str, extra: str,
    pure: bool = False,
) -> dict[str, Any]:
    """One ``harness.py run`` of one implementation; the report plus the maxrss record."""
    rss = case_dir / f"{impl}.{tag}.maxrss.json"
    report_path = case_dir / f"{impl}.{tag}.json"
    for stale in (rss, report_path):
        stale.unlink(missing_ok=True)
    run_args = shlex.split(case.run)
    if impl == QEMU:
        impl_args = ["--qemu", str(qemu_wrapper(case_dir, rss, qemu, tag))]
    else:
        notify = "--no-notify" not in run_args
        prefix = f"{{python}} {shlex.quote(str(MAXRSS))} --out {shlex.quote(str(rss))} -- "
        cmd = proxy_cmd(run_args, notify, extra)
        if pure:
            cmd = cmd.replace("-m colo_proxy.cli ", f"-m {PURE_MODULE} ", 1)
        impl_args = ["--impl", "cmd", "--cmd", prefix + cmd]
    for _attempt in range(2):  # once more if QEMU or the proxy did not start (a loaded host)
        res = run_harness(harness, ["run", "--dir", str(case_dir), "--json", str(report_path),
                                    *run_args, *impl_args])
        if not res.returncode and report_path.exists():
            break
        print(f"  {case.key} {impl} {tag}: harness run failed; retrying: {res.stderr[-300:]}",
              file=sys.stderr)
    if res.returncode or not report_path.exists():
        raise RuntimeError(f"{case.key} {impl} {tag}: harness run failed: {res.stderr[-800:]}")
    report: dict[str, Any] = json.loads(report_path.read_text())
    report["maxrss"] = json.loads(rss.read_text()) if rss.exists() else None
    return report


def metrics(report: dict[str, Any]) -> dict[str, Any]:
    tp = report.get("throughput") or {}
    lat = report.get("latency_ms") or {}
    rss = report.get("maxrss") or {}
    released = report["released"]["count"]
    mbps = tp.get("released_MBps")
    steal = ((report.get("cpu") or {}).get("system") or {}).get("steal_s")
    cpu = round(rss["cpu_user_s"] + rss["cpu_system_s"], 3) if rss else None
    return {
        "frames_s": tp.get("released_pps"),
        "gbit_s": mbps * 8 / 1000 if mbps else None,
        "p50_ms": lat.get("p50"),
        "p99_ms": lat.get("p99"),
        "rss_mib": rss["ru_maxrss_kib"] / 1024 if rss.get("ru_maxrss_kib") else None,
        "released": released,
        "primary": released + report["not_released"]["count"],
        "verdict": report.get("verdict"),
        "notifications": (report.get("notifications") or {}).get("count", 0),
        "per_flow_inversions": (report.get("order") or {}).get("per_flow_inversions"),
        "impl_lifetime_cpu_s": cpu,
        "cpu_s": cpu,
        "cpu_us_frame": cpu / released * 1e6 if cpu is not None and released else None,
        "steal_s": steal,
    }


def median(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, int | float)]
    return float(statistics.median(nums)) if nums else None


def bench_case(
    harness: str, out: Path, case: Case, repeat: int, qemu: str, extra: str, pure: bool = False
) -> dict[str, Any]:
    case_dir = out / case.key
    error = gen_case(harness, case_dir, case.gen)
    if error:
        raise RuntimeError(f"{case.key}: {error}")
    runs: dict[str, list[dict[str, Any]]] = {QEMU: [], PROXY: []}
    for r in range(repeat):
        order = (QEMU, PROXY) if r % 2 == 0 else (PROXY, QEMU)
        for impl in order:
            runs[impl].append(
                metrics(run_impl(harness, case_dir, case, impl, f"r{r}", qemu, extra, pure))
            )
    summary: dict[str, Any] = {"case": case.key, "label": case.label, "gen": case.gen}
    summary["run"] = case.run
    summary["paced"] = case.paced
    for impl, rows in runs.items():
        summary[impl] = {
            "median": {m: median([row[m] for row in rows]) for m in METRICS},
            "runs": rows,
        }
    summary["ratio"] = {
        m: _ratio(summary[PROXY]["median"][m], summary[QEMU]["median"][m]) for m in METRICS
    }
    return summary


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ---------------------------------------------------------------- printing

HEAD = (
    f"{'case':<24} {'implementation':<14} {'frames/s':>10} {'Gbit/s':>7} {'p50 ms':>8} "
    f"{'p99 ms':>8} {'RSS MiB':>8} {'CPU s':>6} {'CPU us/fr':>9}  released (min over runs)"
)


def _cell(value: float | None, width: int, digits: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if digits == 0:
        return f"{value:>{width},.0f}"
    return f"{value:>{width}.{digits}f}"


def table(summaries: list[dict[str, Any]]) -> str:
    lines = [HEAD, "-" * len(HEAD)]
    for s in summaries:
        for n, impl in enumerate((QEMU, PROXY)):
            med, rows = s[impl]["median"], s[impl]["runs"]
            released = min(row["released"] for row in rows)
            flags = sorted({row["verdict"] for row in rows if row["verdict"] != "match"})
            short = [row["primary"] - row["released"] for row in rows
                     if row["released"] < row["primary"]]
            if short:  # a run that lost frames is a failed run, not a slower one: say so
                flags.append(f"{len(short)} of {len(rows)} runs lost frames "
                             f"({', '.join(f'{n:,}' for n in short)}); frames/s is the "
                             f"median of the complete runs")
            lines.append(
                f"{s['label'] if n == 0 else '':<24} {impl:<14} "
                f"{_cell(med['frames_s'], 10, 0)} {_cell(med['gbit_s'], 7, 3)} "
                f"{_cell(med['p50_ms'], 8, 2)} {_cell(med['p99_ms'], 8, 2)} "
                f"{_cell(med['rss_mib'], 8, 1)} {_cell(med['cpu_s'], 6, 2)} "
                f"{_cell(med['cpu_us_frame'], 9, 2)}  {released}/{rows[0]['primary']}"
                + (f" [{', '.join(flags)}]" if flags else "")
            )
        ratio = s["ratio"]
        rate = (
            f"{'(paced)':>10} {'':>7}"
            if s["paced"]
            else f"{_cell(ratio['frames_s'], 10, 2)} {_cell(ratio['gbit_s'], 7, 2)}"
        )
        lines.append(
            f"{'':<24} {'ratio cp/cc':<14} {rate} {_cell(ratio['p50_ms'], 8, 2)} "
            f"{_cell(ratio['p99_ms'], 8, 2)} {_cell(ratio['rss_mib'], 8, 2)} "
            f"{_cell(ratio['cpu_s'], 6, 2)} {_cell(ratio['cpu_us_frame'], 9, 2)}"
        )
    return "\n".join(lines)


def runs_detail(summaries: list[dict[str, Any]]) -> str:
    """Per-run frames/s, p99, process lifetime CPU (rusage) and host steal, to judge noise."""
    lines = []
    for s in summaries:
        for impl in (QEMU, PROXY):
            rows = s[impl]["runs"]
            fps = ", ".join(_cell(r["frames_s"], 0, 0).strip() for r in rows)
            p99 = ", ".join(_cell(r["p99_ms"], 0, 2).strip() for r in rows)
            steal = ", ".join(_cell(r["steal_s"], 0, 2).strip() for r in rows)
            cpu = ", ".join(_cell(r["impl_lifetime_cpu_s"], 0, 2).strip() for r in rows)
            lines.append(
                f"  {s['case']:<8} {impl:<13} frames/s [{fps}]  p99 ms [{p99}]  "
                f"process CPU s [{cpu}]  host steal s [{steal}]"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------- start-up


def byte_compile() -> None:
    """Write colo_proxy's .pyc files, as installing a wheel does (compileall writes them
    even under PYTHONDONTWRITEBYTECODE=1, which only stops the interpreter doing it)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "colo_proxy")],
                   check=True, stdout=subprocess.DEVNULL)


def _start_listen_stop(cmd: list[str], ready: list[str]) -> float:
    """Process CPU seconds of ``cmd`` started, until every ``ready`` path exists, then SIGTERM."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not all(os.path.exists(p) for p in ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def startup_cpu(pure: bool, runs: int = 5) -> list[float]:
    """Process CPU seconds of `colo-proxy run` started, listening on its sockets, then stopped."""
    out = []
    module = PURE_MODULE if pure else "colo_proxy.cli"
    for _ in range(runs):
        with tempfile.TemporaryDirectory(dir="/tmp") as d:
            cmd = [sys.executable, "-m", module, "run", "--log-level", "warning",
                   "--primary-in", f"unix:{d}/p,server", "--secondary-in", f"unix:{d}/s,server",
                   "--outdev", f"unix:{d}/o,server", "--notify-dev", f"unix:{d}/n,server"]
            out.append(_start_listen_stop(cmd, [f"{d}/s"]))
    return out


def qemu_startup_cpu(qemu: str, runs: int = 5) -> list[float]:
    """Process CPU seconds of QEMU with the harness's colo-compare objects, started, listening on
    its chardevs, then stopped: colo-compare's start-up, measured as ``startup_cpu`` measures
    colo-proxy's (the harness's command line: -machine none, four socket chardevs, an
    iothread, the colo-compare object)."""
    out = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(dir="/tmp") as d:
            cmd = [qemu, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
                   "-name", "colo-harness,debug-threads=on",
                   "-qmp", f"unix:{d}/qmp,server=on,wait=off"]
            for cid in ("pin", "sin", "out", "ntf"):
                cmd += ["-chardev", f"socket,id={cid},path={d}/{cid},server=on,wait=off"]
            cmd += ["-object", "iothread,id=iothread0", "-object",
                    "colo-compare,id=comp0,primary_in=pin,secondary_in=sin,outdev=out,"
                    "iothread=iothread0,notify_dev=ntf"]
            out.append(_start_listen_stop(cmd, [f"{d}/{n}" for n in
                                                ("qmp", "pin", "sin", "out", "ntf")]))
    return out


def steady_state(summaries: list[dict[str, Any]], starts: dict[str, float]) -> str:
    """Whole-life CPU minus the implementation's start-up alone (both measured the same way):
    what the traffic itself cost, beside (never instead of) the whole-life figure."""
    lines = ["steady state (median whole-life CPU minus median start-up alone; derived, "
             "not measured in the same process):"]
    for s in summaries:
        per = {}
        for impl in (QEMU, PROXY):
            med = s[impl]["median"]
            released = min(row["released"] for row in s[impl]["runs"])
            if med["cpu_s"] is None or not released:
                continue
            cpu = med["cpu_s"] - starts[impl]
            per[impl] = cpu / released * 1e6
            lines.append(f"  {s['case']:<8} {impl:<13} {cpu:6.3f} s  {per[impl]:8.2f} us/frame")
        if len(per) == 2 and per[QEMU] > 0:
            lines.append(f"  {s['case']:<8} {'ratio cp/cc':<13} {per[PROXY] / per[QEMU]:6.2f}x")
        s["steady_state_us_frame"] = per
    return "\n".join(lines)


# ---------------------------------------------------------------- core memory per flow


def flows_memory(flows: int, payload_len: int = 1448, window: int = 32) -> dict[str, float]:
    """Traced memory the core keeps for `flows` active TCP flows.

    Every flow gets a SYN-ACK and one data segment on both sides, fed through
    ``Proxy.feed_many`` in windows of `window` frames per side, as the harness
    interleaves them.  The frames are built inside the traced window and
    dropped by the caller's side once fed, so what is still allocated at the
    end is what the core holds: flow state, and any frame it keeps a
    reference to.
    """
    from colo_proxy.core.config import Config
    from colo_proxy.core.events import Side
    from colo_proxy.core.proxy import Proxy
    from colo_proxy.testing.synth import TcpServerStream

    payload = bytes(i & 0xFF for i in range(payload_len))
    proxy = Proxy(Config())
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    released = 0
    now = 0.0
    for phase in ("synack", "data"):
        for start in range(0, flows, window):
            for side in (Side.PRIMARY, Side.SECONDARY):
                batch = []
                for c in range(start, min(start + window, flows)):
                    stream = TcpServerStream(
                        dst=bytes((10, 1 + (c >> 16), (c >> 8) & 0xFF, c & 0xFF)),
                        dport=40000 + c % 25000,
                        isn=(c * 7777777) & 0xFFFFFFFF,
                    )
                    frame = stream.synack() if phase == "synack" else stream.data(0, payload)
                    batch.append((frame, 0))
                proxy.feed_many(side, batch, now)
                del batch
                released += len(proxy.take_output().released)
                now += 1e-5
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = current - base
    return {
        "flows": flows,
        "released": released,
        "held_frames": proxy.held_frames(),
        "bytes": held,
        "bytes_per_flow": held / flows,
        "mib_per_10k_flows": held / flows * 10_000 / 2**20,
        "peak_mib": (peak - base) / 2**20,
    }


def _build_kind() -> str:
    res = subprocess.run([sys.executable, "-c", "from colo_proxy.core import build_kind; "
                          "print(build_kind())"], capture_output=True, text=True)
    return res.stdout.strip() or "unknown"


# ---------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--harness", default=DEFAULT_HARNESS)
    p.add_argument("--out", default="/tmp/bench-vs-colo-compare")
    p.add_argument("--repeat", type=int, default=3, help="runs per implementation and case")
    p.add_argument("--only", help="comma-separated case keys: " + ",".join(c[0] for c in CASES))
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    p.add_argument("--proxy-args", default="", help="extra colo-proxy run arguments")
    p.add_argument("--flows", type=int, default=10_000, help="flows for the core memory figure")
    p.add_argument("--no-flows-memory", action="store_true")
    p.add_argument("--flows-memory-only", action="store_true")
    p.add_argument("--pure", action="store_true",
                   help="run the proxy on the pure-Python build (where the compiled one is built)")
    p.add_argument("--no-bytecode", action="store_true",
                   help="do not byte-compile colo_proxy first (every start compiles its source "
                        "when no .pyc exists and PYTHONDONTWRITEBYTECODE is set)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    summaries: list[dict[str, Any]] = []
    if not args.no_bytecode:
        byte_compile()
    if not args.flows_memory_only:
        starts = startup_cpu(args.pure)
        qemu_starts = qemu_startup_cpu(args.qemu)
        only = set(args.only.split(",")) if args.only else None
        selected = [c for c in cases(args.harness) if only is None or c.key in only]
        started = time.monotonic()
        for case in selected:
            summaries.append(
                bench_case(args.harness, out, case, args.repeat, args.qemu, args.proxy_args,
                           args.pure)
            )
            (out / "summary.json").write_text(json.dumps(summaries, indent=1))
            print(f"  {case.key} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
        print(
            f"colo-proxy (cp) vs QEMU colo-compare (cc), harness {args.harness}, "
            f"medians of {args.repeat} run(s) each, {os.cpu_count()} CPUs; colo-proxy build: "
            f"{'pure' if args.pure else _build_kind()}"
            f"{', no .pyc' if args.no_bytecode else ''}"
        )
        print(table(summaries))
        print("per run:")
        print(runs_detail(summaries))
        print(f"colo-proxy run start-up alone (start, listen, SIGTERM): process CPU s median "
              f"{statistics.median(starts):.3f} [{', '.join(f'{c:.3f}' for c in starts)}]")
        print(f"colo-compare (QEMU) start-up alone (start, listen, SIGTERM): process CPU s median "
              f"{statistics.median(qemu_starts):.3f} "
              f"[{', '.join(f'{c:.3f}' for c in qemu_starts)}]")
        print(steady_state(summaries, {QEMU: statistics.median(qemu_starts),
                                       PROXY: statistics.median(starts)}))
        (out / "startup.json").write_text(json.dumps({PROXY: starts, QEMU: qemu_starts}))
        (out / "summary.json").write_text(json.dumps(summaries, indent=1))
    if not args.no_flows_memory:
        mem = flows_memory(args.flows)
        print(
            f"core memory, {mem['flows']:,.0f} active TCP flows (SYN-ACK + one matched "
            f"1448-byte segment per side each, Proxy.feed_many, tracemalloc): "
            f"{mem['mib_per_10k_flows']:.2f} MiB per 10,000 flows "
            f"({mem['bytes_per_flow']:,.0f} B/flow; peak during the feed "
            f"{mem['peak_mib']:.2f} MiB; released {mem['released']:,.0f}, "
            f"held {mem['held_frames']:,.0f})"
        )
        (out / "flows_memory.json").write_text(json.dumps(mem, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
