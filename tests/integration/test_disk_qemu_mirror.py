"""A real QEMU mirrors a blockdev-added file node into the agent (write-blocking mode).

Guest-less QEMU (``-M none``); writes come from HMP ``qemu-io`` on the mirror's
filter node, so they take the same synchronous path a guest's writes would.  The
checkpoint flow is the Remus one: STOP the primary, checkpoint the disk agent,
CONT; output may be released only once both are done (``CommitGate``).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from colo_proxy.disk.gate import CommitGate
from tests.disk.agent_helpers import AgentProcess, start_agent, tool, wait_event
from tests.fakes import short_tmpdir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(tool("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"),
    pytest.mark.skipif(tool("qemu-img") is None or tool("qemu-io") is None,
                       reason="qemu-img/qemu-io not installed (apt-get install qemu-utils)"),
]

SIZE = 8 << 20


class Qemu:
    """A guest-less QEMU with a QMP monitor; block I/O through HMP ``qemu-io``."""

    def __init__(self, workdir: Path, name: str) -> None:
        qmp = workdir / f"{name}.sock"
        self.log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-no-user-config",
             "-display", "none", "-qmp", f"unix:{qmp},server=on,wait=on"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while not qmp.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"QEMU {name} did not start")
            time.sleep(0.02)
        self.mon = QEMUMonitorProtocol(str(qmp))
        self.mon.connect()

    def cmd(self, command: str, /, **args: Any) -> Any:
        return self.mon.cmd(command, **args)

    def hmp_qemu_io(self, node: str, command: str) -> str:
        out: str = self.cmd("human-monitor-command",
                            **{"command-line": f'qemu-io {node} "{command}"'})
        return out

    def stop(self) -> None:
        if hasattr(self, "mon"):
            with contextlib.suppress(Exception):
                self.mon.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


class Primary(Qemu):
    """disk0 (a blockdev-added file node) mirrored into the agent's replication export."""

    def __init__(self, workdir: Path, image: Path, agent: AgentProcess) -> None:
        super().__init__(workdir, "primary")
        self.image_path = image
        self.cmd("blockdev-add", driver="file", filename=str(image), **{"node-name": "disk0"})
        self.cmd("blockdev-add", driver="nbd", export="replication",
                 server={"type": "unix", "path": str(agent.nbd)}, **{"node-name": "target"})
        self.cmd("blockdev-mirror", device="disk0", target="target", sync="full",
                 **{"job-id": "mirror0", "copy-mode": "write-blocking",
                    "filter-node-name": "mtop"})
        wait_event(self.mon, "BLOCK_JOB_READY", {"device": "mirror0"})

    def qemu_io(self, command: str) -> None:
        out = self.hmp_qemu_io("mtop", command)
        assert "error" not in out.lower() and "failed" not in out.lower(), out


@pytest.fixture
def setup() -> Iterator[tuple[Path, AgentProcess, Primary]]:
    wd = short_tmpdir()
    (wd / "primary.img").write_bytes(random.Random(7).randbytes(SIZE))
    (wd / "secondary.img").write_bytes(bytes(SIZE))
    agent = start_agent(wd, wd / "secondary.img", "--memory-cap", "2M")
    primary: Primary | None = None
    try:
        primary = Primary(wd, wd / "primary.img", agent)
        yield wd, agent, primary
    finally:
        if primary is not None:
            primary.stop()
        agent.kill()
        shutil.rmtree(wd, ignore_errors=True)


def random_writes(primary: Primary, rng: random.Random, count: int) -> None:
    for _ in range(count):
        off = rng.randrange(0, SIZE // 512 - 256) * 512
        n = rng.choice([512, 4096, 65536, 131072])
        kind = rng.random()
        if kind < 0.1:
            primary.qemu_io(f"write -z {off} {n}")
        else:
            primary.qemu_io(f"write -P {rng.randrange(1, 200)} {off} {n}")


def vm_read(uri: str, command: str) -> str:
    res = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", command, uri],
                         capture_output=True, text=True, timeout=60, check=False)
    assert "read " in res.stdout or "failed" in res.stdout, res.stdout + res.stderr
    return res.stdout


def checkpoint(primary: Primary, agent_mon: QEMUMonitorProtocol, gate: CommitGate,
               epoch: int) -> tuple[bytes, int | None]:
    """STOP, disk checkpoint, CONT; returns the primary image at the checkpoint."""
    primary.cmd("stop")
    wait_event(primary.mon, "STOP")
    snapshot = primary.image_path.read_bytes()
    assert agent_mon.cmd("colo-disk-checkpoint", epoch=epoch) == {"epoch": epoch}
    # The disk acknowledged, but the VM checkpoint is not complete: nothing may go out.
    assert gate.disk_acked(epoch) is None
    primary.cmd("cont")
    wait_event(primary.mon, "RESUME")
    return snapshot, gate.memory_done(epoch)


def test_mirror_checkpoint_and_failover(setup: tuple[Path, AgentProcess, Primary]) -> None:
    wd, agent, primary = setup
    secondary = wd / "secondary.img"
    rng = random.Random(11)
    mon = agent.monitor()
    gate = CommitGate()
    # COLO mode: a second QEMU plays the running secondary VM on the secondary export.
    vm = Qemu(wd, "secondary-vm")
    try:
        vm.cmd("blockdev-add", driver="nbd", export="secondary",
               server={"type": "unix", "path": str(agent.nbd)}, **{"node-name": "sdisk"})
        # HMP qemu-io prints to QEMU's stdout, so look at the VM's disk from outside
        # through the VM's own NBD server: reads go through QEMU's NBD client to the agent.
        vm.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(wd / "vm.nbd")}})
        vm.cmd("block-export-add", type="nbd", id="vmdisk", name="vmdisk",
               **{"node-name": "sdisk"})
        vm_uri = f"nbd+unix:///vmdisk?socket={wd / 'vm.nbd'}"
        for epoch in (1, 2, 3):
            random_writes(primary, rng, 20)
            own = rng.randrange(0, SIZE // 65536) * 65536
            vm.hmp_qemu_io("sdisk", f"write -P 0xee {own} 64k")
            assert "failed" not in vm_read(vm_uri, f"read -P 0xee {own} 64k")
            snapshot, released = checkpoint(primary, mon, gate, epoch)
            assert released == epoch
            if mon.cmd("query-colo-disk")["applied-epoch"] < epoch:
                wait_event(mon, "COLO_DISK_EPOCH_APPLIED", {"epoch": epoch})
            assert secondary.read_bytes() == snapshot, f"epoch {epoch}"
            # The checkpoint threw the secondary VM's own write away.
            assert "Pattern verification failed" in vm_read(vm_uri, f"read -P 0xee {own} 64k")
            # The running secondary VM's export sees exactly the committed state too.
            res = subprocess.run(
                ["qemu-img", "compare", "-f", "raw", "-F", "raw", agent.uri("secondary"),
                 str(secondary)], capture_output=True, text=True, timeout=60, check=False)
            assert res.returncode == 0, res.stdout + res.stderr
        # Writes after the last checkpoint reach the agent but must not survive failover.
        random_writes(primary, rng, 10)
        status = mon.cmd("query-colo-disk")
        assert status["speculation-bytes"] > 0
        assert (wd / "primary.img").read_bytes() != snapshot
        primary.stop()  # the primary dies
        assert mon.cmd("colo-disk-failover") == {"epoch": 3}
        assert secondary.read_bytes() == snapshot
        # After takeover the secondary VM writes the disk itself.
        vm.hmp_qemu_io("sdisk", "write -P 0xdd 0 4k")
        vm.hmp_qemu_io("sdisk", "flush")
        assert secondary.read_bytes()[:4096] == b"\xdd" * 4096
    finally:
        vm.stop()
        mon.close()
