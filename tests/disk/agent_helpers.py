"""Start and always stop a real ``python3 -m colo_proxy.disk`` process; tiny sync clients."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from colo_proxy.disk import nbd_proto as p
from tests.disk.nbdwire import go_payload, option, request

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    nbd: Path
    qmp: Path
    log: Path

    def uri(self, export: str = "replication") -> str:
        return f"nbd+unix:///{export}?socket={self.nbd}"

    def monitor(self) -> QEMUMonitorProtocol:
        mon = QEMUMonitorProtocol(str(self.qmp))
        mon.connect()
        return mon

    def stderr(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()
        return ""

    def kill(self) -> None:
        """SIGKILL only this pid and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def start_agent(workdir: Path, image: Path, *extra: str, main_cli: bool = False) -> AgentProcess:
    """Run ``python3 -m colo_proxy.disk`` (or ``colo-proxy disk-agent`` via the main CLI)."""
    nbd, qmp, log = workdir / "nbd.sock", workdir / "qmp.sock", workdir / "agent.log"
    for sock in (nbd, qmp):
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "ab") as err:
        entry = (["-c", "import sys; from colo_proxy.cli import main; sys.exit(main())",
                  "disk-agent"] if main_cli else ["-m", "colo_proxy.disk"])
        proc = subprocess.Popen(
            [sys.executable, *entry, "--image", str(image),
             "--nbd", f"unix:{nbd}", "--qmp", f"unix:{qmp}", *extra],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, cwd=ROOT)
    agent = AgentProcess(proc, nbd, qmp, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"disk agent exited {proc.returncode}: {agent.stderr()}")
        if nbd.exists() and qmp.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(qmp))
                    return agent
                except OSError:
                    pass
        time.sleep(0.02)
    agent.kill()
    raise RuntimeError(f"disk agent did not start: {agent.stderr()}")


def tool(name: str) -> str | None:
    return shutil.which(name)


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def must(*cmd: str) -> str:
    res = run(*cmd)
    assert res.returncode == 0, f"{cmd}: {res.stdout}{res.stderr}"
    return res.stdout


def wait_event(mon: QEMUMonitorProtocol, name: str, match: dict[str, Any] | None = None,
               timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = mon.pull_event(wait=max(0.01, deadline - time.monotonic()))
        if ev and ev["event"] == name and all(
                ev.get("data", {}).get(k) == v for k, v in (match or {}).items()):
            return ev
    raise TimeoutError(f"no {name} event")


class NbdClient:
    """A blocking NBD client over a unix socket: enough to drive and to abuse the server."""

    def __init__(self, path: Path, export: str = "replication") -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self._recv(18)
        self.sock.sendall(struct.pack(">I", 3) + option(p.OPT_GO, go_payload(export)))
        self.size = 0
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", self._recv(20))
            assert magic == p.REPLY_MAGIC_OPT
            body = self._recv(length)
            if rtype == p.REP_INFO and struct.unpack_from(">H", body)[0] == p.INFO_EXPORT:
                self.size = struct.unpack_from(">Q", body, 2)[0]
            elif rtype == p.REP_ACK:
                break
            else:
                raise OSError(f"NBD option error {rtype:#x}: {body!r}")
        self._handle = 0

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def call(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"",
             flags: int = 0) -> tuple[int, bytes]:
        self._handle += 1
        self.sock.sendall(request(cmd, offset, length, self._handle, flags, data))
        magic, err, handle = struct.unpack(">IIQ", self._recv(16))
        assert magic == p.SIMPLE_REPLY_MAGIC and handle == self._handle
        body = self._recv(length) if cmd == p.Command.READ and err == 0 else b""
        return err, body

    def write(self, offset: int, data: bytes) -> None:
        err, _ = self.call(p.Command.WRITE, offset, len(data), data)
        assert err == 0, f"NBD write error {err}"

    def read(self, offset: int, length: int) -> bytes:
        err, body = self.call(p.Command.READ, offset, length)
        assert err == 0, f"NBD read error {err}"
        return body

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(request(p.Command.DISC))
        self.sock.close()
