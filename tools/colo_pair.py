#!/usr/bin/env python3
"""Run a real COLO pair with colo-proxy as the comparator and the disk agent as replica.

Why: every piece (netfilters, QMP checkpoints, disk epochs, failover) was shown alone; this
runs the whole loop on two real VMs under TCG (reference qemu-colo.md 8 and 8b).

Topology (everything inside one network namespace ``c15-...`` except colo-proxy and the
disk agent, which only use unix sockets)::

    client (ns, br0 10.215.15.1) -- br0 -- tap tp -- primary QEMU (10.215.15.2)
                                       \\- tap ts -- secondary QEMU (same MAC/IP)
    primary:   filter-redirector hbin (colo-proxy's data-path probes -> hb.sock -> guest input)
               filter-mirror m0 (client input -> mirror.sock -> secondary red0)
               filter-redirector redire1 (guest output -> pri_in.sock -> colo-proxy)
               filter-redirector redire0 (colo-proxy outdev -> outdev.sock -> tap)
               disk0 raw file, blockdev-mirror (write-blocking) into the agent's
               ``replication`` export
    secondary: f3 (after a takeover: colo-proxy -> sec_out.sock -> tap), hbs (after a
               takeover: colo-proxy's data probes -> hb_s.sock -> guest), f1 (red0 -> guest),
               f2 (guest output -> sec_in.sock -> colo-proxy), filter-rewriter rew0,
               disk0 = the agent's ``secondary`` export (NBD)
    colo-proxy run --qmp/--secondary-qmp/--disk-qmp, no colo-compare object; with
    --failover also --heartbeat-dev hb.sock (ARP probes answered by both guests),
    --secondary-outdev sec_out.sock (the promoted secondary's output goes out through
    colo-proxy, as the primary's did) and --promoted-heartbeat-dev hb_s.sock (its data
    path is probed after the takeover too).

Filter order matters: QEMU walks a netdev's filters head to tail for what the tap
receives and tail to head for what the guest sends, and a redirector's injected frames
continue from where it sits.  So ``hbin`` comes before ``m0`` (a probe reaches both
guests) and ``f3`` before every other filter of the secondary (what colo-proxy sends
back goes straight to the tap, not into ``f2`` again).

Usage::

    sudo tools/colo_pair.py up [--failover] [--checkpoint-delay MS]   # until Ctrl-C
    tools/colo_pair.py get HOST PATH [--rate BYTES_PER_S]             # the test client

Env: ``COLO_QEMU`` (the patched qemu-system-x86_64, see tools/build_colo_qemu.sh) and
``COLO_GUEST_DIR`` (vmlinuz + initrd.img, see tools/colo_guest.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_QEMU = "/var/cache/colo-proxy/qemu-10.0.2-colo/bin/qemu-system-x86_64"
DEFAULT_GUEST = "/var/cache/colo-proxy/guest"
GUEST_IP = "10.215.15.2"
CLIENT_IP = "10.215.15.1"
GUEST_MAC = "52:54:00:15:00:02"
FIRMWARE_DIRS = ("/usr/share/qemu", "/usr/share/seabios")
SECONDARY_OBJECTS = ("f2", "f1")
SECONDARY_CHARDEVS = ("red1", "red0")


def colo_qemu() -> str | None:
    """The patched QEMU named by ``COLO_QEMU`` (or the build script's default), if present."""
    path = os.environ.get("COLO_QEMU") or DEFAULT_QEMU
    return path if os.access(path, os.X_OK) else None


def guest_dir() -> Path | None:
    """The guest built by tools/colo_guest.sh, if present."""
    d = Path(os.environ.get("COLO_GUEST_DIR") or DEFAULT_GUEST)
    return d if (d / "vmlinuz").is_file() and (d / "initrd.img").is_file() else None


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


# ---- QMP (synchronous, for the launcher and tests) -------------------------------------


class Monitor:
    """A QMP control connection (plain socket); a thread keeps every event with QEMU's time."""

    def __init__(self, path: Path, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self._file = self.sock.makefile("rb")
        json.loads(self._file.readline())  # greeting
        self._thread = threading.Thread(target=self._pump, daemon=True, name=f"qmp-{name}")
        self._thread.start()
        self.cmd("qmp_capabilities")

    def _pump(self) -> None:
        try:
            for line in self._file:
                msg = json.loads(line)
                if "event" in msg:
                    ts = msg.get("timestamp", {})
                    msg["t"] = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
                    with self._lock:
                        self.events.append(msg)
                else:
                    self._replies.put(msg)
        except (OSError, ValueError):
            pass
        self._replies.put(None)

    def cmd(self, name: str, timeout: float = 30.0, **args: Any) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        resp = self._replies.get(timeout=timeout)
        if resp is None:
            self._replies.put(None)
            raise ConnectionError(f"{self.name}: QMP closed")
        if "error" in resp:
            raise RuntimeError(f"{self.name}: {name}: {resp['error'].get('desc')}")
        return resp.get("return")

    def named(self, event: str, since: float = 0.0) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["event"] == event and e["t"] >= since]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(2)


def wait_for(cond: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}")


# ---- the pair --------------------------------------------------------------------------


@dataclass
class PairOptions:
    qemu: str
    guest: Path
    checkpoint_delay_ms: int = 2000
    failover: bool = False
    heartbeat_period: float = 0.5
    heartbeat_misses: int = 3
    memory_mb: int = 256
    data_heartbeat: bool = True
    """With --failover: probe both guests through the data path too (--heartbeat-dev)."""
    promoted_through_proxy: bool = True
    """With --failover: the promoted secondary's output goes out through colo-proxy."""
    proxy_extra: list[str] = field(default_factory=list)


class ColoPair:
    """Start and always stop: namespace, disk agent, colo-proxy, primary and secondary QEMU."""

    def __init__(self, opts: PairOptions, workdir: Path | None = None) -> None:
        self.opts = opts
        self.w = workdir or Path(tempfile.mkdtemp(prefix="c15-", dir="/tmp"))
        self.ns = f"c15-{os.getpid() % 100000}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.mons: dict[str, Monitor] = {}
        self.timings: dict[str, float] = {}
        self._ns_made = False

    # -- life cycle
    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        t0 = time.monotonic()
        self._netns()
        for img in ("primary.img", "secondary.img"):
            with open(self.w / img, "wb") as f:
                f.truncate(16 * 1024 * 1024)
        self._spawn("agent", self._python("-m", "colo_proxy.disk",
                    "--image", str(self.w / "secondary.img"),
                    "--nbd", f"unix:{self.w / 'agent.nbd'}",
                    "--qmp", f"unix:{self.w / 'agent.qmp'}"))
        wait_for(lambda: (self.w / "agent.nbd").exists() and (self.w / "agent.qmp").exists()
                 and self._alive("agent"), 30, "disk agent sockets")
        self._spawn("proxy", self._python(
            "-c", "import sys; from colo_proxy.cli import main; sys.exit(main())", "run",
            "--primary-in", f"unix:{self.w / 'pri_in.sock'}",
            "--secondary-in", f"unix:{self.w / 'sec_in.sock'},server",
            "--outdev", f"unix:{self.w / 'outdev.sock'}",
            "--qmp", f"unix:{self.w / 'p.qmp'}",
            "--secondary-qmp", f"unix:{self.w / 's.qmp'}",
            "--disk-qmp", f"unix:{self.w / 'agent.qmp'}",
            "--loop", "asyncio", *self._failover_flags(), *self.opts.proxy_extra))
        self._spawn("secondary", self._qemu("secondary"), netns=True)
        self._spawn("primary", self._qemu("primary"), netns=True)
        for role, short in (("primary", "p"), ("secondary", "s")):
            wait_for(lambda s=short: (self.w / f"{s}-ctl.qmp").exists(), 20, f"{role} QMP")
            self._alive(role)
            self.mons[role] = Monitor(self.w / f"{short}-ctl.qmp", role)
        self._colo()
        self.timings["colo_reached_s"] = time.monotonic() - t0

    def _colo(self) -> None:
        p, s = self.mons["primary"], self.mons["secondary"]
        s.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-colo", "state": True}])
        p.cmd("blockdev-add", driver="nbd", **{"node-name": "replica"},
              server={"type": "unix", "path": str(self.w / "agent.nbd")}, export="replication")
        p.cmd("blockdev-mirror", **{"job-id": "colo-disk", "copy-mode": "write-blocking"},
              device="disk0", target="replica", sync="full")
        wait_for(lambda: p.named("BLOCK_JOB_READY"), 60, "BLOCK_JOB_READY of the mirror")
        p.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-colo", "state": True}])
        p.cmd("migrate-set-parameters", **{"x-checkpoint-delay": self.opts.checkpoint_delay_ms})
        t = time.monotonic()
        p.cmd("migrate", uri=f"unix:{self.w / 'mig.sock'}")
        wait_for(lambda: self._alive("primary") and p.cmd("query-migrate").get("status") == "colo",
                 60, "migration status colo on the primary")
        self.timings["migrate_to_colo_s"] = time.monotonic() - t

    def wait_guest(self, timeout: float = 180.0) -> float:
        """Wait for the guest's ready line on the primary's console; seconds taken."""
        t = time.monotonic()
        wait_for(lambda: self._alive("primary")
                 and "COLO-GUEST-READY" in self.console("primary"), timeout, "guest boot")
        self.timings["guest_ready_s"] = time.monotonic() - t
        return self.timings["guest_ready_s"]

    def stop(self) -> dict[str, Any] | None:
        """Stop everything we started (our pids only); the proxy's final report if any."""
        report = None
        for mon in self.mons.values():
            mon.close()
        self.mons.clear()
        proxy = self.procs.get("proxy")
        if proxy is not None and proxy.poll() is None:
            proxy.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proxy.wait(15)
        for name in ("primary", "secondary", "proxy", "agent"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        with contextlib.suppress(Exception):
            report = self.proxy_report()
        if self._ns_made:
            subprocess.run(["ip", "netns", "del", self.ns], check=False)
            self._ns_made = False
        return report

    def cleanup(self) -> None:
        shutil.rmtree(self.w, ignore_errors=True)

    def kill(self, role: str) -> float:
        """SIGKILL one of our processes; the monotonic time of the kill."""
        proc = self.procs[role]
        t = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if role in self.mons:
            self.mons.pop(role).close()
        return t

    # -- observation
    def console(self, role: str) -> str:
        with contextlib.suppress(OSError):
            return (self.w / f"{role}.console").read_text(errors="replace")
        return ""

    def log(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return (self.w / f"{name}.log").read_text(errors="replace")
        return ""

    def proxy_stats(self) -> dict[str, Any]:
        """The proxy's counters, fresh (SIGUSR1 logs them as one JSON line)."""
        proxy = self.procs["proxy"]

        def complete() -> list[str]:  # the log may end inside a line being written
            text = self.log("proxy")
            return [x for x in text[:text.rfind("\n") + 1].splitlines() if ": stats {" in x]

        before = len(complete())
        proxy.send_signal(signal.SIGUSR1)
        lines = wait_for(lambda: (got := complete()) and len(got) > before and got, 10,
                         "proxy stats")
        stats: dict[str, Any] = json.loads(lines[-1].split(": stats ", 1)[1])
        return stats

    def proxy_report(self) -> dict[str, Any]:
        for line in reversed(self.log("proxy").splitlines()):
            if line.startswith('{"colo_proxy_report"'):
                report: dict[str, Any] = json.loads(line)["colo_proxy_report"]
                return report
        raise LookupError("no final report in the proxy log")

    def get(self, path: str, rate: int = 0, timeout: float = 120.0,
            background: bool = False) -> Any:
        """Run the client inside the namespace; its JSON result (or the Popen)."""
        cmd = ["ip", "netns", "exec", self.ns, sys.executable, str(Path(__file__)), "get",
               GUEST_IP, path, "--rate", str(rate), "--timeout", str(timeout)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if background:
            return proc
        return client_result(proc, timeout + 10)

    # -- helpers
    def _alive(self, role: str) -> bool:
        proc = self.procs[role]
        if proc.poll() is not None:
            raise RuntimeError(f"{role} exited with {proc.returncode}: {self.log(role)[-2000:]}")
        return True

    def _python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def _spawn(self, name: str, cmd: list[str], netns: bool = False) -> None:
        if netns:
            cmd = ["ip", "netns", "exec", self.ns, *cmd]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.w / f"{name}.log", "ab") as logf:
            self.procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                                stderr=subprocess.STDOUT, env=env)

    def _failover_flags(self) -> list[str]:
        if not self.opts.failover:
            return []
        flags = ["--failover", "--heartbeat-period", str(self.opts.heartbeat_period),
                 "--heartbeat-misses", str(self.opts.heartbeat_misses),
                 "--failover-mirror-job", "colo-disk"]
        if self.opts.data_heartbeat:
            flags += ["--heartbeat-dev", f"unix:{self.w / 'hb.sock'}",
                      "--heartbeat-guest-ip", GUEST_IP]
        if self.opts.promoted_through_proxy:
            flags += ["--secondary-outdev", f"unix:{self.w / 'sec_out.sock'}"]
            if self.opts.data_heartbeat:  # the new primary's own data probes (hbs)
                flags += ["--promoted-heartbeat-dev", f"unix:{self.w / 'hb_s.sock'}"]
        return flags

    def _netns(self) -> None:
        # a namespace of this name left by a crashed run of this pid is stale
        subprocess.run(["ip", "netns", "del", self.ns], check=False, stderr=subprocess.DEVNULL)
        sh("ip", "netns", "add", self.ns)
        self._ns_made = True
        ex = ["ip", "netns", "exec", self.ns]
        sh(*ex, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
        sh(*ex, "ip", "link", "add", "br0", "type", "bridge")
        for tap in ("tp", "ts"):
            sh(*ex, "ip", "tuntap", "add", "dev", tap, "mode", "tap")
            sh(*ex, "ip", "link", "set", tap, "master", "br0", "up")
        sh(*ex, "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "br0")
        sh(*ex, "ip", "link", "set", "br0", "up")
        sh(*ex, "ip", "link", "set", "lo", "up")

    def _qemu(self, role: str) -> list[str]:
        w, o = self.w, self.opts
        short = role[0]
        cmd = [o.qemu, "-name", role, "-M", "pc", "-accel", "tcg", "-m", str(o.memory_mb),
               "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
               "-serial", f"file:{w / f'{role}.console'}",
               "-kernel", str(o.guest / "vmlinuz"), "-initrd", str(o.guest / "initrd.img"),
               "-append", f"console=ttyS0 quiet colo_ip={GUEST_IP}/24",
               "-netdev", f"tap,id=hn0,ifname=t{short},script=no,downscript=no,vnet_hdr=off",
               "-device", f"virtio-net-pci,id=net0,netdev=hn0,mac={GUEST_MAC},romfile=",
               "-device", "virtio-blk-pci,drive=disk0",
               "-qmp", f"unix:{w / f'{short}.qmp'},server=on,wait=off",
               "-qmp", f"unix:{w / f'{short}-ctl.qmp'},server=on,wait=off"]
        for d in FIRMWARE_DIRS:
            cmd += ["-L", d]
        failover = o.failover
        if role == "primary":
            if failover and o.data_heartbeat:  # first: m0 must see (and mirror) the probes
                cmd += ["-chardev", f"socket,id=hb0,path={w / 'hb.sock'},server=on,wait=off",
                        "-object", "filter-redirector,id=hbin,netdev=hn0,queue=tx,indev=hb0"]
            cmd += [
                "-blockdev", f"driver=file,filename={w / 'primary.img'},node-name=disk0-file",
                "-blockdev", "driver=raw,file=disk0-file,node-name=disk0",
                "-chardev", f"socket,id=mirror0,path={w / 'mirror.sock'},server=on,wait=off",
                "-chardev", f"socket,id=compare0,path={w / 'pri_in.sock'},server=on,wait=off",
                "-chardev", f"socket,id=compare_out,path={w / 'outdev.sock'},server=on,wait=off",
                "-object", "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0",
                "-object", "filter-redirector,id=redire0,netdev=hn0,queue=rx,indev=compare_out",
                "-object", "filter-redirector,id=redire1,netdev=hn0,queue=rx,outdev=compare0",
                "-S",
            ]
        else:
            if failover and o.promoted_through_proxy:  # first: its frames go to the tap
                cmd += ["-chardev",
                        f"socket,id=sout0,path={w / 'sec_out.sock'},server=on,wait=off",
                        "-object", "filter-redirector,id=f3,netdev=hn0,queue=rx,indev=sout0"]
                if o.data_heartbeat:  # idle until a takeover: then probes into the guest
                    cmd += ["-chardev",
                            f"socket,id=hbs0,path={w / 'hb_s.sock'},server=on,wait=off",
                            "-object",
                            "filter-redirector,id=hbs,netdev=hn0,queue=tx,indev=hbs0"]
            cmd += [
                "-blockdev", f"driver=nbd,node-name=disk0,server.type=unix,"
                             f"server.path={w / 'agent.nbd'},export=secondary",
                "-chardev", f"socket,id=red0,path={w / 'mirror.sock'},reconnect-ms=200",
                "-chardev", f"socket,id=red1,path={w / 'sec_in.sock'},reconnect-ms=200",
                "-object", "filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0",
                "-object", "filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1",
                "-object", "filter-rewriter,id=rew0,netdev=hn0,queue=all",
                "-incoming", f"unix:{w / 'mig.sock'}",
            ]
        return cmd


# ---- the client (runs inside the namespace) --------------------------------------------


def client_result(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"client failed ({proc.returncode}): {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


def http_get(host: str, path: str, rate: int, timeout: float) -> dict[str, Any]:
    """HTTP/1.0 GET; with ``rate`` > 0 the body is read at about that many bytes/s."""
    t0 = time.time()
    sock = socket.create_connection((host, 80), timeout=timeout)
    if rate:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    port = sock.getsockname()[1]
    sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    chunks: list[bytes] = []
    first = None
    while True:
        data = sock.recv(4096)
        if not data:
            break
        if first is None:
            first = time.time()
        chunks.append(data)
        if rate:
            time.sleep(len(data) / rate)
    sock.close()
    raw = b"".join(chunks)
    # busybox httpd passes CGI output as it is: its header block may end in a bare "\n\n"
    ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := raw.find(sep)) >= 0]
    cut, sep_len = min(ends) if ends else (len(raw), 0)
    head, body = raw[:cut], raw[cut + sep_len:]
    return {
        "t_start": t0, "t_first_byte": first, "t_end": time.time(), "port": port,
        "status": head.split(b"\r\n", 1)[0].decode(errors="replace"),
        "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest(),
        "body": body[:512].decode(errors="replace"),
    }


def expected_data() -> bytes:
    """What the guest's /data holds (tools/colo_guest.sh writes the same lines)."""
    return b"".join(b"%063d\n" % i for i in range(16384))


# ---- CLI -------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a pair, print figures, run until Ctrl-C")
    up.add_argument("--checkpoint-delay", type=int, default=2000, metavar="MS")
    up.add_argument("--failover", action="store_true", help="colo-proxy heartbeats and failover")
    get = sub.add_parser("get", help="HTTP GET from inside the namespace, JSON on stdout")
    get.add_argument("host")
    get.add_argument("path")
    get.add_argument("--rate", type=int, default=0)
    get.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    if args.cmd == "get":
        print(json.dumps(http_get(args.host, args.path, args.rate, args.timeout)))
        return 0
    qemu, guest = colo_qemu(), guest_dir()
    if qemu is None or guest is None:
        print("need COLO_QEMU (tools/build_colo_qemu.sh) and the guest (tools/colo_guest.sh)",
              file=sys.stderr)
        return 2
    pair = ColoPair(PairOptions(qemu, guest, args.checkpoint_delay, args.failover))
    pair.start()
    try:
        print(f"COLO reached: {pair.timings}", flush=True)
        pair.wait_guest()
        print(f"guest ready: {pair.timings}; try: ip netns exec {pair.ns} "
              f"curl http://{GUEST_IP}/same", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    finally:
        report = pair.stop()
        print(json.dumps(report, default=str)[:4000])
        print(f"logs in {pair.w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
