#!/usr/bin/env python3
"""Benchmark: write throughput and latency through the disk agent vs qemu-nbd on a plain file.

The client is ``qemu-img bench`` (QEMU's own NBD client) in both cases:
sequential 64 KiB writes and strided pseudo-random 4 KiB writes (a large odd
stride, wrapped by qemu-img, scatters them over the image), each at queue
depth 1 (latency = time per request) and a deeper queue (throughput).  The agent
is restarted for every run so each starts from an empty speculation buffer.
Also prints the time ``colo-disk-checkpoint`` takes to acknowledge (journal +
fsync) the buffer the last 64 KiB run left.

    python3 tools/bench_disk.py [--size-mib 512] [--mib 256] [--depth 16]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRIDE_4K = 4096 * 7919


@dataclass(frozen=True)
class Result:
    mib_s: float
    latency_us: float


def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early with {proc.returncode}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
                return
            except OSError:
                time.sleep(0.02)
    raise SystemExit(f"server socket {path} never came up")


@contextlib.contextmanager
def server(kind: str, workdir: Path, image: Path) -> Iterator[tuple[str, Path]]:
    """Start the agent or qemu-nbd on ``image``; yield (NBD URI, QMP socket or '')."""
    sock = workdir / f"{kind}.nbd"
    qmp = workdir / f"{kind}.qmp"
    for p in (sock, qmp):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    if kind == "agent":
        cmd = [sys.executable, "-m", "colo_proxy.disk", "--image", str(image),
               "--nbd", f"unix:{sock}", "--qmp", f"unix:{qmp}", "--log-level", "WARNING",
               "--state-dir", str(workdir / "state")]
    else:
        cmd = ["qemu-nbd", "-f", "raw", "-k", str(sock), "-x", "replication", "-t",
               "--cache=writeback", str(image)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_socket(sock, proc)
        yield f"nbd+unix:///replication?socket={sock}", qmp if kind == "agent" else Path()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir / "state", ignore_errors=True)


def bench(uri: str, size: int, count: int, depth: int, step: int) -> Result:
    out = subprocess.run(
        ["qemu-img", "bench", "-w", "-f", "raw", "-s", str(size), "-S", str(step),
         "-c", str(count), "-d", str(depth), uri],
        capture_output=True, text=True, check=True).stdout
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if m is None:
        raise SystemExit(f"unexpected qemu-img bench output: {out}")
    secs = float(m.group(1))
    return Result(mib_s=count * size / secs / (1 << 20), latency_us=secs / count * 1e6 * depth)


def checkpoint_seconds(qmp: Path) -> float:
    with socket.socket(socket.AF_UNIX) as s:
        f = s.makefile("rwb")
        s.connect(str(qmp))
        f.readline()
        f.write(b'{"execute": "qmp_capabilities"}\n')
        f.flush()
        f.readline()
        start = time.perf_counter()
        f.write(b'{"execute": "colo-disk-checkpoint", "arguments": {"epoch": 1}}\n')
        f.flush()
        reply = f.readline()
        took = time.perf_counter() - start
        if b'"return"' not in reply:
            raise SystemExit(f"checkpoint failed: {reply!r}")
        return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512, help="image size")
    ap.add_argument("--mib", type=int, default=256, help="data written per 64 KiB run")
    ap.add_argument("--depth", type=int, default=16, help="queue depth of throughput runs")
    args = ap.parse_args()
    for binary in ("qemu-img", "qemu-nbd"):
        if shutil.which(binary) is None:
            raise SystemExit(f"{binary} not found (apt-get install qemu-utils)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-disk-", dir="/tmp"))
    try:
        image = workdir / "disk.img"
        with open(image, "wb") as f:
            f.truncate(args.size_mib << 20)
        seq_count = (args.mib << 20) // 65536
        rnd_count = max(1, seq_count * 4)  # 1/4 of the bytes in 4 KiB requests
        cases = [
            ("seq 64KiB", 65536, seq_count, 1, 65536),
            ("seq 64KiB", 65536, seq_count, args.depth, 65536),
            ("rand 4KiB", 4096, rnd_count, 1, STRIDE_4K),
            ("rand 4KiB", 4096, rnd_count, args.depth, STRIDE_4K),
        ]
        rows = []
        ckpt = 0.0
        for name, size, count, depth, step in cases:
            got: dict[str, Result] = {}
            for kind in ("qemu-nbd", "agent"):
                with server(kind, workdir, image) as (uri, qmp):
                    got[kind] = bench(uri, size, count, depth, step)
                    if kind == "agent" and size == 65536 and depth > 1:
                        ckpt = checkpoint_seconds(qmp)
            rows.append((name, depth, got["agent"], got["qemu-nbd"]))
        print(f"{'workload':<10} {'depth':>5} {'agent MiB/s':>12} {'qemu-nbd MiB/s':>15} "
              f"{'ratio':>6} {'agent lat us':>13} {'qemu-nbd lat us':>16}")
        for name, depth, agent, ref in rows:
            print(f"{name:<10} {depth:>5} {agent.mib_s:>12.1f} {ref.mib_s:>15.1f} "
                  f"{agent.mib_s / ref.mib_s:>6.2f} {agent.latency_us:>13.1f} "
                  f"{ref.latency_us:>16.1f}")
        print(f"checkpoint ack of a {args.mib} MiB speculation buffer (journal + fsync): "
              f"{ckpt * 1000:.0f} ms")
        seq = [r for r in rows if r[0] == "seq 64KiB"]
        worst = min(a.mib_s / q.mib_s for _, _, a, q in seq)
        print(f"64 KiB sequential throughput ratio, worst depth: {worst:.2f} (target >= 0.50)")
        print("note: the agent holds writes in memory until a checkpoint; qemu-nbd writes "
              "the file's page cache")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
