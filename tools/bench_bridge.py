#!/usr/bin/env python3
"""`colo-proxy bridge` against a plain Linux bridge, alternately, in the same namespaces.

Builds one tools/bridge_lab.py lab (offloads off on every veth end) and, for
each of ``--repeat`` rounds, measures a plain Linux bridge between the client
and the primary, then `colo-proxy bridge` between client, primary and
secondary, with the same workloads:

* ICMP ping p50/p99 (``icmp-ping``);
* 64-byte TCP request/response on one connection: p50/p99 and round trips/s
  (``tcp-pingpong`` against ``tcp-echo`` in both guests);
* bulk TCP fetches of ``--size`` MB (Gbit/s of payload the client received);
* optionally redis-benchmark SET/GET with 50 clients and with 1 (``--redis``).

Printed: each round's figures as they come, then a table of medians with the
ratio proxy/plain and, for latencies, the time the proxy adds; the proxy's
ring drops, divergences and CPU; with ``--redis``, where the machine's CPU went
per request of the 50-client run (the primary's and the secondary's processes,
the proxy, the whole machine: this lab runs them all on the same CPUs).  A
transfer that goes silent for ``--idle`` seconds is a stall: it is printed at
once with the proxy's counters (asked for with SIGUSR1).  ``--stall-test N``
runs N consecutive bulk transfers through one proxy instead (``--hog`` keeps a
CPU busy beside it).  Figures, never assertions.

``--super-frames``: the proxy (this tree) runs with offloads ON on every veth
end, so the namespaces hand it TSO/GSO super-frames (it takes them whole, with
virtio_net_hdr); the plain bridge and ``--before-root`` still run with them
off, the baseline issue 12 defines, and a plain bridge with them on
(``plain-on``) is printed beside for context.  Ratios are to ``plain``.

Usage (root): ``python3 tools/bench_bridge.py [--repeat N] [--size MB] [--redis] [--hog]``
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bridge_lab import BridgeLab, available

ROOT = Path(__file__).resolve().parents[1]
BULK_PORT, ECHO_PORT, REDIS_PORT = 8080, 7070, 6379
CC = ""
"""The bulk servers' TCP congestion control ("": the namespace's default)."""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _namespace_cpu(ns: str) -> float:
    """CPU seconds of the processes now in network namespace ``ns`` (its guest's servers)."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    total = 0.0
    for pid in pids.split():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += _cpu_seconds(int(pid))
    return total


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent not idle since boot (/proc/stat)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _json_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    if not out.strip():
        raise RuntimeError(f"no result: {err.strip()}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


class Proxy:
    """`colo-proxy bridge` on the lab; its log read on a thread, its stats on demand."""

    def __init__(self, lab: BridgeLab, extra: list[str], root: Path = ROOT) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "colo_proxy.cli", "bridge", *lab.bridge_args(),
             "--log-level", "info", *extra],
            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 30
        while not any("bridge up" in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("proxy did not start:\n" + "\n".join(self.lines[-20:]))
            time.sleep(0.02)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def cpu(self) -> float:
        return _cpu_seconds(self.proc.pid)

    def stats(self) -> dict[str, Any]:
        """The proxy's counters now (SIGUSR1 makes it log them)."""
        seen = len(self.lines)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                if " stats {" in line:
                    stats: dict[str, Any] = json.loads(line.split(" stats ", 1)[1])
                    return stats
            time.sleep(0.02)
        return {}

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        report: dict[str, Any] = json.loads(self.lines[-1])["colo_proxy_report"]
        return report

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def summary(stats: dict[str, Any]) -> dict[str, Any]:
    """The counters that explain a stall or a slow run, from a stats dict or the report."""
    if not stats:
        return {"stats": "none (proxy did not answer SIGUSR1)"}
    core = stats.get("core", {})
    ports = {name: stats.get(name, {}) for name in ("client-if", "primary-if", "secondary-if")}
    keep = ("held_frames", "held_bytes", "divergences_by_kind", "limit_hits", "timeouts",
            "released_frames", "uncompared", "malformed")
    out: dict[str, Any] = {k: core[k] for k in keep if k in core}
    out["ports"] = {
        name: {k: v for k, v in port.items() if k in (
            "frames_in", "frames_out", "ring_drops", "gso_dropped", "send_deferred",
            "send_errors", "send_overflow_dropped", "pending_frames", "super_frames_in",
            "super_frames_out", "truncated_dropped", "send_oversize") and v}
        for name, port in ports.items()
    }
    out["supervisor"] = {k: v for k, v in stats.get("supervisor", {}).items() if v}
    return out


def ping(lab: BridgeLab, count: int) -> dict[str, float]:
    r = _json_line(lab.tool("client", "icmp-ping", "--host", lab.guest_ip, "--count",
                            str(count), "--interval", "0.005"), 120)
    return {"ping_p50_ms": r["p50_ms"], "ping_p99_ms": r["p99_ms"], "ping_lost": r["lost"]}


def pingpong(lab: BridgeLab, count: int) -> dict[str, float]:
    r = _json_line(lab.tool("client", "tcp-pingpong", "--host", lab.guest_ip, "--port",
                            str(ECHO_PORT), "--count", str(count), "--timeout", "10"), 300)
    if "error" in r:
        print(f"  ping-pong error: {r['error']}", flush=True)
    return {"pp_p50_ms": r["p50_ms"], "pp_p99_ms": r["p99_ms"], "pp_rate": r["rate"]}


def bulk(lab: BridgeLab, size: int, idle: float, proxy: Proxy | None,
         both: bool = False) -> dict[str, float]:
    """One fetch; a stall (silence for ``idle`` s) is printed at once with the counters."""
    roles = ("primary", "secondary") if proxy or both else ("primary",)
    args = ["tcp-server", "--size", str(size), "--port", str(BULK_PORT), "--timeout", "60",
            "--cc", CC]
    servers = [lab.tool(role, *args) for role in roles]
    for server in servers:
        assert server.stdout is not None
        server.stdout.readline()
    cpu0 = proxy.cpu() if proxy else 0.0
    t0 = time.monotonic()
    client = _json_line(lab.tool("client", "tcp-client", "--host", lab.guest_ip, "--port",
                                 str(BULK_PORT), "--size", str(size), "--timeout", "60",
                                 "--idle", str(idle)), 600)
    wall = time.monotonic() - t0
    cpu = (proxy.cpu() - cpu0) if proxy else 0.0
    stalled = not client.get("complete")
    if stalled:
        counters = summary(proxy.stats()) if proxy else {}
        print(f"  STALL: {client.get('received', 0):,} of {size:,} bytes, then {idle:.0f} s "
              f"of silence; counters {json.dumps(counters, sort_keys=True)}", flush=True)
    for server in servers:
        if server.poll() is None:
            server.kill()
        server.communicate()
    if stalled:
        lab.kill_tcp(BULK_PORT)
    seconds = float(client.get("seconds") or wall)
    return {"bulk_gbit_s": 0.0 if stalled else client["received"] * 8 / seconds / 1e9,
            "bulk_stalls": float(stalled), "bulk_cpu_pct": 100 * cpu / wall if wall else 0.0}


def redis(lab: BridgeLab, clients: int, requests: int,
          proxy: Proxy | None = None) -> dict[str, float]:
    """SET and GET rates; with 50 clients also where the machine's CPU went, per request.

    The machine is CPU-bound in this run: the client, both guests' servers
    and the proxy share its CPUs, and a plain bridge leaves the secondary
    idle.  So the CPU per request, split into the primary's and the
    secondary's processes and the proxy, shows how much of the gap is the
    proxy's and how much the secondary's own work (its share of the ceiling).
    """
    before = (_machine_busy(), _namespace_cpu(lab.ns["primary"]),
              _namespace_cpu(lab.ns["secondary"]), proxy.cpu() if proxy else 0.0)
    proc = lab.popen("client", ["redis-benchmark", "-h", lab.guest_ip, "-p", str(REDIS_PORT),
                                "-c", str(clients), "-n", str(requests), "-t", "set,get",
                                "--csv"])
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    after = (_machine_busy(), _namespace_cpu(lab.ns["primary"]),
             _namespace_cpu(lab.ns["secondary"]), proxy.cpu() if proxy else 0.0)
    rps = {row[0]: float(row[1]) for row in csv.reader(out.splitlines())
           if len(row) > 1 and row[0] in ("SET", "GET")}
    res = {f"redis{clients}_set": rps.get("SET", 0.0), f"redis{clients}_get": rps.get("GET", 0.0)}
    if clients == 50:
        per_request = 1e6 / (2 * requests)  # SET and GET: two runs of `requests` each
        for key, start, end in zip(CPU_KEYS, before, after, strict=True):
            res[key] = (end - start) * per_request
    return res


def workloads(lab: BridgeLab, args: argparse.Namespace, proxy: Proxy | None) -> dict[str, float]:
    # no connection of the previous mode lives on (a proxy stopped holding a FIN leaves the
    # guests resending it into the next one), and the client's first contact ARPs again
    for port in (BULK_PORT, ECHO_PORT, REDIS_PORT):
        lab.kill_tcp(port)
    lab.flush_neighbours("client")
    out = ping(lab, args.pings)
    out.update(pingpong(lab, args.pingpongs))
    for _ in range(args.bulk):
        for key, value in bulk(lab, args.size * 1_000_000, args.idle, proxy).items():
            out[key] = out.get(key, 0.0) + value / (1 if key == "bulk_stalls" else args.bulk)
    if args.redis:
        out.update(redis(lab, 50, args.redis_requests, proxy))
        out.update(redis(lab, 1, args.redis_requests // 10))
    return out


@contextlib.contextmanager
def guest_servers(lab: BridgeLab, with_redis: bool) -> Iterator[None]:
    """Echo servers (and redis) in both guests for the whole series."""
    procs = []
    try:
        for role in ("primary", "secondary"):
            procs.append(lab.tool(role, "tcp-echo", "--port", str(ECHO_PORT)))
            if with_redis:
                procs.append(lab.popen(role, ["redis-server", "--port", str(REDIS_PORT),
                                              "--save", "", "--appendonly", "no",
                                              "--protected-mode", "no"]))
        time.sleep(0.5)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()


@contextlib.contextmanager
def cpu_hog(on: bool) -> Iterator[None]:
    """One busy process beside the proxy (the machine is loaded)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        yield
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


ROWS = [
    ("ping p50 (ms)", "ping_p50_ms", "lat"), ("ping p99 (ms)", "ping_p99_ms", "lat"),
    ("64 B ping-pong p50 (ms)", "pp_p50_ms", "lat"),
    ("64 B ping-pong p99 (ms)", "pp_p99_ms", "lat"),
    ("64 B ping-pong rate (/s)", "pp_rate", "rate"), ("bulk TCP (Gbit/s)", "bulk_gbit_s", "rate"),
    ("redis 50 clients SET (rps)", "redis50_set", "rate"),
    ("redis 50 clients GET (rps)", "redis50_get", "rate"),
    ("redis 1 client SET (rps)", "redis1_set", "rate"),
    ("redis 1 client GET (rps)", "redis1_get", "rate"),
    ("redis 50: machine CPU per request (us)", "redis50_machine_us", "cpu"),
    ("redis 50: primary's processes (us)", "redis50_primary_us", "cpu"),
    ("redis 50: secondary's processes (us)", "redis50_secondary_us", "cpu"),
    ("redis 50: proxy (us)", "redis50_proxy_us", "cpu"),
]
CPU_KEYS = ("redis50_machine_us", "redis50_primary_us", "redis50_secondary_us",
            "redis50_proxy_us")


def table(runs: dict[str, list[dict[str, float]]]) -> None:
    """Medians per mode; each proxy mode's ratio to the plain bridge and the time it adds."""
    plain = runs["plain"]
    proxies = [m for m in runs if m != "plain"]
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    head = " | ".join(f"{m} | {m}/plain | {m} added" for m in proxies)
    print(f"\n| metric | plain bridge | {head} |")
    print("|---|---|" + "---|---|---|" * len(proxies))
    for label, key, kind in ROWS:
        if key not in plain[0]:
            continue
        a = med["plain"][key]
        cells = []
        for m in proxies:
            b = med[m][key]
            cells.append(f"{b:,.3f} | {b / a:.3f}" if a else f"{b:,.3f} | -")
            cells.append(f"{b - a:+.3f} ms" if kind == "lat"
                         else f"{b - a:+.1f} us" if kind == "cpu" else "")
        print(f"| {label} | {a:,.3f} | {' | '.join(cells)} |")
    for key in ("bulk_stalls", "ring_drops", "divergences", "super_frames_in", "proxy_cpu_s",
                "bulk_cpu_pct"):
        total = key in ("bulk_stalls", "ring_drops", "divergences", "super_frames_in")
        cells = []
        for m in proxies:
            values = [r.get(key, 0.0) for r in runs[m]]
            cells.append(f"{sum(values) if total else statistics.median(values):,.2f} | | ")
        what = "sum over rounds" if total else "median per round"
        print(f"| {key} ({what}) | {sum(r.get(key, 0.0) for r in plain) if total else '':} | "
              f"{' | '.join(cells)}|")


def series(lab: BridgeLab, args: argparse.Namespace, extra: list[str]) -> None:
    modes: dict[str, tuple[Path, list[str]] | None] = {"plain": None}
    offloads = {"plain": False, "plain-on": True, "before": False, "proxy": args.super_frames}
    if args.super_frames:
        modes["plain-on"] = None
    if args.before_root:
        modes["before"] = (Path(args.before_root).resolve(), [])
    modes["proxy"] = (ROOT, extra)
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for i in range(args.repeat):
        for mode, how in modes.items():
            lab.set_offloads(offloads[mode])
            r = plain_round(lab, args) if how is None else proxy_round(lab, args, *how)
            r["load_1min"] = os.getloadavg()[0]
            runs[mode].append(r)
            print(f"round {i + 1} {mode}: {json.dumps({k: round(v, 4) for k, v in r.items()})}",
                  flush=True)
    table(runs)
    loads = [r["load_1min"] for rs in runs.values() for r in rs]
    print(f"load average (1 min) after each round: {min(loads):.2f} to {max(loads):.2f}, "
          f"median {statistics.median(loads):.2f} on {os.cpu_count()} CPUs")


def plain_round(lab: BridgeLab, args: argparse.Namespace) -> dict[str, float]:
    lab.plain_up()
    try:
        time.sleep(0.3)
        return workloads(lab, args, None)
    finally:
        lab.plain_down()


def proxy_round(lab: BridgeLab, args: argparse.Namespace, root: Path,
                extra: list[str]) -> dict[str, float]:
    proxy = Proxy(lab, extra, root)
    try:
        cpu0 = proxy.cpu()
        r = workloads(lab, args, proxy)
        r["proxy_cpu_s"] = proxy.cpu() - cpu0
        report = proxy.stop()
    finally:
        proxy.kill()
    r["ring_drops"] = sum(report[p]["ring_drops"]
                          for p in ("client-if", "primary-if", "secondary-if"))
    r["super_frames_in"] = sum(report[p].get("super_frames_in", 0)
                               for p in ("client-if", "primary-if", "secondary-if"))
    kinds = report["core"]["divergences_by_kind"]
    r["divergences"] = sum(kinds.values())
    if kinds:
        lines = [line for line in proxy.lines if " divergence " in line]
        print(f"  divergences {json.dumps(kinds)}: {' / '.join(lines[:3])}", flush=True)
    return r


def stall_test(lab: BridgeLab, args: argparse.Namespace, extra: list[str]) -> None:
    lab.set_offloads(args.super_frames)
    proxy = Proxy(lab, extra, Path(args.before_root).resolve() if args.before_root else ROOT)
    done, stalls, rates, loads = 0, 0, [], []
    try:
        for i in range(args.stall_test):
            r = bulk(lab, args.size * 1_000_000, args.idle, proxy)
            done += 1
            stalls += int(r["bulk_stalls"])
            rates.append(r["bulk_gbit_s"])
            loads.append(os.getloadavg()[0])
            print(f"transfer {i + 1}: {r['bulk_gbit_s']:.3f} Gbit/s"
                  f"{' STALLED' if r['bulk_stalls'] else ''}", flush=True)
        report = proxy.stop()
    finally:
        proxy.kill()
    drops = sum(report.get(p, {}).get("ring_drops", 0)
                for p in ("client-if", "primary-if", "secondary-if"))
    print(f"stall test: {done} transfers of {args.size} MB, {stalls} stalls, median "
          f"{statistics.median(rates):.3f} Gbit/s (min {min(rates):.3f}, max "
          f"{max(rates):.3f}), {drops} ring drops; final counters "
          f"{json.dumps(summary(report), sort_keys=True)}; load average (1 min) "
          f"{min(loads):.2f} to {max(loads):.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds (plain, then proxy)")
    parser.add_argument("--size", type=int, default=200, metavar="MB", help="bytes per fetch")
    parser.add_argument("--bulk", type=int, default=1, help="bulk fetches per round")
    parser.add_argument("--pings", type=int, default=400)
    parser.add_argument("--pingpongs", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=5.0,
                        help="seconds of silence that make a transfer a stall")
    parser.add_argument("--redis", action="store_true", help="also redis-benchmark SET/GET")
    parser.add_argument("--redis-requests", type=int, default=20000)
    parser.add_argument("--cc", default="", help="bulk servers' TCP congestion control")
    parser.add_argument("--hog", action="store_true", help="a busy process beside the proxy")
    parser.add_argument("--stall-test", type=int, default=0, metavar="N",
                        help="N consecutive bulk transfers through one proxy, nothing else")
    parser.add_argument("--quick", action="store_true", help="20 MB, one round, few pings")
    parser.add_argument("--super-frames", action="store_true",
                        help="the proxy runs with offloads on (takes super-frames whole); "
                        "plain and --before-root stay off; plain-on is printed for context")
    parser.add_argument("--proxy-args", default="", help="extra `colo-proxy bridge` flags")
    parser.add_argument("--before-root", default="", metavar="DIR",
                        help="also run the colo-proxy in DIR (e.g. an export of main) each round; "
                        "with --stall-test, run only that one")
    args = parser.parse_args(argv)
    reason = available()
    if reason is not None:
        print(f"bench_bridge: {reason}", file=sys.stderr)
        return 2
    if args.quick:
        args.size, args.repeat, args.pings, args.pingpongs = 20, 1, 100, 200
    extra = args.proxy_args.split()
    global CC
    CC = args.cc
    with BridgeLab() as lab, guest_servers(lab, args.redis), cpu_hog(args.hog):
        how = ("offloads off, but ON for the proxy (super-frames) and plain-on"
               if args.super_frames else "offloads off")
        print(f"plain Linux bridge vs colo-proxy bridge {' '.join(extra)}; MTU 1500, {how}; "
              f"{args.size} MB fetches{', CPU hog' if args.hog else ''}", flush=True)
        if args.stall_test:
            stall_test(lab, args, extra)
        else:
            series(lab, args, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
