#!/usr/bin/env python3
"""Record two INDEPENDENT captures of real servers, as an operator would take them.

Uses the namespace lab of tools/lab_capture.py (one server/client namespace pair per side,
10.77.0.1 server, 10.77.0.2 client, same MACs, static neighbours, tcpdump on the server veth)
but, unlike it, records the two sides as two people would by hand: the secondary's workload
starts ``--secondary-lag`` seconds (default 3) after the primary's and its capture is NOT
shifted back, so the true clock offset (secondary minus primary) is that lag.  Each side's
kernel picks its own ISNs; lossy variants lose their own segments.

Variants (guest = server = 10.77.0.1, replay needs ``--guest 10.77.0.1``):

* ``nginx-real``: nginx serving the same static files (private config and prefix) on four
  keep-alive and one-shot connections; the ``Date:`` header is real non-determinism, and the
  2 MiB ``big.bin`` differs in one byte 1000 bytes before its end.  ``nginx-real-swapped``
  is the same pair with primary and secondary swapped (clock offset -3 s).
* ``redis-real-multi``: redis-server, four concurrent connections, per-connection keys,
  nothing time dependent -> identical answers.
* ``lossy-real``: redis GETs of a 1 MiB value through an htb rate limit with a small bfifo on
  each server veth's egress (different limits per side), so bursts tail-drop before tcpdump
  sees them and the capture shows the retransmissions; identical content.

Expected verdicts come from tshark's reassembly of both captures (tools/tshark_follow.py),
connections paired by client port (pinned per connection).  Requires root, iproute2, tc,
tcpdump, tshark, nginx and redis-server.

Usage: ``sudo python3 tools/lab_capture_indep.py [--out pcaps] [--variant NAME ...]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab_capture import (
    CLIENT_IP,
    REDIS_PORT,
    SERVER_IP,
    Lab,
    build_pair,
    lab_session,
    nsexec,
    resp_encode,
    resp_reply_end,
    sh,
    start_redis,
    start_tcpdump,
    stop_tcpdump,
)
from tshark_follow import expected_divergences

HTTP_PORT = 80
ATTEMPTS = 3
VARIANTS = ("nginx-real", "redis-real-multi", "lossy-real")
BIG_SIZE = 2 * 1024 * 1024
BIG_FLIP = BIG_SIZE - 1000  # the one byte of big.bin that differs between the two servers
LOSSY_VALUE = 1024 * 1024
FILE_MTIME = 1_767_225_600  # same Last-Modified / ETag on both servers
# lossy-real: server frames whose IP ID & mask == value are lost (1 in 32), per side.
LOSS_ID = {"pri": (0x0015, 0x001F), "sec": (0x000A, 0x001F)}
LOSS_GSO_SEGS = 3


class Incomplete(RuntimeError):
    """The recording itself failed (tcpdump lost frames, a hole, a late start): retry."""


@dataclass
class Conn:
    """One client connection of a workload: its pinned port, start time and requests."""

    port: int
    start: float  # seconds after the workload start
    requests: list[bytes] = field(default_factory=list)
    gap: float = 0.15  # seconds between requests


def http_get(path: str, close: bool = False) -> bytes:
    conn = "close" if close else "keep-alive"
    return f"GET {path} HTTP/1.1\r\nHost: {SERVER_IP}\r\nConnection: {conn}\r\n\r\n".encode()


def redis_cmds(*cmds: list[bytes]) -> list[bytes]:
    return [resp_encode(c) for c in cmds]


def plan(variant: str) -> tuple[int, list[Conn]]:
    """Server port and the connections of one variant's workload."""
    if variant == "nginx-real":
        return HTTP_PORT, [
            Conn(41001, 0.0, [http_get("/index.html"), http_get("/a.txt"),
                              http_get("/b.json", close=True)]),
            Conn(41002, 0.2, [http_get("/big.bin", close=True)]),
            Conn(41003, 0.9, [http_get("/index.html"), http_get("/missing", close=True)]),
            Conn(41004, 1.5, [http_get("/a.txt", close=True)]),
        ]
    if variant == "redis-real-multi":
        conns = []
        for k in range(4):
            key = f"colo:c{k}".encode()
            cmds = redis_cmds(
                [b"PING"], [b"SET", key, b"v" * (10 + 300 * k)], [b"GET", key],
                [b"INCRBY", key + b":n", str(k + 1).encode()], [b"INCR", key + b":n"],
                [b"RPUSH", key + b":l", b"a", b"bb", b"ccc"], [b"LRANGE", key + b":l", b"0", b"-1"],
                [b"APPEND", key, b"-tail"], [b"STRLEN", key], [b"GET", b"colo:seeded"],
                [b"QUIT"])
            conns.append(Conn(41101 + k, 0.05 * k, cmds, gap=0.07))
        return REDIS_PORT, conns
    if variant == "lossy-real":
        return REDIS_PORT, [Conn(41201, 0.0, redis_cmds([b"GET", b"colo:bulk"],
                                                        [b"GET", b"colo:bulk"], [b"QUIT"]),
                                 gap=1.0)]
    raise ValueError(variant)


# --------------------------------------------------------------------------- client side


def http_response_end(buf: bytes) -> int | None:
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    length = 0
    for line in buf[:head_end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    end = head_end + 4 + length
    return end if len(buf) >= end else None


def run_conn(conn: Conn, server_port: int, start_at: float, log: list[str]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((CLIENT_IP, conn.port))
    time.sleep(max(0.0, start_at + conn.start - time.time()))
    sock.connect((SERVER_IP, server_port))
    is_http = server_port == HTTP_PORT
    for i, req in enumerate(conn.requests):
        time.sleep(max(0.0, start_at + conn.start + (i + 1) * conn.gap - time.time()))
        sock.sendall(req)
        buf = b""
        while (http_response_end(buf) if is_http else resp_reply_end(buf)) is None:
            data = sock.recv(1 << 20)
            if not data:
                break
            buf += data
        log.append(f"{conn.port} #{i}: {len(buf)} bytes {buf[:40]!r}")
    while sock.recv(65536):  # the server closes first (Connection: close / QUIT)
        pass
    sock.close()


def run_clients(variant: str, start_at: float) -> None:
    """Client mode (inside a client namespace): every connection in its own thread."""
    server_port, conns = plan(variant)
    log: list[str] = []
    threads = [threading.Thread(target=run_conn, args=(c, server_port, start_at, log))
               for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("\n".join(log), flush=True)
    if len(log) != sum(len(c.requests) for c in conns):
        raise SystemExit("a connection failed")


# --------------------------------------------------------------------------- servers


def web_files(side: str) -> dict[str, bytes]:
    rng = random.Random(2026)
    big = bytearray(rng.randbytes(BIG_SIZE))
    if side == "sec":
        big[BIG_FLIP] ^= 0x01
    return {
        "index.html": b"<html><body><h1>colo-proxy golden</h1>"
                      + b"<p>lorem ipsum</p>" * 200 + b"</body></html>\n",
        "a.txt": bytes((97 + i % 26) for i in range(5000)),
        "b.json": json.dumps({"items": list(range(400))}).encode(),
        "big.bin": bytes(big),
    }


NGINX_CONF = """\
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp-body;
    proxy_temp_path {d}/tmp-proxy;
    fastcgi_temp_path {d}/tmp-fastcgi;
    uwsgi_temp_path {d}/tmp-uwsgi;
    scgi_temp_path {d}/tmp-scgi;
    types {{ text/html html; text/plain txt; application/json json;
            application/octet-stream bin; }}
    keepalive_timeout 30;
    sendfile on;
    server {{
        listen {ip}:{port};
        root {d}/www;
    }}
}}
"""


def start_nginx(lab: Lab, side: str) -> None:
    d = lab.workdir / f"nginx-{side}"
    (d / "www").mkdir(parents=True)
    for name, content in web_files(side).items():
        target = d / "www" / name
        target.write_bytes(content)
        os.utime(target, (FILE_MTIME, FILE_MTIME))
    (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, ip=SERVER_IP, port=HTTP_PORT))
    srv = lab.ns(side, "server")
    proc = subprocess.Popen(nsexec(srv, "nginx", "-p", str(d), "-c", str(d / "nginx.conf")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.procs.append(proc)
    for _ in range(100):
        probe = subprocess.run(nsexec(srv, "python3", "-c", f"import socket; socket.create_"
                                      f"connection(('{SERVER_IP}', {HTTP_PORT}), 1).close()"),
                               capture_output=True, check=False)
        if probe.returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"nginx in {srv} did not start: {(d / 'error.log').read_text()}")


def start_server(lab: Lab, variant: str, side: str) -> None:
    if variant == "nginx-real":
        start_nginx(lab, side)
        return
    start_redis(lab, side, "alpha-1234")
    if variant == "lossy-real":
        value = bytes((48 + (i * 13) % 75) for i in range(LOSSY_VALUE))
        cli = nsexec(lab.ns(side, "server"), "redis-cli", "-h", "127.0.0.1", "-p",
                     str(REDIS_PORT), "-x", "SET", "colo:bulk")
        subprocess.run(cli, input=value, check=True, capture_output=True)


def add_loss(lab: Lab, side: str, veth: str) -> None:
    """Lose some server frames after TCP handed them over, before tcpdump sees them.

    A qdisc that drops (bfifo tail drop under an htb rate limit) reports the drop back to
    the local TCP stack, which simply sends the segment again in order: the capture never
    shows a hole (tried: 106 and 148 drops, no retransmission visible).  A u32 filter whose
    mirred action steals the frame into a sink veth is a silent loss instead: TCP must
    retransmit after SACK/RTO, and the capture (on the same veth, after the qdisc) shows the
    hole and the late retransmission, as a loss before the proxy would.  The filter matches
    the low bits of the IP ID (a per-socket counter that starts at a random value, one per
    segment), so each side loses its own frames and a retransmission usually passes;
    ``gso_max_segs`` keeps a lost GSO frame to at most LOSS_GSO_SEGS segments.
    """
    value, mask = LOSS_ID[side]
    srv = lab.ns(side, "server")
    sh(*nsexec(srv, "ip", "link", "set", "dev", veth, "gso_max_segs", str(LOSS_GSO_SEGS)))
    sh(*nsexec(srv, "ip", "link", "add", "name", "sink0", "type", "veth", "peer", "name",
               "sink1"))
    sh(*nsexec(srv, "ip", "link", "set", "sink0", "up"))
    sh(*nsexec(srv, "ip", "link", "set", "sink1", "up"))
    sh(*nsexec(srv, "tc", "qdisc", "replace", "dev", veth, "root", "handle", "1:", "htb",
               "default", "10"))
    sh(*nsexec(srv, "tc", "class", "add", "dev", veth, "parent", "1:", "classid", "1:10", "htb",
               "rate", "1gbit"))
    sh(*nsexec(srv, "tc", "filter", "add", "dev", veth, "parent", "1:", "protocol", "ip",
               "prio", "1", "u32", "match", "ip", "protocol", "6", "0xff", "match", "u16",
               f"{value:#06x}", f"{mask:#06x}", "at", "4", "action", "mirred", "egress",
               "redirect", "dev", "sink0"))


def lost_frames(lab: Lab, side: str) -> int:
    """Frames the u32 filter stole into the sink."""
    out = sh(*nsexec(lab.ns(side, "server"), "cat", "/sys/class/net/sink0/statistics/tx_packets"))
    return int(out.stdout)


def retransmissions(pcap: Path) -> int:
    out = subprocess.run(["tshark", "-n", "-r", str(pcap), "-Y", f"ip.src=={SERVER_IP} && "
                          "(tcp.analysis.retransmission || tcp.analysis.fast_retransmission || "
                          "tcp.analysis.out_of_order)"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


# --------------------------------------------------------------------------- capture


def run_workload(lab: Lab, script: Path, variant: str, lag: float,
                 dumps: dict[str, subprocess.Popen[bytes]]) -> None:
    """Run `script --client VARIANT` in both client namespaces, the secondary's `lag`
    seconds later, then stop both captures; a capture that lost frames is Incomplete."""
    start_at = time.time() + 1.0
    clients = [
        subprocess.Popen(
            nsexec(lab.ns(tag, "client"), sys.executable, str(script.resolve()),
                   "--client", variant, repr(start_at + delay)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for tag, delay in (("pri", 0.0), ("sec", lag))
    ]
    lab.procs.extend(clients)
    for tag, c in zip(("pri", "sec"), clients, strict=True):
        log = c.communicate(timeout=120)[0].decode()
        lab.procs.remove(c)
        if c.returncode != 0:
            raise RuntimeError(f"{tag} client failed:\n{log}")
    time.sleep(0.5)  # let tcpdump write the last frames
    for tag in ("pri", "sec"):
        stop_tcpdump(lab, dumps[tag])
        err = dumps[tag].stderr.read().decode() if dumps[tag].stderr else ""
        dropped = re.search(r"(\d+) packets? dropped by kernel", err)
        if dropped and int(dropped.group(1)):
            raise Incomplete(f"{tag}: tcpdump lost {dropped.group(1)} frames")


def capture(variant: str, out: Path, prefix: str, lag: float) -> dict[str, Any]:
    server_port, conns = plan(variant)
    out.mkdir(parents=True, exist_ok=True)
    facts: dict[str, Any] = {}
    with lab_session(prefix) as lab:
        dumps, veths = {}, {}
        for tag in ("pri", "sec"):
            veths[tag] = build_pair(lab, tag)
            start_server(lab, variant, tag)
            if variant == "lossy-real":
                add_loss(lab, tag, veths[tag])
            dumps[tag] = start_tcpdump(lab, tag, veths[tag], lab.workdir / f"{tag}.pcap",
                                       f"tcp port {server_port}", buffer_kib=65536)
        run_workload(lab, Path(__file__), variant, lag, dumps)
        if variant == "lossy-real":
            for tag in ("pri", "sec"):
                facts[f"{tag}_lost_frames"] = lost_frames(lab, tag)
        for tag, name in (("pri", "primary"), ("sec", "secondary")):
            (out / f"{name}.pcap").write_bytes((lab.workdir / f"{tag}.pcap").read_bytes())
    return write_expected(variant, out, lag, len(conns), facts)


def count_frames(pcap: Path) -> tuple[int, int, float]:
    """All frames, server -> client frames, time of the first client SYN."""
    import dpkt

    frames = server = 0
    first_syn = -1.0
    with pcap.open("rb") as f:
        for ts, buf in dpkt.pcap.Reader(f):
            frames += 1
            ip = dpkt.ethernet.Ethernet(buf).data
            if socket.inet_ntoa(ip.src) == SERVER_IP:
                server += 1
            elif ip.data.flags & dpkt.tcp.TH_SYN and first_syn < 0:
                first_syn = float(ts)
    return frames, server, first_syn


def tshark_verdicts(out: Path, n_conns: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """The expected divergences of out/primary.pcap vs out/secondary.pcap by tshark's
    reassembly, and its per-connection summary (which must hold n_conns connections)."""
    try:
        divs, summary = expected_divergences(out / "primary.pcap", out / "secondary.pcap",
                                             SERVER_IP)
    except ValueError as exc:  # a hole tshark could not fill, a connection missing
        raise Incomplete(str(exc)) from exc
    if len(summary) != n_conns:
        raise RuntimeError(f"expected {n_conns} connections, tshark found {len(summary)}")
    return divs, summary


def save_expected(out: Path, what: str, lag: float, divs: list[dict[str, Any]],
                  args: list[str] | None = None) -> tuple[dict[str, Any], float]:
    """Write out/expected.json for an independent recording pair; returns it and the
    measured clock offset (the first client SYNs, to the ms; far from `lag`: Incomplete)."""
    pframes, pserver, psyn = count_frames(out / "primary.pcap")
    sframes, _sserver, ssyn = count_frames(out / "secondary.pcap")
    measured = round(ssyn - psyn, 3)
    if abs(measured - lag) > 0.25:
        raise Incomplete(f"first SYNs {measured:.3f} s apart, scheduled {lag} (overloaded?)")
    expected: dict[str, Any] = {
        "description": f"two independent recordings of real Linux stacks in namespaces; {what}; "
                       f"the secondary's workload was scheduled {lag:g} s later (first client "
                       f"SYNs {measured:.3f} s apart), its capture is not shifted; expected "
                       "verdicts from tshark's reassembly",
        "args": ["--guest", SERVER_IP, *(args or [])],
        "primary_frames": pframes,
        "secondary_frames": sframes,
        "released_frames": pserver,
        "held_frames": 0,
        "divergences": divs,
        "divergence_order": "any",
        "clock_offset": measured,
        "clock_offset_tolerance": 0.05,
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    return expected, measured


def write_expected(variant: str, out: Path, lag: float, n_conns: int,
                   facts: dict[str, Any]) -> dict[str, Any]:
    divs, summary = tshark_verdicts(out, n_conns)
    if variant == "nginx-real":
        what = ("nginx 1.22 serving identical static files except big.bin (2 MiB, byte "
                f"{BIG_FLIP} differs) on 4 connections (ports 41001-41004, 6 requests, "
                "keep-alive and close); the Date: header differs wherever the two runs' "
                "seconds differ -> payload divergences at every differing Date run and in "
                "big.bin")
        if any(d["kind"] != "payload" for d in divs):
            raise RuntimeError(f"unexpected kinds: {divs}")
    elif variant == "redis-real-multi":
        what = ("redis-server 7, 4 concurrent connections (ports 41101-41104), per-connection "
                "keys, QUIT closes -> identical answers, no divergence")
    else:
        pri, sec = out / "primary.pcap", out / "secondary.pcap"
        facts["primary_retransmissions"] = retransmissions(pri)
        facts["secondary_retransmissions"] = retransmissions(sec)
        what = ("redis-server 7, two GETs of a 1 MiB value on one connection (port 41201); "
                "on each server veth's egress a u32 filter steals frames whose IP ID & 0x1f "
                "is 0x15 (primary) / 0x0a (secondary) into a sink (mirred), GSO frames of at "
                "most 3 segments, captured on that veth: lost "
                f"{facts['pri_lost_frames']} / {facts['sec_lost_frames']} frames before the "
                "capture; tshark flags "
                f"{facts['primary_retransmissions']} / {facts['secondary_retransmissions']} "
                "server frames as retransmission or out-of-order; identical content -> "
                "no divergence")
    if variant != "nginx-real" and divs:
        raise RuntimeError(f"{variant}: streams differ: {divs}")
    expected, measured = save_expected(out, what, lag, divs)
    return {"expected": expected, "connections": summary, "measured_offset": measured,
            **facts}


def write_swapped(src: Path, out: Path) -> dict[str, Any]:
    """``src`` with primary and secondary swapped (the same blobs), verdicts from tshark."""
    out.mkdir(parents=True, exist_ok=True)
    for a, b in (("primary", "secondary"), ("secondary", "primary")):
        (out / f"{b}.pcap").write_bytes((src / f"{a}.pcap").read_bytes())
    orig = json.loads((src / "expected.json").read_text())
    divs, summary = expected_divergences(out / "primary.pcap", out / "secondary.pcap",
                                         SERVER_IP)
    pframes, pserver, _ = count_frames(out / "primary.pcap")
    expected = {
        "description": f"{src.name} with primary and secondary swapped (the primary's capture "
                       "started later, so the clock offset is negative) -> the same "
                       "divergences; expected verdicts from tshark's reassembly",
        "args": orig["args"],
        "primary_frames": pframes,
        "secondary_frames": orig["primary_frames"],
        "released_frames": pserver,
        "held_frames": 0,
        "divergences": divs,
        "divergence_order": "any",
        "clock_offset": -orig["clock_offset"],
        "clock_offset_tolerance": orig["clock_offset_tolerance"],
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    return {"expected": expected, "connections": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent
                        / "pcaps", help="output directory (default: the repo's pcaps/)")
    parser.add_argument("--variant", action="append", choices=VARIANTS,
                        help="capture only this variant (repeatable; default: all)")
    parser.add_argument("--ns-prefix", default="", help="prefix for namespace names")
    parser.add_argument("--secondary-lag", type=float, default=3.0, metavar="S",
                        help="start the secondary's workload S seconds later (not shifted)")
    parser.add_argument("--client", nargs=2, metavar=("VARIANT", "START_AT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client is not None:
        run_clients(args.client[0], float(args.client[1]))
        return 0
    if os.geteuid() != 0:
        print("lab_capture_indep needs root (network namespaces, tc, tcpdump)", file=sys.stderr)
        return 2
    for variant in args.variant or VARIANTS:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                report = capture(variant, args.out / variant, args.ns_prefix,
                                 args.secondary_lag)
                break
            except Incomplete as exc:  # a loaded machine, not a finding: record again
                print(f"{variant}: attempt {attempt}: {exc}", file=sys.stderr)
        else:
            return 1
        summary = {k: v for k, v in report.items() if k != "expected"}
        print(variant, json.dumps(summary, indent=2))
        if variant == "nginx-real":
            write_swapped(args.out / variant, args.out / f"{variant}-swapped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
