"""Start and always stop guest-less QEMU processes for integration tests.

Reference section 4: ``-M none`` with ``-netdev socket,fd=N`` netdevs, each on
a hub with a second, always-ready socket port, carries bulk traffic through
netfilters reliably without a guest.  Our ends of the socketpairs speak the
netdev socket framing (``[u32 BE len][frame]``, never a vnet word).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from colo_proxy.core.framing import Frame, FrameDecoder, encode_frames

QEMU = shutil.which("qemu-system-x86_64")

needs_qemu = pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
)


def short_tmpdir() -> str:
    """Unix socket paths must stay under 108 bytes: use /tmp, not pytest's tmp_path."""
    return tempfile.mkdtemp(prefix="cp-", dir="/tmp")


@dataclass
class QemuProcess:
    """A running QEMU plus our ends of its socket netdevs."""

    proc: subprocess.Popen[bytes]
    ports: dict[str, socket.socket] = field(default_factory=dict)
    sinks: list[socket.socket] = field(default_factory=list)
    stderr_path: str = ""

    def stderr(self) -> str:
        with contextlib.suppress(OSError), open(self.stderr_path) as f:
            return f.read()
        return ""

    def kill(self) -> None:
        """SIGKILL this QEMU (only the pid we started) and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        for s in [*self.ports.values(), *self.sinks]:
            s.close()


def start_qemu(
    workdir: str | os.PathLike[str], netdevs: list[str], extra: list[str],
    qmp_path: str | None = None,
) -> QemuProcess:
    """Start ``qemu-system-x86_64 -M none`` with one hubbed socket netdev per id."""
    assert QEMU is not None
    cmd = [QEMU, "-M", "none", "-nodefaults", "-no-user-config", "-display", "none"]
    if qmp_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(qmp_path)  # a killed QEMU leaves its socket file behind
        cmd += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
    ours: dict[str, socket.socket] = {}
    sinks: list[socket.socket] = []
    theirs: list[socket.socket] = []
    for hub, nid in enumerate(netdevs):
        mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sink, sink_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours[nid] = mine
        sinks.append(sink)
        theirs += [peer, sink_peer]
        cmd += [
            "-netdev", f"socket,id={nid},fd={peer.fileno()}",
            "-netdev", f"socket,id=sink{hub},fd={sink_peer.fileno()}",
            "-netdev", f"hubport,id=hp{hub}a,hubid={hub},netdev={nid}",
            "-netdev", f"hubport,id=hp{hub}b,hubid={hub},netdev=sink{hub}",
        ]  # fmt: skip
    cmd += extra
    stderr_path = os.path.join(workdir, f"qemu-{time.monotonic_ns()}.log")
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            pass_fds=[s.fileno() for s in theirs],
        )
    for s in theirs:
        s.close()
    qp = QemuProcess(proc, ours, sinks, stderr_path)
    for sink in sinks:  # keep the always-ready hub ports drained
        threading.Thread(target=_drain, args=(sink,), daemon=True).start()
    if qmp_path:
        deadline = time.monotonic() + 20
        while not os.path.exists(qmp_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                qp.kill()
                raise RuntimeError("QEMU did not start: " + qp.stderr())
            time.sleep(0.01)
    return qp


def wait_chardev_connected(qmp_path: str, *chardevs: str, timeout: float = 20.0) -> None:
    """Wait until QEMU itself reports every named chardev connected (QMP query-chardev).

    Our accept() can return before QEMU's reconnecting chardev has switched to
    connected; a filter writing in that window drops the frame, so tests must
    wait for QEMU's view, as the shared harness does.
    """
    from qemu.qmp.legacy import QEMUMonitorProtocol

    deadline = time.monotonic() + timeout
    while not os.path.exists(qmp_path):  # a second -qmp socket may appear after the first
        if time.monotonic() > deadline:
            raise AssertionError(f"QEMU never created {qmp_path}")
        time.sleep(0.01)
    mon = QEMUMonitorProtocol(qmp_path)
    mon.connect()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = {dev["label"]: dev["filename"] for dev in mon.cmd("query-chardev")}
            if all(not state.get(c, "disconnected").startswith("disconnected") for c in chardevs):
                return
            time.sleep(0.01)
        raise AssertionError(f"QEMU never connected chardevs {chardevs}: {state}")
    finally:
        mon.close()


@contextlib.contextmanager
def running_qemu(
    workdir: str | os.PathLike[str], netdevs: list[str], extra: list[str],
    qmp_path: str | None = None,
) -> Iterator[QemuProcess]:
    qp = start_qemu(workdir, netdevs, extra, qmp_path)
    try:
        yield qp
    except BaseException:
        print(f"QEMU exit status {qp.proc.poll()}; its output:\n{qp.stderr()}")
        raise
    finally:
        qp.kill()


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(1 << 16):
            pass


def send_netdev_frames(sock: socket.socket, frames: list[bytes]) -> None:
    """Inject frames into QEMU through a socket netdev (as a guest NIC would send them)."""
    sock.sendall(encode_frames([(f, 0) for f in frames], False))


def recv_netdev_frames(sock: socket.socket, count: int, timeout: float = 20.0) -> list[bytes]:
    """Read ``count`` frames that QEMU sent out of a socket netdev."""
    dec = FrameDecoder(False)
    got: list[Frame] = []
    sock.settimeout(timeout)
    while len(got) < count:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        got += dec.feed(chunk)
        assert dec.error is None, dec.error
    return [data for data, _ in got]


def make_frames(count: int, seed: int = 1) -> list[bytes]:
    """Distinct Ethernet-looking frames of many sizes, including near the 64 KiB mark."""
    frames = []
    for i in range(count):
        size = 60 + (i * 977 + seed) % 1455
        if i % 97 == 5:
            size = 65000
        head = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"
        body = (i.to_bytes(4, "big") + bytes([seed & 0xFF])) * (size // 5 + 1)
        frames.append(head + body[: size - len(head)])
    return frames


CLIENT_MAC, GUEST_MAC = "02:00:00:00:00:02", "02:00:00:00:00:01"
CLIENT_IP, GUEST_IP = "10.0.0.2", "10.0.0.1"


def client_segment(flags: str, seq: int, ack: int = 0) -> bytes:
    """What the client (10.0.0.2:40000) sends to the guest's port 80 (needs scapy)."""
    from scapy.all import IP, TCP, Ether

    pkt = Ether(src=CLIENT_MAC, dst=GUEST_MAC) / IP(src=CLIENT_IP, dst=GUEST_IP) / TCP(
        sport=40000, dport=80, flags=flags, seq=seq, ack=ack
    )  # fmt: skip
    return bytes(pkt)


def guest_reply(isn: int, client_isn: int, payload: bytes, seg: int) -> list[bytes]:
    """A server guest's output: SYN-ACK, then `payload` in `seg`-byte segments (needs scapy)."""
    from scapy.all import IP, TCP, Ether

    head = Ether(src=GUEST_MAC, dst=CLIENT_MAC) / IP(src=GUEST_IP, dst=CLIENT_IP)
    out = [head / TCP(sport=80, dport=40000, flags="SA", seq=isn, ack=client_isn + 1)]
    for off in range(0, len(payload), seg):
        out.append(
            head / TCP(sport=80, dport=40000, flags="PA", seq=isn + 1 + off, ack=client_isn + 1)
            / payload[off : off + seg]
        )  # fmt: skip
    return [bytes(f) for f in out]
