"""COLO that begins after the QMP session did: the first checkpoint must still count.

Seen on the real pair: colo-proxy connects to the primary before ``migrate``
(COLO mode ``none``); QEMU announces the switch to COLO with a MIGRATION event
only when the ``events`` migration capability is on, which COLO-FT.txt never
sets.  The driver must ask again at a STOP instead of taking every checkpoint
for a user pause for ever.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.drivers.qmp import QmpDriver
from tests.fakes import FakeQmp, checkpoint_cycle, until


class LatePrimary(FakeQmp):
    """A primary that is not in COLO mode until ``mode`` says so."""

    mode = "none"

    def answer(self, w: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        if msg["execute"] != "query-colo-status":
            super().answer(w, msg)
            return
        self.commands.append((msg["execute"], None))
        reply = {"return": {"mode": self.mode, "last-mode": "none", "reason": "none"},
                 "id": msg.get("id")}
        w.write(json.dumps(reply).encode() + b"\r\n")


def test_colo_begun_after_connect_is_followed(sockdir: Path) -> None:
    async def main() -> None:
        fake = LatePrimary()
        server = await asyncio.start_unix_server(fake.serve, f"{sockdir}/qmp")
        events: list[str] = []
        drv = QmpDriver("primary", parse_endpoint(f"unix:{sockdir}/qmp"),
                        on_checkpoint_started=lambda: events.append("started"),
                        on_checkpoint_done=lambda: events.append("done"))
        drv.start()
        await until(lambda: drv.connected, "session")
        fake.run_state = "paused"  # before COLO: a pause stays a pause
        fake.event("STOP")
        await until(lambda: drv.stats.pauses_ignored == 1, "pause recognised")
        fake.run_state = "running"
        fake.event("RESUME")
        fake.mode = "primary"  # COLO begins; no MIGRATION event (no `events` capability)
        await checkpoint_cycle(fake, events)
        assert drv.stats.pauses_ignored == 1
        await drv.close()
        server.close()

    asyncio.run(main())


def test_request_after_colo_began_is_not_called_outside_colo(sockdir: Path) -> None:
    """The mode read at connect is asked again before a request is called futile."""

    async def main() -> None:
        fake = LatePrimary()
        server = await asyncio.start_unix_server(fake.serve, f"{sockdir}/qmp")
        drv = QmpDriver("primary", parse_endpoint(f"unix:{sockdir}/qmp"))
        drv.start()
        await until(lambda: drv.connected, "session")
        drv.request_checkpoint()  # before COLO: QEMU takes it and will not checkpoint
        # (a request is counted as sent before the mode is asked again: wait for the answer)
        await until(lambda: drv.stats.requests_outside_colo == 1, "first request, outside COLO")
        fake.mode = "primary"  # COLO begins; nothing tells the driver
        # the resend asks again and decides at once, with no wait between the two
        await until(lambda: drv.stats.colo_status.get("mode") == "primary", "mode asked again")
        assert drv.stats.requests_sent == 2
        assert drv.stats.requests_outside_colo == 1
        await drv.close()
        server.close()

    asyncio.run(main())
