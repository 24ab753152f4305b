"""Test fakes and helpers shared by the driver, disk and hardening tests (one copy each).

A scripted QMP server (:class:`FakeQmp`, answering as a COLO primary would,
and :class:`FakeDiskAgent`, the disk agent's commands with acks the test can
hold back), the harness's side of ``colo-proxy run``'s four chardev sockets
(:class:`RecordPeer`), and the small things every socket test needs: a short
socket directory, a free loopback port, and a poll that never asserts on time.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from colo_proxy.core.framing import Frame, FrameDecoder, encode_frames

Runner = Callable[[Coroutine[Any, Any, None]], None]
"""asyncio.run or uvloop.run (the ``run_loop`` fixture gives both)."""


def short_tmpdir(prefix: str = "cpt-") -> Path:
    """A fresh directory under /tmp: unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(cond: Callable[[], object], what: str, limit: float = 30.0) -> None:
    """Poll ``cond`` on the running loop until it holds; fail after ``limit`` seconds.

    A bound on waiting for something that must happen, not a timed assertion.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.005)


async def read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    """``n`` bytes from ``reader``, or fail after 10 s."""
    return await asyncio.wait_for(reader.readexactly(n), 10)


# ---------------------------------------------------------------- scripted QMP servers


class FakeQmp:
    """Speaks the QMP wire protocol and answers like a COLO primary; records the commands.

    Serve it with ``asyncio.start_unix_server(fake.serve, path)``.  A STOP sent
    (:meth:`event`) while ``run_state`` is ``colo`` is a checkpoint to the
    driver, in ``paused`` a user pause.
    """

    def __init__(self) -> None:
        self.run_state = "running"
        self.commands: list[tuple[str, Any]] = []
        self.writer: asyncio.StreamWriter | None = None

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.writer = w
        greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                        "package": ""}, "capabilities": []}}  # fmt: skip
        w.write(json.dumps(greeting).encode() + b"\r\n")
        decoder, buf = json.JSONDecoder(), ""
        while chunk := await r.read(4096):  # qemu.qmp sends JSON objects without newlines
            buf = (buf + chunk.decode()).lstrip()
            while buf:
                try:
                    msg, end = decoder.raw_decode(buf)
                except json.JSONDecodeError:
                    break
                buf = buf[end:].lstrip()
                self.answer(w, msg)

    def answer(self, w: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        cmd, args = msg["execute"], msg.get("arguments")
        self.commands.append((cmd, args))
        ret: Any = {}
        if cmd == "query-status":
            ret = {"status": self.run_state, "running": self.run_state == "running"}
        elif cmd == "query-colo-status":
            ret = {"mode": "primary", "last-mode": "none", "reason": "none"}
        elif cmd == "query-migrate-parameters":
            ret = {"x-checkpoint-delay": 2000}
        self.reply(w, msg, ret)

    @staticmethod
    def reply(w: asyncio.StreamWriter, msg: dict[str, Any], ret: object) -> None:
        reply: dict[str, Any] = {"return": ret}
        if "id" in msg:
            reply["id"] = msg["id"]
        w.write(json.dumps(reply).encode() + b"\r\n")

    def event(self, name: str, data: dict[str, Any] | None = None) -> None:
        assert self.writer is not None
        msg: dict[str, Any] = {"event": name, "timestamp": {"seconds": 0, "microseconds": 0}}
        if data is not None:
            msg["data"] = data
        self.writer.write(json.dumps(msg).encode() + b"\r\n")


async def checkpoint_cycle(fake: FakeQmp, events: list[str]) -> None:
    """One COLO checkpoint as QEMU shows it: STOP in run state colo, then RESUME."""
    fake.run_state = "colo"
    fake.event("STOP")
    await until(lambda: events == ["started"], "checkpoint start")
    fake.run_state = "running"
    fake.event("RESUME")
    await until(lambda: events == ["started", "done"], "checkpoint done")


class FakeDiskAgent(FakeQmp):
    """Answers the disk agent's commands; ``hold`` keeps checkpoint acks until ``ack()``."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        self.hold = False
        self.held: list[tuple[asyncio.StreamWriter, dict[str, Any]]] = []

    def answer(self, w: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        cmd = msg["execute"]
        if cmd == "query-colo-disk":
            self.commands.append((cmd, None))
            self.reply(w, msg, {"epoch": self.epoch, "boot-id": "boot-1"})
        elif cmd == "colo-disk-checkpoint":
            self.commands.append((cmd, msg["arguments"]))
            self.held.append((w, msg))
            if not self.hold:
                self.ack()
        else:
            super().answer(w, msg)

    def ack(self) -> None:
        for w, msg in self.held:
            self.epoch = msg["arguments"]["epoch"]
            self.reply(w, msg, {"epoch": self.epoch})
        self.held.clear()


# ---------------------------------------------------------------- QEMU's side of `run`


class RecordPeer:
    """The harness/Xen side of ``run``'s four sockets (pin, sin, out, ntf in one directory)."""

    def __init__(self, d: Path, vnet: bool) -> None:
        self.d, self.vnet = d, vnet
        self.out_frames: list[Frame] = []
        self.notify_text: list[str] = []

    async def connect(self) -> None:
        self.out_r, self.out_w = await asyncio.open_unix_connection(f"{self.d}/out")
        self.ntf_r, self.ntf_w = await asyncio.open_unix_connection(f"{self.d}/ntf")
        _, self.pin = await asyncio.open_unix_connection(f"{self.d}/pin")
        _, self.sin = await asyncio.open_unix_connection(f"{self.d}/sin")
        self.tasks = [asyncio.create_task(self._read_out()), asyncio.create_task(self._read_ntf())]

    async def _read_out(self) -> None:
        dec = FrameDecoder(self.vnet)
        while chunk := await self.out_r.read(65536):
            self.out_frames += dec.feed(chunk)

    async def _read_ntf(self) -> None:
        buf = b""
        while chunk := await self.ntf_r.read(65536):
            buf += chunk
            while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                n = struct.unpack(">I", buf[:4])[0]
                self.notify_text.append(buf[4 : 4 + n].decode())
                buf = buf[4 + n :]

    def frames(self, frames: list[bytes]) -> bytes:
        vh = b"\x00" * 12 if self.vnet else b""
        return encode_frames([(vh + f, len(vh)) for f in frames], self.vnet)
