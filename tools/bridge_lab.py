#!/usr/bin/env python3
"""A bridge-mode lab in network namespaces, and the tiny guests and clients that run in it.

    client ns (10.S.T.1) --veth-- [client-if]              (root namespace:
    primary ns (10.S.T.2) --veth-- [primary-if]  colo-proxy bridge
    secondary ns (10.S.T.2) --veth-- [secondary-if]         runs here)

The primary and secondary guests get the same MAC and IP address, as a COLO
pair does.  IPv6 is off in the namespaces and on the host ends (no router
solicitations or MLD noise), and segmentation, GRO and checksum offloads are
off on all six veth ends (pyroute2's ethtool), as the plain-bridge baseline
of issue 12 is defined; ``BridgeLab(offloads=True)`` or :meth:`BridgeLab.set_offloads`
turns them on (bridge mode takes the super-frames whole, with virtio_net_hdr).
:class:`BridgeLab` builds all of it and always removes it.

Subcommands run inside a namespace (``ip netns exec NS python3 bridge_lab.py ...``)
and print one JSON line:

* ``tcp-server``: accept one connection, read a request line, send ``--size``
  deterministic bytes (byte ``--diverge-at`` flipped), half-close, read to EOF,
  then wait until the client acknowledged everything (``SIOCOUTQ`` 0);
* ``tcp-client``: fetch from a server, compare with the expected bytes
  (``--sha256``: and report their sha256);
* ``tcp-sink`` / ``tcp-upload``: the other way, the client sends ``--size``
  bytes, the server answers with their length and sha256;
* ``udp-echo`` / ``udp-client``: answer / send numbered datagrams;
* ``tcp-echo`` / ``tcp-pingpong``: request/response round trips on one connection
  (p50, p99, rate);
* ``icmp-ping``: ICMP echo round trips (p50, p99) with a raw socket.

:meth:`BridgeLab.plain_up` puts a plain Linux bridge between the client and the
primary: the baseline tools/bench_bridge.py measures the proxy against.

Usage (root): ``python3 tools/bridge_lab.py up`` keeps a lab until Enter is
pressed and prints the ``colo-proxy bridge`` command line for it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from colo_proxy.core.checksum import ones_sum

GUEST_MAC = "52:54:00:c0:10:02"
CLIENT_MAC = "52:54:00:c0:10:01"
SIOCOUTQ = 0x5411
OFFLOADS = ("tx-checksum", "tx-tcp", "tx-generic-segmentation", "tx-udp-segmentation",
            "rx-gro", "tx-scatter-gather", "tx-gso")
NEVER_ON = ("rx-gro-list", "rx-udp-gro-forwarding", "rx-gro-hw", "tx-gso-list")
"""Offloads left alone when turning them on: not veth defaults, and not what bridge mode carries."""
ROLES = ("client", "primary", "secondary")
PREFIX = os.environ.get("BRIDGE_LAB_PREFIX", "b12b")
"""Every namespace and interface name starts with this (unique to the bridge lab)."""


BLOCK = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(1 << 15))
"""1 MiB of deterministic, incompressible-looking bytes; payloads repeat it."""


def payload(size: int, diverge_at: int = -1, start: int = 0) -> bytes:
    """Bytes ``start .. start + size`` of the stream; byte ``diverge_at`` flipped if inside."""
    first = start % len(BLOCK)
    reps = (first + size) // len(BLOCK) + 1
    data = bytearray((BLOCK * reps)[first : first + size]) if reps > 1 else bytearray(
        BLOCK[first : first + size]
    )
    if start <= diverge_at < start + size:
        data[diverge_at - start] ^= 0xFF
    return bytes(data)


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def offloads_off(ifname: str, on: bool = False) -> None:
    """ethtool -K IF tso off gso off gro off tx off (``on``: all of them on, but NEVER_ON)."""
    set_features(ifname, OFFLOADS, on)


def set_features(ifname: str, prefixes: tuple[str, ...], on: bool) -> None:
    """Every available feature whose name starts with one of ``prefixes`` on or off."""
    from pyroute2.ethtool import Ethtool

    ethtool = Ethtool()
    try:
        features = ethtool.get_features(ifname)
        for name, feature in features.features.items():
            if name.startswith(prefixes) and feature.available and not (on and name in NEVER_ON):
                feature.enable = on
        ethtool.set_features(ifname, features)
    finally:
        ethtool.close()


@dataclass
class BridgeLab:
    """Three namespaces, three veth pairs; host ends named in ``ifs``."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: str = ""
    ns: dict[str, str] = field(default_factory=dict)
    ifs: dict[str, str] = field(default_factory=dict)
    offloads: bool = False
    """Offloads on every veth end (TSO/GSO/GRO/checksum): the guests send super-frames."""

    def __post_init__(self) -> None:
        if not self.subnet:
            raw = int(self.tag, 16)
            self.subnet = f"10.{200 + raw % 50}.{(raw >> 8) % 256}"
        for role in ROLES:
            self.ns[role] = f"{PREFIX}-{self.tag}-{role}"
            self.ifs[role] = f"{PREFIX}{self.tag}{role[0]}"

    @property
    def client_ip(self) -> str:
        return f"{self.subnet}.1"

    @property
    def guest_ip(self) -> str:
        return f"{self.subnet}.2"

    def __enter__(self) -> BridgeLab:
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def _create(self) -> None:
        for role in ROLES:
            ns = self.ns[role]
            _sh("ip", "netns", "add", ns)
            _sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1")
            self.wire(role)

    def recreate(self, role: str) -> None:
        """Delete ``role``'s veth pair and make it again (as QEMU re-creates a tap)."""
        _sh("ip", "link", "del", self.ifs[role])
        self.wire(role)

    def wire(self, role: str) -> None:
        """``role``'s veth pair: host end here, ``eth0`` in its namespace, both up."""
        ns, host, guest = self.ns[role], self.ifs[role], self.ifs[role] + "g"
        _sh("ip", "link", "add", host, "type", "veth", "peer", "name", guest)
        _sh("sysctl", "-qw", f"net.ipv6.conf.{host}.disable_ipv6=1", check=False)
        offloads_off(host, self.offloads)
        offloads_off(guest, self.offloads)
        _sh("ip", "link", "set", guest, "netns", ns)
        mac = CLIENT_MAC if role == "client" else GUEST_MAC
        ip = self.client_ip if role == "client" else self.guest_ip
        _sh("ip", "-n", ns, "link", "set", guest, "name", "eth0", "address", mac)
        _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "link", "set", host, "up")

    def destroy(self) -> None:
        """Remove every interface and namespace of this lab (errors ignored)."""
        self.plain_down()
        for role in ROLES:
            _sh("ip", "link", "del", self.ifs[role], check=False)
            _sh("ip", "netns", "del", self.ns[role], check=False)

    @property
    def plain_bridge(self) -> str:
        """The Linux bridge :meth:`plain_up` builds (the baseline the proxy is measured against)."""
        return f"{PREFIX}{self.tag}br"

    def plain_up(self) -> None:
        """A plain Linux bridge between the client and the primary (the secondary left out)."""
        br = self.plain_bridge
        _sh("ip", "link", "add", br, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        _sh("sysctl", "-qw", f"net.ipv6.conf.{br}.disable_ipv6=1", check=False)
        for role in ("client", "primary"):
            _sh("ip", "link", "set", self.ifs[role], "master", br)
        _sh("ip", "link", "set", br, "up")

    def plain_down(self) -> None:
        """Remove the plain bridge (its ports stay, up, ready for the proxy)."""
        _sh("ip", "link", "del", self.plain_bridge, check=False)

    def guest_offloads(self, role: str, on: bool, *prefixes: str) -> None:
        """Turn the offloads of ``role``'s ``eth0`` (the veth peer of its host end) on or off.

        ``prefixes``: only the features whose names start so (all offloads without).
        """
        proc = self.tool(role, "offloads", "eth0", *prefixes, "--on" if on else "--off")
        _, err = proc.communicate(timeout=30)
        if proc.returncode:
            raise RuntimeError(f"offloads in {role}: {err}")

    def set_offloads(self, on: bool) -> None:
        """Offloads on or off on all six veth ends (the bench switches between its modes)."""
        if on == self.offloads:
            return
        for role in ROLES:
            offloads_off(self.ifs[role], on)
            self.guest_offloads(role, on)
        self.offloads = on

    def kill_tcp(self, port: int) -> None:
        """Abort every TCP socket on ``port`` in every namespace (``ss -K``).

        After a stalled transfer the guests' orphaned sockets keep resending
        for minutes; the next proxy would see them as streams without a start.
        """
        for ns in self.ns.values():
            _sh("ip", "netns", "exec", ns, "ss", "-K", f"sport = :{port} or dport = :{port}",
                check=False)

    def flush_neighbours(self, role: str) -> None:
        """Forget ``role``'s neighbour entries (its next packet ARPs again)."""
        _sh("ip", "-n", self.ns[role], "neigh", "flush", "all")

    def popen(self, role: str, argv: Sequence[str], **kw: object) -> subprocess.Popen[str]:
        """A process inside ``role``'s namespace (stdout piped, text)."""
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            ["ip", "netns", "exec", self.ns[role], *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
        )

    def tool(self, role: str, *args: str) -> subprocess.Popen[str]:
        """This script's subcommand ``args`` inside ``role``'s namespace."""
        return self.popen(role, [sys.executable, str(Path(__file__).resolve()), *args])

    def bridge_args(self) -> list[str]:
        """The interface flags of ``colo-proxy bridge`` for this lab."""
        return ["--client-if", self.ifs["client"], "--primary-if", self.ifs["primary"],
                "--secondary-if", self.ifs["secondary"]]


def available() -> str | None:
    """Why the lab cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and packet sockets)"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    if _sh("ip", "netns", "add", probe, check=False).returncode != 0:
        return "cannot create network namespaces"
    _sh("ip", "netns", "del", probe, check=False)
    try:
        import pyroute2.ethtool  # noqa: F401
    except ImportError:
        return "pyroute2 not installed"
    return None


# ---- programs that run inside the namespaces ---------------------------------------------


def _emit(obj: dict[str, object]) -> None:
    print(json.dumps(obj), flush=True)


def tcp_server(args: argparse.Namespace) -> int:
    """Serve one fetch; report whether every byte (and the FIN) was acknowledged."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", args.port))
    if args.cc:
        srv.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, args.cc.encode())
    srv.listen(1)
    srv.settimeout(args.timeout)
    _emit({"listening": args.port})
    result: dict[str, object] = {"sent": 0, "eof": False, "unacked": None}
    try:
        conn, _ = srv.accept()
        conn.settimeout(args.timeout)
        request = conn.recv(100)
        result["request"] = request.decode(errors="replace").strip()
        for start in range(0, args.size, len(BLOCK)):
            conn.sendall(payload(min(len(BLOCK), args.size - start), args.diverge_at, start))
        result["sent"] = args.size
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
        result["eof"] = True
        result["unacked"] = _wait_acked(conn, args.timeout)
        conn.close()
    except OSError as err:
        result["error"] = f"{type(err).__name__}: {err}"
    _emit(result)
    return 0


def _wait_acked(conn: socket.socket, timeout: float) -> int:
    """Bytes (FIN included) the peer has not acknowledged, once it is 0 or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        raw = fcntl.ioctl(conn.fileno(), SIOCOUTQ, struct.pack("i", 0))
        unacked: int = struct.unpack("i", raw)[0]
        if unacked == 0 or time.monotonic() > deadline:
            return unacked
        time.sleep(0.05)


def tcp_client(args: argparse.Namespace) -> int:
    """Fetch; report how much arrived and whether it is a prefix of the expected bytes."""
    sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    sock.sendall(b"FETCH\n")
    sock.settimeout(args.idle)
    received, prefix_ok = 0, True
    digest = hashlib.sha256() if args.sha256 else None
    result: dict[str, object] = {"eof": False}
    start = time.monotonic()
    try:
        while True:
            chunk = sock.recv(262144)
            if not chunk:
                result["eof"] = True
                break
            if prefix_ok:
                prefix_ok = chunk == payload(len(chunk), start=received)
            if digest is not None:
                digest.update(chunk)
            received += len(chunk)
    except TimeoutError:
        result["idle_timeout"] = True
    except OSError as err:
        result["error"] = f"{type(err).__name__}: {err}"
    elapsed = time.monotonic() - start
    sock.close()
    prefix_ok = prefix_ok and received <= args.size
    result.update(received=received, complete=prefix_ok and received == args.size,
                  prefix_ok=prefix_ok, seconds=elapsed)
    if digest is not None:
        result["sha256"] = digest.hexdigest()
    _emit(result)
    return 0


def stream_sha256(size: int) -> str:
    """The sha256 of the first ``size`` bytes of the stream :func:`payload` makes."""
    digest = hashlib.sha256()
    for start in range(0, size, len(BLOCK)):
        digest.update(payload(min(len(BLOCK), size - start), start=start))
    return digest.hexdigest()


def tcp_sink(args: argparse.Namespace) -> int:
    """Take one upload to EOF; answer and report its length and sha256."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", args.port))
    srv.listen(1)
    srv.settimeout(args.timeout)
    _emit({"listening": args.port})
    digest, received = hashlib.sha256(), 0
    result: dict[str, object] = {}
    try:
        conn, _ = srv.accept()
        conn.settimeout(args.timeout)
        while chunk := conn.recv(262144):
            digest.update(chunk)
            received += len(chunk)
        conn.sendall(f"{received} {digest.hexdigest()}\n".encode())
        conn.shutdown(socket.SHUT_WR)
        result["unacked"] = _wait_acked(conn, args.timeout)
        conn.close()
    except OSError as err:
        result["error"] = f"{type(err).__name__}: {err}"
    result.update(received=received, sha256=digest.hexdigest())
    _emit(result)
    return 0


def tcp_upload(args: argparse.Namespace) -> int:
    """Send ``--size`` bytes of the stream, half-close, report the server's answer."""
    sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    result: dict[str, object] = {}
    start = time.monotonic()
    try:
        for at in range(0, args.size, len(BLOCK)):
            sock.sendall(payload(min(len(BLOCK), args.size - at), start=at))
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        result["answer"] = answer.decode(errors="replace").strip()
    except OSError as err:
        result["error"] = f"{type(err).__name__}: {err}"
    result.update(sent=args.size, seconds=time.monotonic() - start)
    sock.close()
    _emit(result)
    return 0


def udp_echo(args: argparse.Namespace) -> int:
    """Echo ``--count`` datagrams back, prefixed with b'echo:'."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", args.port))
    sock.settimeout(args.timeout)
    _emit({"listening": args.port})
    n = 0
    try:
        while n < args.count:
            data, peer = sock.recvfrom(65536)
            sock.sendto(b"echo:" + data, peer)
            n += 1
    except TimeoutError:
        pass
    _emit({"echoed": n})
    return 0


def udp_client(args: argparse.Namespace) -> int:
    """Send numbered datagrams one at a time; count the correct echoes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(args.timeout)
    good = 0
    for i in range(args.count):
        msg = f"datagram {i} ".encode() * 20
        sock.sendto(msg, (args.host, args.port))
        try:
            reply, _ = sock.recvfrom(65536)
        except TimeoutError:
            continue
        good += reply == b"echo:" + msg
    _emit({"sent": args.count, "good_echoes": good})
    return 0


def _percentiles(samples: list[float]) -> dict[str, float]:
    """p50 and p99 of round-trip times in milliseconds (0 when there are none)."""
    if not samples:
        return {"p50_ms": 0.0, "p99_ms": 0.0}
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50_ms": pick(0.50), "p99_ms": pick(0.99)}


def tcp_echo(args: argparse.Namespace) -> int:
    """Echo every connection's bytes back, one connection after another, until killed."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", args.port))
    srv.listen(8)
    _emit({"listening": args.port})
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(args.timeout)
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        conn.close()


def tcp_pingpong(args: argparse.Namespace) -> int:
    """``--count`` request/response round trips of ``--size`` bytes on one connection."""
    sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = payload(args.size)
    rtts: list[float] = []
    result: dict[str, object] = {}
    start = time.perf_counter()
    try:
        for _ in range(args.count):
            t0 = time.perf_counter()
            sock.sendall(msg)
            got = 0
            while got < len(msg):
                chunk = sock.recv(len(msg) - got)
                if not chunk:
                    raise ConnectionError("closed")
                got += len(chunk)
            rtts.append(time.perf_counter() - t0)
    except OSError as err:
        result["error"] = f"{type(err).__name__}: {err}"
    elapsed = time.perf_counter() - start
    sock.close()
    result.update(count=len(rtts), rate=len(rtts) / elapsed if elapsed else 0.0,
                  **_percentiles(rtts))
    _emit(result)
    return 0


def icmp_ping(args: argparse.Namespace) -> int:
    """ICMP echo requests every ``--interval`` s, each waiting for its reply (raw socket)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident, rtts, lost = os.getpid() & 0xFFFF, [], 0
    for seq in range(args.count):
        body = struct.pack("!HH", ident, seq) + bytes(56)
        header = struct.pack("!BBH", 8, 0, 0)
        csum = ~ones_sum(header + body) & 0xFFFF
        packet = struct.pack("!BBH", 8, 0, csum) + body
        t0 = time.perf_counter()
        sock.sendto(packet, (args.host, 0))
        deadline = t0 + args.timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                lost += 1
                break
            sock.settimeout(left)
            try:
                reply = sock.recv(2048)
            except TimeoutError:
                continue
            icmp = reply[(reply[0] & 0x0F) * 4 :]
            if icmp[0] == 0 and struct.unpack_from("!HH", icmp, 4) == (ident, seq):
                rtts.append(time.perf_counter() - t0)
                break
        time.sleep(args.interval)
    _emit({"count": len(rtts), "lost": lost, **_percentiles(rtts)})
    return 0


def _offloads_cmd(args: argparse.Namespace) -> int:
    set_features(args.ifname, tuple(args.prefixes) or OFFLOADS, args.on)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    programs = {tcp_server: (8080, 60.0), tcp_client: (8080, 60.0), udp_echo: (7777, 60.0),
                udp_client: (7777, 10.0), tcp_echo: (7070, 60.0), tcp_pingpong: (7070, 10.0),
                icmp_ping: (0, 1.0), tcp_sink: (9090, 60.0), tcp_upload: (9090, 60.0)}
    for func, (port, timeout) in programs.items():
        p = sub.add_parser(func.__name__.replace("_", "-"), help=func.__doc__)
        p.add_argument("--port", type=int, default=port)
        p.add_argument("--timeout", type=float, default=timeout)
        if func in (tcp_server, tcp_client, tcp_pingpong, tcp_upload):
            p.add_argument("--size", type=int, default=64 if func is tcp_pingpong else 300_000)
        if func not in (tcp_server, tcp_client, tcp_echo, tcp_sink, tcp_upload):
            p.add_argument("--count", type=int, default=20)
        if func in (tcp_client, udp_client, tcp_pingpong, icmp_ping, tcp_upload):
            p.add_argument("--host", required=True)
        p.set_defaults(func=func)
    sub.choices["tcp-server"].add_argument("--diverge-at", type=int, default=-1)
    sub.choices["tcp-server"].add_argument(
        "--cc", default="", help="TCP congestion control (the namespace's default otherwise)"
    )
    sub.choices["icmp-ping"].add_argument("--interval", type=float, default=0.01)
    sub.choices["tcp-client"].add_argument(
        "--idle", type=float, default=60.0, help="give up after S seconds of silence"
    )
    sub.choices["tcp-client"].add_argument(
        "--sha256", action="store_true", help="also report the sha256 of what arrived"
    )
    p = sub.add_parser("offloads", help="turn an interface's offloads on or off")
    p.add_argument("ifname")
    p.add_argument("prefixes", nargs="*", help="only features starting so (all offloads)")
    p.add_argument("--on", dest="on", action="store_true")
    p.add_argument("--off", dest="on", action="store_false")
    p.set_defaults(func=_offloads_cmd)
    p = sub.add_parser("up", help="build a lab and keep it until Enter is pressed")
    p.set_defaults(func=None)
    args = parser.parse_args(argv)
    if args.func is not None:
        return int(args.func(args))
    reason = available()
    if reason:
        print(f"bridge_lab: {reason}", file=sys.stderr)
        return 2
    with BridgeLab() as lab:
        print("namespaces:", ", ".join(lab.ns.values()))
        print(f"client {lab.client_ip}, guests {lab.guest_ip}")
        print("colo-proxy bridge " + " ".join(lab.bridge_args()))
        input("press Enter to tear the lab down ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
