"""QMP driver in COLO mode, against a scripted QMP server.

A real COLO pair cannot checkpoint under TCG on this QEMU (reference
section 8), so the COLO-mode paths are driven by a small server that speaks
the QMP wire protocol and answers as a primary in COLO state would: the
request re-sets the delay QEMU reports, a STOP in run state ``colo`` is a
checkpoint, a STOP in state ``paused`` is a user pause.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.drivers.qmp import QmpDriver


class FakePrimary:
    """Answers like a COLO primary; records the commands it received."""

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


async def until(cond: object, what: str) -> None:
    assert callable(cond)
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"gave up waiting for {what}")


async def checkpoint_cycle(fake: FakePrimary, events: list[str]) -> None:
    """One COLO checkpoint as QEMU shows it: STOP in run state colo, then RESUME."""
    fake.run_state = "colo"
    fake.event("STOP")
    await until(lambda: events == ["started"], "checkpoint start")
    fake.run_state = "running"
    fake.event("RESUME")
    await until(lambda: events == ["started", "done"], "checkpoint done")


def test_colo_checkpoint_followed_and_pause_ignored(sockdir: Path) -> None:
    async def main() -> None:
        fake = FakePrimary()
        server = await asyncio.start_unix_server(fake.serve, f"{sockdir}/qmp")
        events: list[str] = []
        exits: list[object] = []
        drv = QmpDriver(
            "primary",
            parse_endpoint(f"unix:{sockdir}/qmp"),
            on_checkpoint_started=lambda: events.append("started"),
            on_checkpoint_done=lambda: events.append("done"),
            on_colo_exit=exits.append,
        )
        drv.start()
        await until(lambda: drv.connected, "session")
        # request: the delay QEMU has is written back
        drv.request_checkpoint()
        await until(lambda: drv.stats.requests_sent == 1, "request")
        assert ("migrate-set-parameters", {"x-checkpoint-delay": 2000}) in fake.commands
        # a checkpoint: STOP in run state colo, then RESUME
        await checkpoint_cycle(fake, events)
        assert not drv.request_pending  # the STOP answered the request
        # a user pause while in COLO: STOP in state paused is not a checkpoint
        fake.run_state = "paused"
        fake.event("STOP")
        await until(lambda: drv.stats.pauses_ignored == 1, "pause recognised")
        fake.event("RESUME")
        await until(lambda: drv.stats.resumes == 2, "resume seen")
        assert events == ["started", "done"]
        assert drv.stats.checkpoints_done == 1
        # failover: COLO_EXIT reaches the runtime with QEMU's data
        fake.event("COLO_EXIT", {"mode": "primary", "reason": "request"})
        await until(lambda: exits == [{"mode": "primary", "reason": "request"}], "COLO_EXIT")
        await drv.close()
        server.close()

    asyncio.run(main())
