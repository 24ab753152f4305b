#!/usr/bin/env python3
"""Record real servers whose output is NOT deterministic (issues 11 and 14), independently.

The namespace lab of tools/lab_capture.py (10.77.0.1 server, 10.77.0.2 client, same MACs,
static neighbours, tcpdump on the server veth), driven as tools/lab_capture_indep.py does: the
secondary's workload starts ``lag`` seconds after the primary's and its capture is not
shifted, so the clock offset is the lag.  Variants (replay needs ``--guest 10.77.0.1``):

* ``nginx-date``: nginx, two keep-alive connections with responses 0.45 s apart, the secondary
  0.6 s later, so a response's ``Date:`` differs from its partner's only when a second ticked
  in between (some do, some do not).
* ``nginx-twin``: two identical nginx instances (same files, same mtimes), the secondary 1.5 s
  later: every ``Date:`` differs and nothing else does (the input of ``colo-proxy learn``).
* ``tls-real``: ``openssl s_server -WWW`` with one self-signed certificate made at record time
  and shared by both servers; three TLS connections: different from the ServerHello random on.
* ``redis-time``: redis-server answering TIME, INFO server and LASTSAVE (server time, run id,
  uptime) besides deterministic commands.
* ``bulk-real``: redis GETs of a deterministic 512 KiB value: nothing differs.

Expected verdicts come from tshark's reassembly (tools/tshark_follow.py), connections paired by
client port.  Requires root, iproute2, tcpdump, tshark, nginx, openssl and redis-server.

Usage: ``sudo python3 tools/lab_capture_noise.py [--out pcaps] [--variant NAME ...]``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
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
    sh,
    start_redis,
    start_tcpdump,
)
from lab_capture_indep import (
    FILE_MTIME,
    HTTP_PORT,
    NGINX_CONF,
    Conn,
    Incomplete,
    http_get,
    redis_cmds,
    run_conn,
    run_workload,
    save_expected,
    tshark_verdicts,
)

TLS_PORT = 443
ATTEMPTS = 3
BULK_VALUE = 512 * 1024
VARIANTS = ("nginx-date", "nginx-twin", "tls-real", "redis-time", "bulk-real")
LAG = {"nginx-date": 0.6, "nginx-twin": 1.5, "tls-real": 1.5, "redis-time": 1.5,
       "bulk-real": 1.5}
# Where the server's output differs almost everywhere (TLS ciphertext, shifted redis replies),
# replay's default `auto` cannot tell from the bytes that the recorded secondary went on in its
# own state after a simulated checkpoint; these recordings are independent, so say it.
EXTRA_ARGS = {"tls-real": ["--secondary-after-checkpoint", "continues"],
              "redis-time": ["--secondary-after-checkpoint", "continues"]}
DESCRIPTION = {
    "nginx-date": "nginx 1.22, identical static files, 2 keep-alive connections (ports "
                  "41401-41402, 8 responses 0.45 s apart); the secondary 0.6 s later, so a "
                  "Date: header differs only when a second ticked between the two responses",
    "nginx-twin": "two identical nginx 1.22 instances (same files and mtimes), 3 connections "
                  "(ports 41501-41503, 6 responses); the secondary 1.5 s later: every Date: "
                  "differs, nothing else",
    "tls-real": "openssl s_server -WWW with one self-signed certificate made at record time, "
                "3 sequential TLS connections (ports 41601-41603), GET of one file each: "
                "different from the ServerHello random onward",
    "redis-time": "redis-server 7, 3 connections (ports 41701-41703): deterministic commands, "
                  "then TIME, INFO server and LASTSAVE whose replies embed server time, run id "
                  "and uptime (lengths may change)",
    "bulk-real": "redis-server 7, 2 connections (ports 41801-41802) GETting a deterministic "
                 "512 KiB value 3 times in all: nothing differs",
}


def plan(variant: str) -> tuple[int, list[Conn]]:
    """Server port and the connections of one variant's workload."""
    if variant == "nginx-date":
        return HTTP_PORT, [
            Conn(41401, 0.0, [http_get("/index.html"), http_get("/a.txt"), http_get("/b.json"),
                              http_get("/index.html"), http_get("/a.txt", close=True)],
                 gap=0.45),
            Conn(41402, 0.2, [http_get("/b.json"), http_get("/a.txt"),
                              http_get("/index.html", close=True)], gap=0.45),
        ]
    if variant == "nginx-twin":
        return HTTP_PORT, [
            Conn(41501, 0.0, [http_get("/index.html"), http_get("/a.txt"),
                              http_get("/b.json", close=True)]),
            Conn(41502, 0.3, [http_get("/a.txt"), http_get("/missing", close=True)]),
            Conn(41503, 0.6, [http_get("/index.html", close=True)]),
        ]
    if variant == "tls-real":
        req = b"GET /index.html HTTP/1.0\r\n\r\n"
        return TLS_PORT, [Conn(41601 + k, 0.4 * k, [req]) for k in range(3)]
    if variant == "redis-time":
        return REDIS_PORT, [
            Conn(41701, 0.0, redis_cmds([b"PING"], [b"SET", b"colo:t", b"v1"],
                                        [b"GET", b"colo:t"], [b"TIME"], [b"QUIT"]), gap=0.1),
            Conn(41702, 0.2, redis_cmds([b"INFO", b"server"], [b"QUIT"]), gap=0.1),
            Conn(41703, 0.4, redis_cmds([b"LASTSAVE"], [b"TIME"], [b"QUIT"]), gap=0.3),
        ]
    if variant == "bulk-real":
        return REDIS_PORT, [
            Conn(41801, 0.0, redis_cmds([b"GET", b"colo:bulk"], [b"GET", b"colo:bulk"],
                                        [b"QUIT"]), gap=0.5),
            Conn(41802, 0.2, redis_cmds([b"GET", b"colo:bulk"], [b"QUIT"]), gap=0.3),
        ]
    raise ValueError(variant)


# --------------------------------------------------------------------------- client side


def run_tls_conn(conn: Conn, start_at: float, log: list[str]) -> None:
    """One TLS connection (certificate not checked: it is self-signed by design)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    raw.bind((CLIENT_IP, conn.port))
    time.sleep(max(0.0, start_at + conn.start - time.time()))
    raw.connect((SERVER_IP, TLS_PORT))
    with ctx.wrap_socket(raw) as sock:
        for req in conn.requests:
            sock.sendall(req)
        got = b""
        while True:
            try:
                data = sock.recv(65536)
            except (ssl.SSLEOFError, ConnectionResetError):
                break
            if not data:
                break
            got += data
    log.append(f"{conn.port}: {len(got)} bytes {got[:40]!r}")


def run_clients(variant: str, start_at: float) -> None:
    """Client mode (inside a client namespace): every connection in its own thread."""
    port, conns = plan(variant)
    log: list[str] = []

    def one(c: Conn) -> None:
        if port == TLS_PORT:
            run_tls_conn(c, start_at, log)
        else:
            run_conn(c, port, start_at, log)

    threads = [threading.Thread(target=one, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("\n".join(log), flush=True)
    want = len(conns) if port == TLS_PORT else sum(len(c.requests) for c in conns)
    if len(log) != want:
        raise SystemExit("a connection failed")


# --------------------------------------------------------------------------- servers


def web_files() -> dict[str, bytes]:
    """The same files on both servers: any difference in the output is the server's own."""
    return {
        "index.html": b"<html><body><h1>colo-proxy noise</h1>"
                      + b"<p>lorem ipsum</p>" * 60 + b"</body></html>\n",
        "a.txt": bytes((97 + i % 26) for i in range(3000)),
        "b.json": json.dumps({"items": list(range(200))}).encode(),
    }


def wait_port(lab: Lab, side: str, port: int, what: str) -> None:
    srv = lab.ns(side, "server")
    for _ in range(400):  # up to 20 s and more: a loaded machine starts servers slowly
        probe = subprocess.run(nsexec(srv, "python3", "-c", f"import socket; socket.create_"
                                      f"connection(('{SERVER_IP}', {port}), 1).close()"),
                               capture_output=True, check=False)
        if probe.returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} in {srv} did not start")


def start_nginx(lab: Lab, side: str) -> None:
    d = lab.workdir / f"nginx-{side}"
    (d / "www").mkdir(parents=True)
    for name, content in web_files().items():
        target = d / "www" / name
        target.write_bytes(content)
        os.utime(target, (FILE_MTIME, FILE_MTIME))
    (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, ip=SERVER_IP, port=HTTP_PORT))
    lab.procs.append(subprocess.Popen(
        nsexec(lab.ns(side, "server"), "nginx", "-p", str(d), "-c", str(d / "nginx.conf")),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_port(lab, side, HTTP_PORT, "nginx")


def make_cert(workdir: Path) -> tuple[Path, Path]:
    """One self-signed certificate for both servers (identical instances)."""
    key, cert = workdir / "key.pem", workdir / "cert.pem"
    if not cert.exists():
        sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
           "-subj", "/CN=colo-proxy-lab", "-keyout", str(key), "-out", str(cert))
    return key, cert


def start_tls(lab: Lab, side: str) -> None:
    key, cert = make_cert(lab.workdir)
    d = lab.workdir / f"tls-{side}"
    d.mkdir()
    (d / "index.html").write_bytes(web_files()["index.html"])
    # -WWW serves files from the working directory; -quiet keeps stdout small.
    lab.procs.append(subprocess.Popen(
        nsexec(lab.ns(side, "server"), "openssl", "s_server", "-accept",
               f"{SERVER_IP}:{TLS_PORT}", "-key", str(key), "-cert", str(cert), "-WWW",
               "-quiet"),
        cwd=d, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL))
    wait_port(lab, side, TLS_PORT, "openssl s_server")


def start_server(lab: Lab, variant: str, side: str) -> None:
    if variant.startswith("nginx"):
        start_nginx(lab, side)
    elif variant == "tls-real":
        start_tls(lab, side)
    else:
        start_redis(lab, side, "alpha-1234")
        if variant == "bulk-real":
            value = bytes((48 + (i * 13) % 75) for i in range(BULK_VALUE))
            subprocess.run(nsexec(lab.ns(side, "server"), "redis-cli", "-h", "127.0.0.1", "-p",
                                  str(REDIS_PORT), "-x", "SET", "colo:bulk"),
                           input=value, check=True, capture_output=True)


# --------------------------------------------------------------------------- capture


def capture(variant: str, out: Path, prefix: str) -> dict[str, Any]:
    port, conns = plan(variant)
    lag = LAG[variant]
    out.mkdir(parents=True, exist_ok=True)
    with lab_session(prefix) as lab:
        dumps = {}
        for tag in ("pri", "sec"):
            veth = build_pair(lab, tag)
            start_server(lab, variant, tag)
            dumps[tag] = start_tcpdump(lab, tag, veth, lab.workdir / f"{tag}.pcap",
                                       f"tcp port {port}", buffer_kib=65536)
        run_workload(lab, Path(__file__), variant, lag, dumps)
        for tag, name in (("pri", "primary"), ("sec", "secondary")):
            time_order(lab.workdir / f"{tag}.pcap", out / f"{name}.pcap")
    return write_expected(variant, out, lag, len(conns))


def time_order(src: Path, dst: Path) -> None:
    """Copy a capture with its records in time order (bytes and stamps untouched).

    tcpdump on a veth stamps a GSO frame when it is handed over, so a bulk transfer's records
    can be a few microseconds out of order; golden files are in time order.
    """
    import dpkt

    with src.open("rb") as f:
        records = sorted(((ts, bytes(buf)) for ts, buf in dpkt.pcap.Reader(f)),
                         key=lambda r: r[0])
    with dst.open("wb") as f:
        writer = dpkt.pcap.Writer(f)
        for ts, buf in records:
            writer.writepkt(buf, ts=ts)


def write_expected(variant: str, out: Path, lag: float, n_conns: int) -> dict[str, Any]:
    divs, summary = tshark_verdicts(out, n_conns)
    if variant == "bulk-real" and divs:
        raise RuntimeError(f"bulk-real: streams differ: {divs}")
    if variant in ("tls-real", "redis-time", "nginx-twin") and not divs:
        raise RuntimeError(f"{variant}: no difference at all (the servers were meant to differ)")
    expected, measured = save_expected(out, DESCRIPTION[variant], lag, divs,
                                       EXTRA_ARGS.get(variant, []))
    return {"expected": expected, "connections": summary, "measured_offset": measured}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent
                        / "pcaps", help="output directory (default: the repo's pcaps/)")
    parser.add_argument("--variant", action="append", choices=VARIANTS,
                        help="capture only this variant (repeatable; default: all)")
    parser.add_argument("--ns-prefix", default="", help="prefix for namespace names")
    parser.add_argument("--expected-only", action="store_true",
                        help="recompute expected.json from the pcaps already in --out")
    parser.add_argument("--client", nargs=2, metavar=("VARIANT", "START_AT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client is not None:
        run_clients(args.client[0], float(args.client[1]))
        return 0
    if args.expected_only:
        for variant in args.variant or VARIANTS:
            for name in ("primary", "secondary"):
                path = args.out / variant / f"{name}.pcap"
                time_order(path, path)
            write_expected(variant, args.out / variant, LAG[variant], len(plan(variant)[1]))
        return 0
    if os.geteuid() != 0:
        print("lab_capture_noise needs root (network namespaces, tcpdump)", file=sys.stderr)
        return 2
    for variant in args.variant or VARIANTS:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                report = capture(variant, args.out / variant, args.ns_prefix)
                break
            except Incomplete as exc:  # a loaded machine, not a finding: record again
                print(f"{variant}: attempt {attempt}: {exc}", file=sys.stderr)
        else:
            return 1
        print(variant, json.dumps({k: v for k, v in report.items() if k != "expected"},
                                  indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
