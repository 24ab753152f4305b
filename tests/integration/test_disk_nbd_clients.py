"""Real NBD clients (qemu-io, qemu-img) through a real disk-agent process."""

from __future__ import annotations

import random
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from colo_proxy.disk import nbd_proto as p
from tests.disk.agent_helpers import (
    AgentProcess,
    NbdClient,
    must,
    run,
    start_agent,
    tool,
    wait_event,
)
from tests.disk.nbdwire import request

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(tool("qemu-io") is None or tool("qemu-img") is None,
                       reason="qemu-io/qemu-img not installed (apt-get install qemu-utils)"),
]

SIZE = 8 << 20



@pytest.fixture
def agent(workdir: Path) -> Iterator[AgentProcess]:
    image = workdir / "secondary.img"
    image.write_bytes(random.Random(1).randbytes(SIZE))
    a = start_agent(workdir, image, "--memory-cap", "1M")
    yield a
    a.kill()


def qemu_io(target: str, *cmds: str, fmt: str = "raw") -> str:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    out = must(*args, target)
    assert "failed" not in out.lower(), out
    return out


def checkpoint(agent: AgentProcess, epoch: int) -> None:
    mon = agent.monitor()
    try:
        assert mon.cmd("colo-disk-checkpoint", epoch=epoch) == {"epoch": epoch}
        if mon.cmd("query-colo-disk")["applied-epoch"] < epoch:
            wait_event(mon, "COLO_DISK_EPOCH_APPLIED", {"epoch": epoch})
    finally:
        mon.close()


def test_qemu_io_writes_reach_image_at_checkpoint(agent: AgentProcess, workdir: Path) -> None:
    image = workdir / "secondary.img"
    reference = workdir / "reference.img"
    shutil.copy(image, reference)
    before = image.read_bytes()
    ops = ["write -P 0x11 0 64k", "write -P 0x22 32k 64k", "write -z 1M 128k",
           "discard 2M 4k", "write -P 0x33 8388096 512", "writev -P 0x44 4M 4k 8k"]
    qemu_io(agent.uri(), *ops)
    qemu_io(str(reference), *ops)
    # Speculation is visible through the replication export, not yet in the image.
    must("qemu-img", "compare", "-f", "raw", "-F", "raw", agent.uri(), str(reference))
    assert image.read_bytes() == before
    qemu_io(agent.uri(), "read -P 0x22 32k 64k", "read -P 0 1M 128k")
    checkpoint(agent, 1)
    must("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), str(reference))


def test_qemu_img_convert_into_export(agent: AgentProcess, workdir: Path) -> None:
    src = workdir / "src.img"
    src.write_bytes(random.Random(2).randbytes(SIZE))
    must("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), agent.uri())
    must("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), agent.uri())
    checkpoint(agent, 5)
    must("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(workdir / "secondary.img"))
    info = must("qemu-img", "info", "--output=json", agent.uri("secondary"))
    assert f'"virtual-size": {SIZE}' in info


def test_secondary_export_sees_own_writes_until_checkpoint(
        agent: AgentProcess, workdir: Path) -> None:
    qemu_io(agent.uri(), "write -P 0x55 0 64k")
    qemu_io(agent.uri("secondary"), "write -P 0x66 16k 4k")
    # The secondary VM sees committed state (not the primary's speculation) plus its writes.
    committed = (workdir / "secondary.img").read_bytes()
    sec = NbdClient(agent.nbd, "secondary")
    assert sec.read(0, 16384) == committed[:16384]
    assert sec.read(16384, 4096) == b"\x66" * 4096
    sec.close()
    checkpoint(agent, 1)
    # The checkpoint replaced the secondary's state with the primary's.
    qemu_io(agent.uri("secondary"), "read -P 0x55 0 64k")
    must("qemu-img", "compare", "-f", "raw", "-F", "raw", agent.uri("secondary"), agent.uri())


def test_failover_discards_speculation_keeps_secondary_writes(
        agent: AgentProcess, workdir: Path) -> None:
    # This test once expected the secondary's write at 3M to vanish too: that encoded
    # the bug.  The secondary VM runs on from its own state, so its writes stay.
    image = workdir / "secondary.img"
    qemu_io(agent.uri(), "write -P 0x77 0 1M")
    checkpoint(agent, 1)
    want = bytearray(image.read_bytes())
    qemu_io(agent.uri(), "write -P 0x88 512k 1M")  # the primary's speculation: dropped
    qemu_io(agent.uri("secondary"), "write -P 0x99 3M 4k", "write -P 0x9a 768k 8k",
            "write -z 6M 64k")
    want[3 << 20:(3 << 20) + 4096] = b"\x99" * 4096
    want[768 << 10:(768 << 10) + 8192] = b"\x9a" * 8192  # over epoch 1's data
    want[6 << 20:(6 << 20) + (64 << 10)] = bytes(64 << 10)
    mon = agent.monitor()
    assert mon.cmd("query-colo-disk")["speculation-bytes"] == 1 << 20
    assert mon.cmd("query-colo-disk")["secondary-bytes"] == 4096 + 8192 + (64 << 10)
    assert mon.cmd("colo-disk-failover") == {"epoch": 1}
    assert mon.cmd("query-colo-disk")["phase"] == "failed-over"
    mon.close()
    assert image.read_bytes() == want
    # The secondary reads its own writes back through NBD, now straight from the image.
    qemu_io(agent.uri("secondary"), "read -P 0x99 3M 4k", "read -P 0x9a 768k 8k",
            "read -P 0 6M 64k", "read -P 0x77 0 768k")
    # The primary is gone: its export refuses writes; the secondary now writes the disk.
    res = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", agent.uri())
    assert "failed" in (res.stdout + res.stderr).lower()
    qemu_io(agent.uri("secondary"), "write -P 0xaa 0 4k", "flush")
    assert image.read_bytes()[:4096] == b"\xaa" * 4096


def test_secondary_writes_across_failover_with_write_outs_pending(workdir: Path) -> None:
    """Epoch 2 possibly unapplied at failover; the overlay over it wins, then passthrough."""
    image = workdir / "secondary.img"
    image.write_bytes(bytes(SIZE))
    agent = start_agent(workdir, image, "--memory-cap", "0")
    try:
        qemu_io(agent.uri(), "write -P 0x11 0 2M")
        checkpoint(agent, 1)
        qemu_io(agent.uri(), "write -P 0x22 1M 2M")
        mon = agent.monitor()
        assert mon.cmd("colo-disk-checkpoint", epoch=2) == {"epoch": 2}
        qemu_io(agent.uri("secondary"), "write -P 0x33 2M 64k")  # over epoch 2's data
        fo = mon.cmd("colo-disk-failover")
        assert fo == {"epoch": 2}
        qemu_io(agent.uri("secondary"), "write -P 0x44 5M 4k")
        mon.close()
        data = image.read_bytes()
        assert data[:1 << 20] == b"\x11" * (1 << 20)
        assert data[1 << 20:2 << 20] == b"\x22" * (1 << 20)
        assert data[2 << 20:(2 << 20) + (64 << 10)] == b"\x33" * (64 << 10)
        assert data[(2 << 20) + (64 << 10):3 << 20] == b"\x22" * ((1 << 20) - (64 << 10))
        assert data[5 << 20:(5 << 20) + 4096] == b"\x44" * 4096
        qemu_io(agent.uri("secondary"), "read -P 0x33 2M 64k", "read -P 0x44 5M 4k")
    finally:
        agent.kill()


def test_many_concurrent_clients(agent: AgentProcess, workdir: Path) -> None:
    procs = [subprocess.Popen(
        ["qemu-io", "-f", "raw", "-c", f"write -P {i + 1} {i * 512}k 512k", agent.uri()],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(8)]
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
    checkpoint(agent, 1)
    data = (workdir / "secondary.img").read_bytes()
    for i in range(8):
        assert data[i * 524288:(i + 1) * 524288] == bytes([i + 1]) * 524288


def test_malformed_input_is_refused_without_damage(agent: AgentProcess, workdir: Path) -> None:
    image = workdir / "secondary.img"
    qemu_io(agent.uri(), "write -P 0x12 0 64k")
    checkpoint(agent, 1)
    before = image.read_bytes()
    # Handshake garbage and an over-long option: the server hangs up on that client only.
    for junk in (b"\xff" * 64, struct.pack(">IQII", 3, p.IHAVEOPT, p.OPT_GO, 1 << 30)):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(agent.nbd))
            s.recv(18)
            s.sendall(junk)
            while s.recv(4096):
                pass
    # Transmission: out-of-range, bad flags, unknown command, then a bad magic.
    c = NbdClient(agent.nbd)
    assert c.call(p.Command.READ, SIZE - 1, 2)[0] == p.EINVAL
    assert c.call(p.Command.WRITE, SIZE, 1, b"x")[0] == p.ENOSPC
    assert c.call(p.Command.WRITE, 0, 1, b"x", flags=0x80)[0] == p.EINVAL
    assert c.call(p.Command.WRITE_ZEROES, 2**63, 1)[0] == p.ENOSPC
    assert c.call(99)[0] == p.EINVAL
    assert c.read(0, 4) == b"\x12" * 4
    c.sock.sendall(b"\0" * 28)
    assert c.sock.recv(16) == b""
    c.close()
    # QMP garbage gets QEMU-style errors; the session and the agent survive.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(agent.qmp))
        f = s.makefile("rb")
        f.readline()
        s.sendall(b'{"execute": "qmp_capabilities"}\nnot json\n{"execute": 7}\n'
                  b'{"execute": "colo-disk-checkpoint", "arguments": {"epoch": -1}}\n'
                  b'{"execute": "colo-disk-checkpoint", "arguments": {"epoch": 1}}\n')
        replies = [f.readline() for _ in range(5)]
        assert b'"return"' in replies[0]
        assert all(b'"GenericError"' in r for r in replies[1:]), replies
    s2 = NbdClient(agent.nbd)
    s2.sock.sendall(request(p.Command.WRITE, 0, 1 << 20) + b"partial")
    s2.sock.close()  # a client dying mid-request changes nothing
    assert agent.proc.poll() is None
    mon = agent.monitor()
    status = mon.cmd("query-colo-disk")
    mon.close()
    assert status["epoch"] == 1 and status["nbd-protocol-errors"] >= 3
    assert image.read_bytes() == before
    must("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), agent.uri())


def test_tcp_listener_and_restart_keeps_epoch(workdir: Path) -> None:
    image = workdir / "img"
    image.write_bytes(bytes(1 << 20))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Through the main ``colo-proxy disk-agent`` entry, with a second (TCP) NBD listener.
    a = start_agent(workdir, image, "--nbd", f"tcp:127.0.0.1:{port}", main_cli=True)
    try:
        qemu_io(f"nbd://127.0.0.1:{port}/replication", "write -P 0x5a 0 4k")
        checkpoint(a, 3)
        mon = a.monitor()
        first_boot = mon.cmd("query-colo-disk")["boot-id"]
        mon.close()
    finally:
        assert a.stop() == 0
    b = start_agent(workdir, image)
    try:
        mon = b.monitor()
        status = mon.cmd("query-colo-disk")
        assert status["epoch"] == 3 and status["started-at-epoch"] == 3
        assert status["boot-id"] != first_boot
        mon.close()
        qemu_io(b.uri(), "read -P 0x5a 0 4k")
    finally:
        b.kill()
