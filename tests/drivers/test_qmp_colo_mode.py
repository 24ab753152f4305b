"""QMP driver in COLO mode, against a scripted QMP server.

A real COLO pair cannot checkpoint under TCG on this QEMU (reference
section 8), so the COLO-mode paths are driven by a small server that speaks
the QMP wire protocol and answers as a primary in COLO state would: the
request re-sets the delay QEMU reports, a STOP in run state ``colo`` is a
checkpoint, a STOP in state ``paused`` is a user pause.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.drivers.qmp import QmpDriver
from tests.fakes import FakeQmp, checkpoint_cycle, until


def test_colo_checkpoint_followed_and_pause_ignored(sockdir: Path) -> None:
    async def main() -> None:
        fake = FakeQmp()
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
