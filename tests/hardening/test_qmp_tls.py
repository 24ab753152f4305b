"""`colo-proxy run --qmp tcp:... --qmp-tls-creds DIR` against a real QEMU whose QMP is TLS.

QEMU serves QMP on a TCP chardev with `tls-creds-x509` (`verify-peer=on`: our
client certificate is required), the model QEMU uses between hosts.  The proxy
follows a `stop`/`cont` made on QEMU's local QMP over that TLS session; with a
client that trusts the wrong CA there is no session and one clear error line.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.fakes import free_port, short_tmpdir
from tests.integration.qemu_helpers import needs_qemu, start_qemu

pytestmark = [pytest.mark.integration, needs_qemu]


class Proxy:
    """`colo-proxy run` with its log collected as it comes."""

    def __init__(self, d: Path, port: int, tls_dir: Path) -> None:
        self.proc = run_proxy(d, port, tls_dir)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, limit: float = 30.0) -> None:
        deadline = time.monotonic() + limit
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} in:\n" + "\n".join(self.lines)
            time.sleep(0.05)

    def stop(self) -> tuple[dict[str, Any], str]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.reader.join(timeout=10)
        err = "\n".join(self.lines)
        assert self.proc.returncode == 0, err
        line = next(x for x in self.lines if x.startswith('{"colo_proxy_report"'))
        report: dict[str, Any] = json.loads(line)["colo_proxy_report"]
        return report, err


def run_proxy(d: Path, port: int, tls_dir: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "colo_proxy.cli", "run",
           "--primary-in", f"unix:{d}/pin,server", "--secondary-in", f"unix:{d}/sin,server",
           "--outdev", f"unix:{d}/out,server", "--qmp", f"tcp:127.0.0.1:{port}",
           "--qmp-tls-creds", str(tls_dir), "--qmp-follow", "always",
           "--log-level", "info"]  # fmt: skip
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_qmp_over_mutual_tls_follows_checkpoints(tmp_path: Path,
                                                 creds: dict[str, Path]) -> None:
    port = free_port()
    short = short_tmpdir()
    for sub in ("good", "bad"):
        (short / sub).mkdir()
    local = str(short / "qmp")
    qemu = start_qemu(tmp_path, [], [
        "-object", f"tls-creds-x509,id=tls0,dir={creds['server']},endpoint=server,"
                   "verify-peer=on",
        "-chardev", f"socket,id=mon0,host=127.0.0.1,port={port},server=on,wait=off,"
                    "tls-creds=tls0",
        "-mon", "chardev=mon0,mode=control",
    ], local)  # fmt: skip
    good = bad = None
    try:
        good = Proxy(short / "good", port, creds["client"])
        good.wait_for("primary-qmp: QMP connected")
        mon = QEMUMonitorProtocol(local)
        mon.connect()
        mon.cmd("stop")
        mon.cmd("cont")
        mon.close()
        time.sleep(1.0)  # the STOP and RESUME events reach the proxy over TLS
        report, err = good.stop()
        good = None
        assert report["primary-qmp"]["sessions"] >= 1, err
        assert report["primary-qmp"]["checkpoints_done"] == 1, err
        bad = Proxy(short / "bad", port, creds["wrongca"])
        bad.wait_for("CERTIFICATE_VERIFY_FAILED")
        report, err = bad.stop()
        bad = None
        assert report["primary-qmp"]["sessions"] == 0
        assert "Traceback" not in err
    finally:
        for proxy in (good, bad):
            if proxy is not None and proxy.proc.poll() is None:
                proxy.proc.kill()
                proxy.proc.wait()
        qemu.kill()
        shutil.rmtree(short, ignore_errors=True)
