"""The disk half of a checkpoint: release output only when the disk epoch is committed too.

Remus's rule, for `colo-proxy run --disk-qmp`: when the VMs stop for
checkpoint N (QMP STOP), the disk agent is told `colo-disk-checkpoint`;
when they resume (RESUME), memory checkpoint N is done.  Held output of
epoch N is released only once both happened, in either order
(`colo_proxy.disk.gate.CommitGate`).  While the agent is unreachable or
refuses, the request is retried with backoff and the output stays held:
never released on the memory checkpoint alone.

Between hosts the agent's QMP is a TCP listener with TLS (its ``--tls-creds``,
QEMU's tls-creds-x509 model, client certificates required by default): give
``--disk-tls-creds DIR`` (``ca-cert.pem``, and ``client-cert.pem`` plus
``client-key.pem`` for mutual TLS); a handshake the agent or we refuse is one
logged error line, retried, with output held meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from qemu.qmp import QMPError

from colo_proxy.disk.gate import CommitGate
from colo_proxy.disk.tls import client_context
from colo_proxy.drivers.endpoints import Endpoint
from colo_proxy.drivers.qmp import FollowPolicy, QmpDriver

log = logging.getLogger(__name__)

MAX_BACKOFF = 2.0


class DiskLink:
    """Drives the disk agent's epochs in step with the VM checkpoints."""

    def __init__(self, endpoint: Endpoint, release: Callable[[], None],
                 backoff: float = 0.05, tls: ssl.SSLContext | Path | None = None) -> None:
        if isinstance(tls, Path):
            tls = client_context(tls)
        self.driver = QmpDriver("disk-qmp", endpoint, follow=FollowPolicy.NONE, ssl=tls)
        self.gate = CommitGate()
        self._release = release
        self._backoff = backoff
        self._epoch = 0
        """VM checkpoints begun (local numbering, what the gate counts)."""
        self._in_checkpoint = False
        self._agent_epoch: int | None = None
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._boot_id: object = None
        self.counters = {
            "disk_checkpoints_acked": 0, "disk_errors": 0, "releases": 0, "agent_restarts": 0,
        }

    def start(self) -> None:
        """Connect to the agent and start the epoch worker."""
        self.driver.start()
        self._task = asyncio.create_task(self._worker(), name="disk-link")

    async def close(self) -> None:
        """Stop the worker and disconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.driver.close()

    @property
    def waiting(self) -> bool:
        """A VM checkpoint completed whose disk epoch is not acknowledged yet."""
        return self.gate.memory_epoch > self.gate.released_epoch

    def vm_stopped(self) -> None:
        """Checkpoint N begins: seal disk epoch N (the VM issues no writes now)."""
        if self._in_checkpoint:
            return
        self._in_checkpoint = True
        self._epoch += 1
        self._queue.put_nowait(self._epoch)

    def vm_resumed(self) -> None:
        """Checkpoint N's memory part is done; release if the disk already acknowledged."""
        if not self._in_checkpoint:  # a completion without a STOP (notify_dev, Xen)
            self.vm_stopped()
        self._in_checkpoint = False
        if self.gate.memory_done(self._epoch) is not None:
            self._done()
        elif self.waiting:
            log.info("checkpoint %d: memory done, waiting for the disk agent", self._epoch)

    def report(self) -> dict[str, object]:
        """Epochs and counters for the run report."""
        return {
            **self.counters,
            "vm_epoch": self._epoch,
            "disk_epoch_acked": self.gate.disk_epoch,
            "released_epoch": self.gate.released_epoch,
            "agent_epoch": self._agent_epoch,
            "connected": self.driver.connected,
            "disconnects_abandoned": self.driver.stats.disconnects_abandoned,
        }

    def _check_boot(self, boot_id: object) -> None:
        if self._boot_id is not None and boot_id != self._boot_id:
            self.counters["agent_restarts"] += 1
            log.error(
                "disk agent restarted: writes of the epoch in progress are lost from its "
                "replica; restart the primary's blockdev-mirror with a full sync"
            )
        self._boot_id = boot_id

    def _done(self) -> None:
        self.counters["releases"] += 1
        self._release()

    async def _worker(self) -> None:
        while True:
            epoch = await self._queue.get()
            delay = self._backoff
            while not await self._commit(epoch):
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
            if self.gate.disk_acked(epoch) is not None:
                self._done()

    async def _commit(self, epoch: int) -> bool:
        """Ask the agent to commit the next epoch; False (logged, counted) to retry."""
        try:
            if self._agent_epoch is None:
                info = await self.driver.execute("query-colo-disk")
                self._agent_epoch = int(info["epoch"])  # type: ignore[index]
                self._check_boot(info["boot-id"])  # type: ignore[index]
            target = self._agent_epoch + 1
            await self.driver.execute("colo-disk-checkpoint", {"epoch": target})
        except (QMPError, KeyError, TypeError, ValueError) as err:
            self.counters["disk_errors"] += 1
            self._agent_epoch = None  # ask again: the agent may have restarted
            log.warning("disk agent: checkpoint %d not acknowledged yet: %s", epoch, err)
            return False
        self._agent_epoch = target
        self.counters["disk_checkpoints_acked"] += 1
        return True
