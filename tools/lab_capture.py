#!/usr/bin/env python3
"""Record primary/secondary captures of two real, unmodified Linux TCP stacks running redis.

Two isolated set-ups are built from network namespaces, one per "guest":

    pri-client (10.77.0.2) --veth-- pri-server (10.77.0.1, redis-server)
    sec-client (10.77.0.2) --veth-- sec-server (10.77.0.1, redis-server)

Addressing and MAC addresses are identical inside each pair (as for a COLO primary and
secondary VM).  Both clients run the same deterministic RESP workload from the same source port
on the same schedule (one command every 50 ms).  ``tcpdump -w`` on each server-side veth records
both directions.  The stacks pick their own ISNs, TCP timestamps and IP IDs: that is the point.
Linux derives ISNs and timestamp offsets from a per-boot secret plus a clock, so two runs at the
same instant would get nearly equal values; the secondary therefore runs ``--secondary-lag``
seconds (default 1.5) later and its capture's timestamps are shifted back by exactly that
(frame bytes untouched), so the two captures line up in time for replay.

Outputs (guest = server = 10.77.0.1, replay needs ``--guest 10.77.0.1``):

* ``pcaps/redis-real/``: both redis servers hold the same data -> no divergence.
* ``pcaps/redis-real-diverge/``: the secondary's redis was seeded with a different value for
  one key, so the final GET's answer differs.  The expected payload-divergence offset is found
  by reassembling both server -> client streams and locating the first differing byte.  That
  GET is the last server output in the capture (tcpdump stops before the connection closes),
  so no post-checkpoint secondary frames exist that would need the primary's sequence numbers.

``expected.json`` is computed here from the captures: ``released_frames`` is the number of
server -> client frames in primary.pcap.  Requires root, iproute2, tcpdump and redis-server.
Namespaces and processes are removed even when something fails.

Usage: ``sudo python3 tools/lab_capture.py [--out pcaps] [--variant redis-real ...]``

Built on this lab: tools/lab_capture_indep.py (independent recordings) and
tools/lab_capture_noise.py (servers that are not deterministic: nginx ``Date:``, TLS, redis
TIME/INFO, and a deterministic bulk transfer; the golden cases of issues 11 and 14).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dpkt

SERVER_IP = "10.77.0.1"
CLIENT_IP = "10.77.0.2"
SERVER_MAC = "52:54:00:77:00:01"
CLIENT_MAC = "52:54:00:77:00:02"
REDIS_PORT = 6379
CLIENT_PORT = 40777
SEEDED_KEY = "colo:seeded"
SEED_VALUES = {"primary": "alpha-1234", "secondary": "alpha-1234"}
DIVERGE_SECONDARY_VALUE = "alpha-1235"
SLOT_S = 0.05  # one command every 50 ms
WRAP = 2**32


def workload(final_quit: bool) -> list[list[bytes]]:
    """The fixed command sequence every client sends (RESP arrays of bulk strings)."""
    big = bytes((65 + (i * 7) % 26) for i in range(2500))  # 2500 bytes: several segments
    cmds: list[list[bytes]] = [
        [b"PING"],
        [b"SET", b"colo:k1", b"hello world"],
        [b"GET", b"colo:k1"],
        [b"INCR", b"colo:counter"],
        [b"INCR", b"colo:counter"],
        [b"INCRBY", b"colo:counter", b"40"],
        [b"RPUSH", b"colo:list", b"a", b"bb", b"ccc", b"dddd", b"eeeee"],
        [b"LRANGE", b"colo:list", b"0", b"-1"],
        [b"SET", b"colo:big", big],
        [b"GET", b"colo:big"],
        [b"STRLEN", b"colo:big"],
        [b"LRANGE", b"colo:list", b"1", b"3"],
        [b"DEL", b"colo:k1"],
        [b"GET", b"colo:k1"],
        [b"GET", SEEDED_KEY.encode()],
    ]
    if final_quit:
        cmds.append([b"QUIT"])
    return cmds


def resp_encode(args: Sequence[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def resp_reply_end(buf: bytes, pos: int = 0) -> int | None:
    """Index just past one complete RESP reply starting at ``pos`` (None if incomplete)."""
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        return None
    kind, head = buf[pos : pos + 1], buf[pos + 1 : eol]
    if kind in (b"+", b"-", b":"):
        return eol + 2
    if kind == b"$":
        n = int(head)
        end = eol + 2 + n + 2
        return eol + 2 if n < 0 else (end if len(buf) >= end else None)
    if kind == b"*":
        p: int | None = eol + 2
        for _ in range(max(0, int(head))):
            p = resp_reply_end(buf, p) if p is not None else None
            if p is None:
                return None
        return p
    raise ValueError(f"bad RESP reply {buf[pos:pos + 20]!r}")


def run_client(start_at: float, final_quit: bool) -> None:
    """Client mode (runs inside a client namespace): the deterministic workload."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((CLIENT_IP, CLIENT_PORT))
    time.sleep(max(0.0, start_at - time.time()))
    sock.connect((SERVER_IP, REDIS_PORT))
    for i, cmd in enumerate(workload(final_quit)):
        time.sleep(max(0.0, start_at + (i + 1) * SLOT_S - time.time()))
        sock.sendall(resp_encode(cmd))
        buf = b""
        while resp_reply_end(buf) is None:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
        print(i, cmd[0].decode(), buf[:60], flush=True)
    if final_quit:
        sock.recv(1)  # wait for the server's FIN
    else:
        print("workload-done", flush=True)
        sys.stdin.readline()  # hold the connection open until the capture has stopped
    sock.close()


# --------------------------------------------------------------------------- lab set-up


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


def nsexec(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


@dataclass
class Lab:
    """Namespaces and processes this tool created; ``close`` removes them."""

    prefix: str
    workdir: Path
    namespaces: list[str]
    procs: list[subprocess.Popen[bytes]]

    def ns(self, side: str, role: str) -> str:
        return f"{self.prefix}{side}-{role}"

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs.clear()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


def build_pair(lab: Lab, side: str) -> str:
    """Create <side>-server / <side>-client with a veth pair; returns the server veth name."""
    srv, cli = lab.ns(side, "server"), lab.ns(side, "client")
    for ns in (srv, cli):
        sh("ip", "netns", "del", ns, check=False)  # left over from an earlier crash
        sh("ip", "netns", "add", ns)
        lab.namespaces.append(ns)
        sh(*nsexec(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"))
        sh(*nsexec(ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"))
        sh(*nsexec(ns, "ip", "link", "set", "lo", "up"))
    sveth, cveth = f"{side}-srv", f"{side}-cli"
    sh(*nsexec(srv, "ip", "link", "add", sveth, "address", SERVER_MAC, "type", "veth", "peer",
               "name", cveth, "address", CLIENT_MAC, "netns", cli))
    sh(*nsexec(srv, "ip", "addr", "add", f"{SERVER_IP}/24", "dev", sveth))
    sh(*nsexec(cli, "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", cveth))
    sh(*nsexec(srv, "ip", "link", "set", sveth, "up"))
    sh(*nsexec(cli, "ip", "link", "set", cveth, "up"))
    # Static neighbours: no ARP in the capture window, identical on both sides.
    sh(*nsexec(srv, "ip", "neigh", "replace", CLIENT_IP, "lladdr", CLIENT_MAC, "dev", sveth,
               "nud", "permanent"))
    sh(*nsexec(cli, "ip", "neigh", "replace", SERVER_IP, "lladdr", SERVER_MAC, "dev", cveth,
               "nud", "permanent"))
    return sveth


def start_redis(lab: Lab, side: str, seed_value: str) -> None:
    srv = lab.ns(side, "server")
    rdir = lab.workdir / f"redis-{side}"
    rdir.mkdir()
    proc = subprocess.Popen(
        nsexec(srv, "redis-server", "--bind", SERVER_IP, "127.0.0.1", "--port",
               str(REDIS_PORT), "--save", "", "--appendonly", "no", "--protected-mode", "no",
               "--daemonize", "no", "--dir", str(rdir), "--logfile", str(rdir / "redis.log")),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.procs.append(proc)
    cli = nsexec(srv, "redis-cli", "-h", "127.0.0.1", "-p", str(REDIS_PORT))
    for _ in range(100):
        if sh(*cli, "PING", check=False).stdout.strip() == "PONG":
            break
        time.sleep(0.05)
    else:
        raise RuntimeError(f"redis-server in {srv} did not start")
    # Seeded over loopback, before tcpdump starts: never part of the capture.
    sh(*cli, "FLUSHALL")
    sh(*cli, "SET", SEEDED_KEY, seed_value)


def start_tcpdump(lab: Lab, side: str, veth: str, out: Path,
                  bpf: str = f"tcp port {REDIS_PORT}", buffer_kib: int = 0,
                  ) -> subprocess.Popen[bytes]:
    """tcpdump on the server veth; ``buffer_kib`` raises the kernel buffer for bulk runs."""
    extra = ["-B", str(buffer_kib)] if buffer_kib else []
    proc = subprocess.Popen(
        nsexec(lab.ns(side, "server"), "tcpdump", "-Z", "root", "-i", veth, "-w", str(out), "-U",
               "--immediate-mode", "-n", "--time-stamp-precision=micro", "-s", "0",
               *extra, bpf),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lab.procs.append(proc)
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    if "listening on" not in line:
        raise RuntimeError(f"tcpdump failed: {line}")
    return proc


def stop_tcpdump(lab: Lab, proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGINT)
    proc.wait(timeout=10)
    lab.procs.remove(proc)


@contextlib.contextmanager
def lab_session(prefix: str) -> Iterator[Lab]:
    with tempfile.TemporaryDirectory(prefix="colo-lab-") as tmp:
        lab = Lab(prefix, Path(tmp), [], [])
        old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            yield lab
        finally:
            lab.close()
            signal.signal(signal.SIGTERM, old)


def shift_pcap(data: bytes, shift_us: int) -> bytes:
    """Move every record timestamp of a microsecond libpcap file by ``shift_us``."""
    magic = struct.unpack_from("<I", data)[0]
    if magic != 0xA1B2C3D4:
        raise ValueError(f"expected a little-endian microsecond pcap, magic {magic:#x}")
    out = bytearray(data[:24])
    pos = 24
    while pos < len(data):
        sec, usec, incl, orig = struct.unpack_from("<IIII", data, pos)
        sec, usec = divmod(sec * 1_000_000 + usec + shift_us, 1_000_000)
        out += struct.pack("<IIII", sec, usec, incl, orig)
        out += data[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
    return bytes(out)


def capture(variant: str, out: Path, prefix: str, lag: float) -> dict[str, Any]:
    diverge = variant.endswith("diverge")
    seeds = dict(SEED_VALUES)
    if diverge:
        seeds["secondary"] = DIVERGE_SECONDARY_VALUE
    out.mkdir(parents=True, exist_ok=True)
    with lab_session(prefix) as lab:
        raw = {side: lab.workdir / f"{side}.pcap" for side in ("primary", "secondary")}
        dumps = {}
        for side, tag in (("primary", "pri"), ("secondary", "sec")):
            veth = build_pair(lab, tag)
            start_redis(lab, tag, seeds[side])
            dumps[side] = start_tcpdump(lab, tag, veth, raw[side])
        start_at = time.time() + 1.0
        clients = [
            subprocess.Popen(
                nsexec(lab.ns(tag, "client"), sys.executable, str(Path(__file__).resolve()),
                       "--client", repr(start_at + delay), *([] if diverge else ["--quit"])),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for tag, delay in (("pri", 0.0), ("sec", lag))
        ]
        lab.procs.extend(clients)
        logs = ["", ""]
        if diverge:
            # The diverging GET is the last exchange: stop recording before the close, whose
            # secondary frames would carry the secondary's own (not rebased) sequence numbers.
            for k, c in enumerate(clients):
                assert c.stdout is not None
                for raw_line in c.stdout:
                    logs[k] += raw_line.decode()
                    if raw_line.startswith(b"workload-done"):
                        break
                else:
                    raise RuntimeError(f"client failed:\n{logs[k]}")
            time.sleep(0.5)
            for side in ("primary", "secondary"):
                stop_tcpdump(lab, dumps[side])
        for k, c in enumerate(clients):
            logs[k] += c.communicate(b"\n", timeout=60)[0].decode()
            lab.procs.remove(c)
            if c.returncode != 0:
                raise RuntimeError(f"client failed:\n{logs[k]}")
        if not diverge:
            time.sleep(0.5)  # let tcpdump write the last frames
            for side in ("primary", "secondary"):
                stop_tcpdump(lab, dumps[side])
        lag_us = round(lag * 1_000_000)
        (out / "primary.pcap").write_bytes(raw["primary"].read_bytes())
        (out / "secondary.pcap").write_bytes(shift_pcap(raw["secondary"].read_bytes(), -lag_us))
    result = write_expected(out, diverge, lag)
    if diverge:
        model_checkpoint(out, result["expected"]["divergences"][0]["offset"])
        result = write_expected(out, diverge, lag, first_known=result["expected"])
    return result


def _server_frames(path: Path) -> list[tuple[float, bytes, int | None]]:
    """(time, frame, stream offset of the first payload byte or None) for each frame."""
    out: list[tuple[float, bytes, int | None]] = []
    isn: int | None = None
    with path.open("rb") as f:
        for ts, buf in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(buf)
            ip = eth.data
            off = None
            if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.tcp.TCP) \
                    and socket.inet_ntoa(ip.src) == SERVER_IP:
                tcp = ip.data
                if tcp.flags & dpkt.tcp.TH_SYN:
                    isn = tcp.seq
                elif isn is not None:
                    off = (tcp.seq - isn - 1) % WRAP
                    out.append((ts, bytes(buf), off if tcp.data else None))
                    continue
                out.append((ts, bytes(buf), None))
                continue
            out.append((ts, bytes(buf), -1))  # -1: client frame
    return out


def model_checkpoint(out: Path, first: int) -> None:
    """Make the secondary capture what COLO would show after the divergence.

    A real checkpoint turns the secondary into a copy of the primary, so from
    then on it sends what the primary sends, with the primary's sequence
    numbers.  Two independent redis hosts cannot do that, so the secondary's
    guest frames after the divergence are replaced by the primary's own
    frames sent after that moment (200 us later), and its client frames kept.
    """
    pri = _server_frames(out / "primary.pcap")
    sec = _server_frames(out / "secondary.pcap")

    def carrier_time(frames: list[tuple[float, bytes, int | None]]) -> float:
        for ts, buf, off in frames:
            if off is not None and off >= 0:
                plen = len(dpkt.ethernet.Ethernet(buf).data.data.data)
                if off <= first < off + plen:
                    return float(ts)
        raise RuntimeError("no frame carries the diverging byte")

    t_div = max(carrier_time(pri), carrier_time(sec))
    kept = [(ts, buf) for ts, buf, off in sec if off == -1 or ts <= t_div]
    copied = [(ts + 0.0002, buf) for ts, buf, off in pri if off != -1 and ts > t_div]
    with (out / "secondary.pcap").open("wb") as f:
        writer = dpkt.pcap.Writer(f)
        for ts, buf in sorted(kept + copied, key=lambda x: x[0]):
            writer.writepkt(buf, ts=ts)


# --------------------------------------------------------------------------- analysis


@dataclass
class Seen:
    frames: int
    server_frames: int
    server_isn: int | None
    client_isn: int | None
    stream: bytes  # server -> client bytes by offset from the server ISN


def analyse(path: Path) -> Seen:
    frames = server_frames = 0
    server_isn: int | None = None
    client_isn: int | None = None
    segs: list[tuple[int, bytes]] = []
    with path.open("rb") as f:
        for _ts, buf in dpkt.pcap.Reader(f):
            frames += 1
            eth = dpkt.ethernet.Ethernet(buf)
            ip = eth.data
            if not isinstance(ip, dpkt.ip.IP) or not isinstance(ip.data, dpkt.tcp.TCP):
                continue
            tcp = ip.data
            from_server = socket.inet_ntoa(ip.src) == SERVER_IP
            if from_server:
                server_frames += 1
                if tcp.flags & dpkt.tcp.TH_SYN:
                    server_isn = tcp.seq
                elif server_isn is not None and tcp.data:
                    segs.append(((tcp.seq - server_isn - 1) % WRAP, bytes(tcp.data)))
            elif tcp.flags & dpkt.tcp.TH_SYN:
                client_isn = tcp.seq
    size = max((o + len(d) for o, d in segs), default=0)
    stream = bytearray(size)
    for o, d in segs:
        stream[o : o + len(d)] = d
    return Seen(frames, server_frames, server_isn, client_isn, bytes(stream))


def write_expected(out: Path, diverge: bool, lag: float,
                   first_known: dict[str, Any] | None = None) -> dict[str, Any]:
    pri, sec = analyse(out / "primary.pcap"), analyse(out / "secondary.pcap")
    n = min(len(pri.stream), len(sec.stream))
    first = next((i for i in range(n) if pri.stream[i] != sec.stream[i]), None)
    if first_known is not None:  # after model_checkpoint the streams no longer line up
        first = first_known["divergences"][0]["offset"]
    if diverge and first is None:
        raise RuntimeError("diverge variant: server streams do not differ")
    if not diverge and (first is not None or pri.stream != sec.stream):
        raise RuntimeError(f"server streams differ at {first}")
    what = ("the secondary redis answers the last GET differently (seeded "
            f"{SEEDED_KEY}={DIVERGE_SECONDARY_VALUE!r} instead of {SEED_VALUES['primary']!r}); "
            "after the divergence the secondary's guest frames are the primary's, as after "
            "a real checkpoint (see model_checkpoint)"
            if diverge else "same redis workload, same answers -> no divergence")
    expected = {
        "description": f"real Linux TCP stacks + redis-server in namespaces; {what}; "
                       f"the secondary ran {lag:g} s later, its timestamps shifted back by that",
        "args": ["--guest", SERVER_IP],
        "primary_frames": pri.frames,
        "secondary_frames": sec.frames,
        "released_frames": pri.server_frames,
        "held_frames": 0,
        "divergences": [{"kind": "payload", "offset": first}] if diverge else [],
        "checkpoint_reasons": ["divergence"] if diverge else [],
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    return {
        "expected": expected,
        "primary": {"server_isn": pri.server_isn, "client_isn": pri.client_isn,
                    "server_frames": pri.server_frames, "stream_bytes": len(pri.stream)},
        "secondary": {"server_isn": sec.server_isn, "client_isn": sec.client_isn,
                      "server_frames": sec.server_frames, "stream_bytes": len(sec.stream)},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent
                        / "pcaps", help="output directory (default: the repo's pcaps/)")
    parser.add_argument("--variant", action="append",
                        choices=["redis-real", "redis-real-diverge"],
                        help="capture only this variant (repeatable; default: both)")
    parser.add_argument("--ns-prefix", default="", help="prefix for namespace names")
    parser.add_argument("--secondary-lag", type=float, default=1.5, metavar="S",
                        help="start the secondary workload S seconds later (so the kernels pick "
                        "unrelated ISNs and TCP timestamps) and shift its capture back by S")
    parser.add_argument("--client", type=float, metavar="START_AT", help=argparse.SUPPRESS)
    parser.add_argument("--quit", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client is not None:
        run_client(args.client, args.quit)
        return 0
    if os.geteuid() != 0:
        print("lab_capture needs root (network namespaces, tcpdump)", file=sys.stderr)
        return 2
    for variant in args.variant or ["redis-real", "redis-real-diverge"]:
        report = capture(variant, args.out / variant, args.ns_prefix, args.secondary_lag)
        print(variant, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
