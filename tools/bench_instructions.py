"""Instructions per frame in the core (valgrind), pure and compiled: the CPU regression guard.

Deterministic, unlike wall time: each case runs twice under callgrind in a
child process, once building its frames only and once building and feeding
them (Proxy.feed_many per same-side run, as `colo-proxy run` does); the
difference divided by the frames fed is the core's instructions per frame.
`--pure` loads the pure-Python core even where the compiled one is built
(colo_proxy.testing.purecore), so both are measured from one checkout.

    tools/bench_instructions.py                 # every case, pure and compiled
    tools/bench_instructions.py --case tcp64 --builds pure

Two cases measure what surrounds the core in ``colo-proxy run``: ``chardev``
is QEMU's record framing (FrameDecoder.feed over reads of 64 KiB, then
encode_frames of the released batch), per frame; ``startup`` is the
interpreter work of starting ``run`` (imports, parser, settings, the
Supervisor built), in instructions per start, over ``python -c pass``.

Two more measure the real process, ``python -m colo_proxy.cli run`` (with
``--notify-dev``, as tools/bench_vs_colo_compare.py starts it) under
callgrind, whole life: ``runstart`` is started, listening, SIGTERM (every
instruction of the process, ``python`` itself included; ``python -c pass`` is
printed beside it); ``runpaced`` is what one paced frame costs the whole host
path (uvloop's callbacks, the chardev decoder, the core, take_output, the
outdev write, timers): a feeder connects to the three sockets and, frame by
frame, writes one record to primary_in, one to secondary_in and waits for it
on outdev (lock step, so every frame is its own wake-ups, as at 1k frames/s);
the figure is (instructions with FRAMES frames - with 0 frames) / FRAMES.

    tools/bench_instructions.py --case runstart runpaced --builds compiled --frames 400
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from colo_proxy.testing.synth import TcpServerStream

CASES = {
    "tcp1448": "TCP 1448 B, 50 flows",
    "tcp64": "TCP 64 B, 50 flows",
    "udp1448": "UDP 1448 B, 50 flows",
    "mix10k": "TCP mix, 10k flows (4000 B each)",
    "mixconn": "whole connections as the harness's 10k-flow mix: SYN-ACK, ACK, 1448 + 1448 + "
               "1104 B, FIN, ACK each, round robin over FRAMES/14 connections",
    "chardev": "record framing, 1448 B TCP frames: decode 64 KiB reads, encode batches",
    "startup": "colo-proxy run start-up (per start, not per frame)",
    "runstart": "the real `colo-proxy run` process: start, listen, SIGTERM (whole process)",
    "runpaced": "the real `colo-proxy run`: one TCP 1448 B frame per side in lock step, "
                "whole host path per frame",
}
PROCESS_CASES = ("runstart", "runpaced")
"""Cases measured on the real `colo-proxy run` process rather than inside a child."""


def _stream_pairs(rng: random.Random, conns: int) -> list[tuple[TcpServerStream, TcpServerStream]]:
    """A primary and a secondary stream per connection, with ISNs 100000 apart."""
    from colo_proxy.testing.synth import TcpServerStream

    streams = []
    for c in range(conns):
        dst = bytes((10, 1 + (c >> 16), (c >> 8) & 0xFF, c & 0xFF))
        p = TcpServerStream(dst=dst, dport=20000 + c % 25000, isn=rng.randrange(2**32))
        s = TcpServerStream(dst=dst, dport=20000 + c % 25000, isn=(p.isn + 100000) % 2**32)
        streams.append((p, s))
    return streams


def build(case: str, frames: int) -> list[tuple[int, list[tuple[bytes, int]]]]:
    """Same-side runs of (frame, 0) for a case: 32 frames per side per burst."""
    from colo_proxy.testing.synth import ipv4_frame

    rng = random.Random(7)
    pri: list[bytes] = []
    sec: list[bytes] = []
    if case == "udp1448":
        block = bytes(rng.randrange(256) for _ in range(1448 * 8))
        for i in range(frames // 2):
            c = i % 50
            l4 = (20000 + c).to_bytes(2, "big") + (9).to_bytes(2, "big")
            payload = block[(i % 8) * 1448:(i % 8 + 1) * 1448]
            l4 += (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload
            frame = ipv4_frame(b"\x0a\0\0\x01", b"\x0a\0\0\x02", 17, l4, ident=i)
            pri.append(frame)
            sec.append(frame)
    elif case == "mixconn":
        conns = max(1, frames // 14)
        block = bytes(rng.randrange(256) for _ in range(4000))
        streams = _stream_pairs(rng, conns)
        def connection(t: TcpServerStream) -> list[bytes]:
            return [t.synack(), t.ack(0, 100), t.data(0, block[:1448], 100),
                    t.data(1448, block[1448:2896], 100), t.data(2896, block[2896:], 100),
                    t.fin(4000, 100), t.ack(4001, 101)]

        both = [(connection(p), connection(s)) for p, s in streams]
        for phase in range(7):  # round robin: every connection's first frame, then ...
            for p_frames, s_frames in both:
                pri.append(p_frames[phase])
                sec.append(s_frames[phase])
    else:
        seg, conns, per_conn = {"tcp1448": (1448, 50, 0), "tcp64": (64, 50, 0),
                                "mix10k": (1448, 10000, 3)}[case]
        per_conn = per_conn or max(1, frames // 2 // conns)
        block = bytes(rng.randrange(256) for _ in range(seg * 64))
        streams = _stream_pairs(rng, conns)
        pri = [p.synack() for p, _ in streams]
        sec = [s.synack() for _, s in streams]
        for i in range(per_conn):
            for p, s in streams:
                chunk = block[(i % 64) * seg:(i % 64 + 1) * seg]
                pri.append(p.data(i * seg, chunk))
                sec.append(s.data(i * seg, chunk))
    runs: list[tuple[int, list[tuple[bytes, int]]]] = []
    for i in range(0, len(pri), 32):
        runs.append((0, [(f, 0) for f in pri[i:i + 32]]))
        runs.append((1, [(f, 0) for f in sec[i:i + 32]]))
    return runs


def child(case: str, frames: int, feed: bool, pure: bool) -> None:
    if pure:
        from colo_proxy.testing.purecore import force_pure_core

        force_pure_core()
    if case == "startup":
        child_startup(feed)
        return
    if case == "chardev":
        child_chardev(frames, feed)
        return
    from colo_proxy.core import build_kind
    from colo_proxy.core.config import Config
    from colo_proxy.core.events import Side
    from colo_proxy.core.proxy import Proxy

    runs = build(case, frames)
    proxy = Proxy(Config())
    sides = (Side.PRIMARY, Side.SECONDARY)
    released = 0
    if feed:
        now = 0.0
        for side, run in runs:
            proxy.feed_many(sides[side], run, now)
            released += len(proxy.take_output().released)
            now += 1e-5
    fed = sum(len(run) for _, run in runs)
    print(f"{build_kind()} {fed} {released}")


def child_startup(start: bool) -> None:
    """What `colo-proxy run` does before its loop runs (``start``), else nothing."""
    kind = "-"
    if start:
        import tempfile as tf

        from colo_proxy.cli import build_parser
        from colo_proxy.config_args import config_from_args
        from colo_proxy.runtime import run_cli
        from colo_proxy.runtime.supervisor import Supervisor

        d = tf.mkdtemp(dir="/tmp")
        argv = ["run", "--primary-in", f"unix:{d}/p,server", "--secondary-in",
                f"unix:{d}/s,server", "--outdev", f"unix:{d}/o,server"]
        try:
            parser = build_parser(argv)  # type: ignore[call-arg,unused-ignore]
        except TypeError:  # before build_parser took argv (to compare with older trees)
            parser = build_parser()  # type: ignore[call-arg,unused-ignore]
        args = parser.parse_args(argv)
        values = run_cli.run_values(args)
        config = config_from_args(args, extra_keys=frozenset(run_cli.RUN_KEYS) | {"run"})

        async def build() -> None:
            Supervisor(config, run_cli.settings_from_values(values))

        import asyncio

        asyncio.run(build())
        os.rmdir(d)
        proxy_file = sys.modules["colo_proxy.core.proxy"].__file__ or ""
        kind = "pure" if proxy_file.endswith(".py") else "compiled"
    print(f"{kind} 1 0")


def child_chardev(frames: int, feed: bool) -> None:
    """Decode ``frames`` 1448-byte records from 64 KiB reads and encode them back in batches."""
    from colo_proxy.core import build_kind
    from colo_proxy.core.framing import FrameDecoder, encode_frames

    runs = build("tcp1448", frames)
    records = [f for side, run in runs if side == 0 for f in run]
    wire = encode_frames(records, False)
    chunks = [wire[i:i + 65536] for i in range(0, len(wire), 65536)]
    out = 0
    if feed:
        dec = FrameDecoder(False)
        for chunk in chunks:
            got = dec.feed(chunk)
            if got:
                encode_frames(got, False)
                out += len(got)
    print(f"{build_kind()} {len(records)} {out}")


def _wait_for(path: str, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"colo-proxy run did not listen on {path}")
        time.sleep(0.05)


def _read_records(sock: socket.socket, want: int, buf: bytearray) -> bytearray:
    """Read from outdev until ``want`` whole records (4-byte length + data) arrived."""
    while True:
        got, at = 0, 0
        while at + 4 <= len(buf):
            n = int.from_bytes(buf[at:at + 4], "big")
            if at + 4 + n > len(buf):
                break
            at += 4 + n
            got += 1
        if got >= want:
            return buf[at:]
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("outdev closed")
        buf += chunk


def process_instructions(case: str, frames: int, pure: bool) -> tuple[int, str]:
    """Whole-life instructions of `colo-proxy run` under callgrind; and its build kind."""
    from colo_proxy.core.framing import encode_frames

    module = "colo_proxy.testing.purecore" if pure else "colo_proxy.cli"
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        out = Path(d) / "callgrind.out"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
               "-m", module, "run", "--log-level", "warning", "--compare-timeout", "3",
               "--primary-in", f"unix:{d}/p,server", "--secondary-in", f"unix:{d}/s,server",
               "--outdev", f"unix:{d}/o,server", "--notify-dev", f"unix:{d}/n,server"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_for(f"{d}/s", proc)
            if case == "runpaced":
                socks = {}
                for name in ("o", "p", "s"):
                    sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sk.connect(f"{d}/{name}")
                    socks[name] = sk
                rng = random.Random(7)
                block = bytes(rng.randrange(256) for _ in range(1448 * 64))
                (p, s), = _stream_pairs(rng, 1)
                buf = bytearray()
                for i in range(frames + 1):  # the SYN-ACK first, then `frames` data segments
                    if i == 0:
                        pair = (p.synack(), s.synack())
                    else:
                        chunk = block[(i % 64) * 1448:(i % 64 + 1) * 1448]
                        pair = (p.data((i - 1) * 1448, chunk), s.data((i - 1) * 1448, chunk))
                    socks["p"].sendall(encode_frames([(pair[0], 0)], False))
                    socks["s"].sendall(encode_frames([(pair[1], 0)], False))
                    buf = _read_records(socks["o"], 1, buf)
                for sk in socks.values():
                    sk.close()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        m = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
        if m is None:
            raise RuntimeError(f"no totals in the callgrind output: {err.decode()[-500:]}")
        return int(m.group(1)), err.decode()[-300:]


def callgrind(args: list[str]) -> tuple[int, str]:
    """Total instructions of a child run, and what it printed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, __file__, *args],
            capture_output=True, text=True, check=True,
        )
        m = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
        if m is None:
            raise RuntimeError("no totals in the callgrind output")
        return int(m.group(1)), proc.stdout.strip()


def process_case(case: str, frames: int, pure: bool) -> float:
    """Print and return a process case's figure (instructions per start, or per frame)."""
    from colo_proxy.core import build_kind

    kind = "pure" if pure else build_kind()
    if case == "runstart":
        total, _ = process_instructions(case, 0, pure)
        bare, _ = callgrind_cmd([sys.executable, "-c", "pass"])
        print(f"{case:8} {kind:8} {total:13,} instr/process  (python -c pass: {bare:,})",
              flush=True)
        return float(total)
    base, _ = process_instructions(case, 0, pure)
    total, _ = process_instructions(case, frames, pure)
    per = (total - base) / frames
    print(f"{case:8} {kind:8} {per:10,.0f} instr/frame  ({frames} frames in lock step; "
          f"process {total:,}, with none {base:,})", flush=True)
    return per


def callgrind_cmd(cmd: list[str]) -> tuple[int, str]:
    """Total instructions of any command under callgrind, and what it printed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        proc = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                               *cmd], capture_output=True, text=True, check=True)
        m = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
        if m is None:
            raise RuntimeError("no totals in the callgrind output")
        return int(m.group(1)), proc.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--builds", nargs="+", choices=["pure", "compiled"],
                    default=["pure", "compiled"])
    ap.add_argument("--frames", type=int, default=20000, help="frames per case (both sides)")
    ap.add_argument("--child", nargs=4, metavar=("CASE", "FRAMES", "FEED", "PURE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        case, frames, feed, pure = args.child
        child(case, int(frames), feed == "1", pure == "1")
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 2
    if {"startup", *PROCESS_CASES} & set(args.case):
        # as installed: .pyc present (compileall writes them regardless of
        # PYTHONDONTWRITEBYTECODE), else every start compiles the sources
        import importlib.util

        spec = importlib.util.find_spec("colo_proxy")
        assert spec is not None and spec.submodule_search_locations is not None
        subprocess.run([sys.executable, "-m", "compileall", "-q",
                        *spec.submodule_search_locations], check=True, stdout=subprocess.DEVNULL)
    print(f"python {sys.version.split()[0]}; instructions per frame fed (callgrind, "
          f"feed minus build-only)")
    results: dict[tuple[str, str], float] = {}
    for case in args.case:
        for kind in args.builds:
            pure = "1" if kind == "pure" else "0"
            if case in PROCESS_CASES:
                results[(case, kind)] = process_case(case, args.frames, kind == "pure")
                continue
            base, _ = callgrind(["--child", case, str(args.frames), "0", pure])
            total, said = callgrind(["--child", case, str(args.frames), "1", pure])
            loaded, fed, released = said.split()
            if loaded != kind:
                print(f"{case}: asked for the {kind} core, got {loaded} (build it first)",
                      file=sys.stderr)
                return 1
            per = (total - base) / int(fed)
            results[(case, kind)] = per
            unit = "instr/start" if case == "startup" else "instr/frame"
            print(f"{case:8} {kind:8} {per:10,.0f} {unit}  ({fed} frames, "
                  f"{released} released)", flush=True)
    if set(args.builds) == {"pure", "compiled"}:
        for case in args.case:
            ratio = results[(case, "pure")] / results[(case, "compiled")]
            print(f"{case:8} pure/compiled {ratio:5.2f}x  {CASES[case]}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
