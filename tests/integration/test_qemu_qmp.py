"""The QMP driver against a real ``qemu-system-x86_64 -machine none -qmp unix:...``.

Outside COLO state QEMU accepts ``migrate-set-parameters x-checkpoint-delay``
but does not checkpoint, so what is tested here is: negotiation, the request
reaching QEMU (accepted, the operator's delay unchanged, re-sent while no
checkpoint follows), QEMU's error text, STOP/RESUME following with ``stop``
and ``cont`` under both follow policies, and a QEMU killed and restarted
with a request pending.  A real checkpoint (STOP/RESUME caused by the
request) needs a COLO pair, which hangs under TCG on this QEMU
(reference section 8).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.drivers.qmp import FollowPolicy, QmpDriver
from tests.fakes import until
from tests.integration.qemu_helpers import QemuProcess, needs_qemu, start_qemu

pytestmark = [pytest.mark.integration, needs_qemu]



def qemu_with_operator_qmp(workdir: Path) -> tuple[QemuProcess, str, str]:
    """QEMU with the driver's QMP socket and a second one for the test, the 'operator'."""
    qmp, op_qmp = f"{workdir}/qmp.sock", f"{workdir}/op.sock"
    qemu = start_qemu(workdir, [], ["-qmp", f"unix:{op_qmp},server=on,wait=off"], qmp)
    return qemu, qmp, op_qmp


def recording_driver(
    qmp: str, events: list[str], follow: FollowPolicy = FollowPolicy.COLO,
    request_timeout: float = 5.0,
) -> QmpDriver:
    """A driver that appends "started"/"done" to `events` as it follows STOP/RESUME."""
    return QmpDriver(
        "primary",
        parse_endpoint(f"unix:{qmp}"),
        on_checkpoint_started=lambda: events.append("started"),
        on_checkpoint_done=lambda: events.append("done"),
        follow=follow,
        request_timeout=request_timeout,
    )


def run_then_kill(qemu: QemuProcess, test: Coroutine[None, None, None]) -> None:
    """Run the test's coroutine; QEMU is killed whatever happens."""
    try:
        asyncio.run(test)
    finally:
        qemu.kill()


async def other_client(path: str) -> QMPClient:
    """A second, independent QMP session (QEMU's monitor as an operator would use it)."""
    client = QMPClient("test")
    await client.connect(path)
    return client


def test_negotiation_stop_resume_and_request(workdir: Path) -> None:
    qemu, qmp, op_qmp = qemu_with_operator_qmp(workdir)

    async def main() -> None:
        events: list[str] = []
        drv = recording_driver(qmp, events, FollowPolicy.ALWAYS, request_timeout=0.2)
        drv.start()
        await until(drv.connected_event.is_set, "QMP session and its first status")
        assert drv.stats.run_status == "running"
        assert drv.stats.colo_status.get("mode") == "none"
        op = await other_client(op_qmp)
        # STOP/RESUME following
        await op.execute("stop")
        await until(lambda: events == ["started"], "STOP followed")
        await op.execute("cont")
        await until(lambda: events == ["started", "done"], "RESUME followed")
        # the checkpoint request reaches QEMU and keeps the operator's delay
        await op.execute("migrate-set-parameters", {"x-checkpoint-delay": 12345})
        drv.request_checkpoint()
        await until(lambda: drv.stats.requests_sent >= 1, "request sent")
        params = await op.execute("query-migrate-parameters")
        assert isinstance(params, dict) and params["x-checkpoint-delay"] == 12345
        # outside COLO no STOP follows: the request is sent again, not forgotten
        await until(lambda: drv.stats.requests_resent >= 1, "request re-sent")
        assert drv.request_pending
        # an operator's change of the delay is kept by later requests.  A request
        # between its read and its write of the delay would write the old value back
        # (QMP has no compare-and-set; the window is one round trip), so the change is
        # made between requests: right after the second resend, 0.8 s before the next
        await until(lambda: drv.stats.requests_sent >= 3, "two resends")
        await op.execute("migrate-set-parameters", {"x-checkpoint-delay": 777})
        sent = drv.stats.requests_sent
        await until(lambda: drv.stats.requests_sent > sent, "another request")
        params = await op.execute("query-migrate-parameters")
        assert isinstance(params, dict) and params["x-checkpoint-delay"] == 777
        # QEMU's own error text comes through
        with pytest.raises(ExecuteError, match="has not been found"):
            await drv.execute("no-such-command")
        await op.disconnect()
        await drv.close()

    run_then_kill(qemu, main())


def test_default_policy_ignores_pause_outside_colo(workdir: Path) -> None:
    qemu, qmp, op_qmp = qemu_with_operator_qmp(workdir)

    async def main() -> None:
        events: list[str] = []
        drv = recording_driver(qmp, events)
        drv.start()
        await until(drv.connected_event.is_set, "QMP session and its first status")
        op = await other_client(op_qmp)
        await op.execute("stop")
        await until(lambda: drv.stats.stops == 1, "STOP seen")
        await op.execute("cont")
        await until(lambda: drv.stats.resumes == 1, "RESUME seen")
        assert events == []  # a user pause must never release held output
        assert drv.stats.pauses_ignored == 1
        await op.disconnect()
        await drv.close()

    run_then_kill(qemu, main())


def test_request_error_reported_with_qemu_message(workdir: Path) -> None:
    qmp = f"{workdir}/qmp.sock"
    qemu = start_qemu(workdir, [], [], qmp)

    async def main() -> None:
        drv = QmpDriver("primary", parse_endpoint(f"unix:{qmp}"), checkpoint_delay=2**40)
        drv.start()
        await until(drv.connected_event.is_set, "QMP session and its first status")
        drv.request_checkpoint()
        await until(lambda: drv.stats.request_errors >= 1, "request error")
        assert "x-checkpoint-delay" in drv.stats.last_error
        assert drv.request_pending and drv.stats.requests_sent == 0
        await drv.close()

    run_then_kill(qemu, main())


def test_request_survives_qemu_kill_and_restart(workdir: Path) -> None:
    qmp = f"{workdir}/qmp.sock"

    async def main() -> None:
        drv = QmpDriver("primary", parse_endpoint(f"unix:{qmp}"), backoff=0.05)
        qemu = start_qemu(workdir, [], [], qmp)
        try:
            drv.start()
            await until(lambda: drv.connected, "first session")
        finally:
            qemu.kill()
        await until(lambda: not drv.connected, "disconnect noticed")
        drv.request_checkpoint()  # while QEMU is dead: must not be lost
        assert drv.request_pending and drv.stats.requests_sent == 0
        qemu = start_qemu(workdir, [], [], qmp)
        try:
            await until(lambda: drv.stats.sessions == 2, "reconnected")
            await until(lambda: drv.stats.requests_sent == 1, "pending request sent")
        finally:
            await drv.close()
            qemu.kill()

    asyncio.run(main())
