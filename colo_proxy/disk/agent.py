"""The disk agent: one engine, NBD exports for both writers, a QMP control server.

The event loop owns the engine.  Only journaling (before an acknowledgement) and
applying (after it) leave the loop, each in a worker thread, one at a time, in
epoch order, so the base image only ever moves from one committed epoch to the next.
At failover the secondary's overlay is applied the same way, after the last epoch.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any

from colo_proxy.disk.address import Address, listen
from colo_proxy.disk.buffers import (
    Action,
    Apply,
    ApplyOverlay,
    DiskStateError,
    EpochApplied,
    Export,
    FailoverComplete,
    Seal,
)
from colo_proxy.disk.engine import DiskEngine
from colo_proxy.disk.nbd import DEFAULT_MAX_CONNECTIONS, NbdExports, NbdProtocol
from colo_proxy.disk.qmp_proto import CommandSpec, Param, version_info
from colo_proxy.disk.qmp_server import QmpCommandError, QmpServer

log = logging.getLogger(__name__)

EVENT_APPLIED = "COLO_DISK_EPOCH_APPLIED"
EVENT_FAILOVER = "COLO_DISK_FAILOVER"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    nbd: tuple[Address, ...]
    qmp: tuple[Address, ...]
    export_name: str = "replication"
    secondary_name: str | None = "secondary"
    default_export: str | None = "replication"
    ack_sealed: bool = False  # acknowledge before the journal is durable (Remus-fast)
    qmp_remote_control: bool = False  # quit/failover also on TCP QMP connections
    nbd_max_connections: int = DEFAULT_MAX_CONNECTIONS
    tls: ssl.SSLContext | None = None  # NBD (STARTTLS) and QMP on TCP listeners


class DiskAgent:
    def __init__(self, engine: DiskEngine, config: AgentConfig) -> None:
        self.engine = engine
        self.config = config
        names = {config.export_name: Export.REPLICATION}
        if config.secondary_name:
            names[config.secondary_name] = Export.SECONDARY
        self.nbd = NbdExports(engine, names, config.default_export,
                              config.nbd_max_connections)
        self.qmp = QmpServer()
        self._servers: list[asyncio.Server] = []
        self._ckpt_lock = asyncio.Lock()
        self._apply_task: asyncio.Task[None] | None = None
        self._failover_waiters: list[asyncio.Future[int]] = []
        self._stopped = asyncio.Event()
        self._closing = False
        self._journal_tasks: set[asyncio.Task[str | None]] = set()
        self.apply_error: str | None = None
        # Changes with every agent process: speculation did not survive a change, so a
        # controller that sees a new boot id must resync the primary's mirror.
        self.boot_id = uuid.uuid4().hex
        self.started_epoch = engine.replica.applied_epoch
        self._register()

    def _register(self) -> None:
        q = self.qmp
        q.command("colo-disk-checkpoint", CommandSpec({"epoch": Param("int")}), self._checkpoint)
        q.command("colo-disk-failover", CommandSpec(), self._failover, restricted=True)
        q.command("query-colo-disk", CommandSpec(), self._query)
        q.command("query-status", CommandSpec(), self._run_status)
        q.command("query-version", CommandSpec(), self._version)
        q.command("query-commands", CommandSpec(), self._commands)
        q.command("quit", CommandSpec(), self._quit, restricted=True)

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        tls = self.config.tls
        for addr in self.config.nbd:
            nbd_tls = tls if addr.path is None else None
            self._servers.append(await listen(addr, partial(NbdProtocol, self.nbd, nbd_tls)))
        for addr in self.config.qmp:
            trusted = addr.path is not None or self.config.qmp_remote_control
            qmp_tls = tls if addr.path is None else None
            self._servers.append(
                await listen(addr, partial(self.qmp.protocol, trusted), qmp_tls))
        self._handle([])

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()

    async def close(self) -> None:
        """Stop serving, let the journal or apply in progress finish, close files.

        Journals not yet applied stay on disk; the next start applies them.
        """
        self._closing = True
        for srv in self._servers:
            srv.close()
        self.qmp.close_all()
        if self._journal_tasks:
            await asyncio.gather(*self._journal_tasks, return_exceptions=True)
        async with self._ckpt_lock:
            while self._apply_task is not None and not self._apply_task.done():
                await asyncio.shield(self._apply_task)
            self.engine.close()

    # -- actions ---------------------------------------------------------------------
    def _handle(self, actions: list[Action]) -> None:
        for act in actions:
            if isinstance(act, Apply | ApplyOverlay):
                if self._closing:
                    continue
                self._apply_task = asyncio.get_running_loop().create_task(self._apply(act))
            elif isinstance(act, EpochApplied):
                self.qmp.emit(EVENT_APPLIED, {"epoch": act.epoch})
            elif isinstance(act, FailoverComplete):
                self.qmp.emit(EVENT_FAILOVER, {"epoch": act.epoch})
                for fut in self._failover_waiters:
                    if not fut.done():
                        fut.set_result(act.epoch)
                self._failover_waiters.clear()

    async def _apply(self, act: Apply | ApplyOverlay) -> None:
        """Copy a journal (or, at failover, the secondary's overlay) into the image."""
        eng = self.engine
        try:
            if isinstance(act, Apply):
                await asyncio.to_thread(eng.run_apply, act)
            else:
                await asyncio.to_thread(eng.run_apply_overlay, act)
        except Exception as err:
            # A journal stays on disk and a restarted agent applies it; an overlay
            # still serves its ranges, but the failover cannot end.
            what = f"epoch {act.epoch}" if isinstance(act, Apply) else "the secondary's overlay"
            self.apply_error = f"applying {what}: {err}"
            log.error("%s", self.apply_error)
            self._fail_waiters()
            return
        self._apply_task = None
        self._handle(eng.finish_apply(act.epoch) if isinstance(act, Apply)
                     else eng.finish_apply_overlay(act.buffer))

    def _fail_waiters(self) -> None:
        for fut in self._failover_waiters:
            if not fut.done():
                fut.set_exception(QmpCommandError(f"cannot fail over: {self.apply_error}"))
        self._failover_waiters.clear()

    # -- QMP commands ----------------------------------------------------------------
    async def _checkpoint(self, args: dict[str, Any]) -> dict[str, Any]:
        epoch: int = args["epoch"]
        if self._closing:
            raise QmpCommandError("disk agent is shutting down")
        try:
            seal = self.engine.begin_checkpoint(epoch)
        except DiskStateError as err:
            raise QmpCommandError(str(err)) from err
        task = asyncio.get_running_loop().create_task(self._journal(seal))
        self._journal_tasks.add(task)
        task.add_done_callback(self._journal_tasks.discard)
        if self.config.ack_sealed:
            # Remus semantics: the sealed buffer is acknowledged now and journaled
            # behind the reply; a crash before the journal lands loses this epoch.
            return {"epoch": epoch}
        # A client that hangs up mid-command must not cancel the journaling.
        error = await asyncio.shield(task)
        if error is not None:
            raise QmpCommandError(error)
        return {"epoch": epoch}

    async def _journal(self, seal: Seal) -> str | None:
        """Journal sealed buffers strictly in epoch order (the lock is FIFO)."""
        async with self._ckpt_lock:
            try:
                journal = await asyncio.to_thread(self.engine.write_journal, seal)
            except Exception as err:  # any failure: this epoch was never acknowledged
                self._handle(self.engine.fail_checkpoint(seal.epoch))
                log.error("journaling epoch %d failed: %s", seal.epoch, err)
                return f"journaling epoch {seal.epoch} failed: {err}"
            self._handle(self.engine.finish_checkpoint(seal.epoch, journal))
            return None

    async def _failover(self, args: dict[str, Any]) -> dict[str, Any]:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._failover_waiters.append(fut)
        self._handle(self.engine.failover())
        if self.apply_error is not None and not fut.done():
            raise QmpCommandError(f"cannot fail over: {self.apply_error}")
        return {"epoch": await fut}

    async def _query(self, args: dict[str, Any]) -> dict[str, Any]:
        st = self.engine.status()
        eng = self.engine
        out: dict[str, Any] = {
            "phase": st.phase.value,
            "boot-id": self.boot_id,
            "started-at-epoch": self.started_epoch,
            "epoch": st.committed_epoch,
            "sealed-epoch": st.sealed_epoch,
            "applied-epoch": st.applied_epoch,
            "size": eng.size,
            "speculation-bytes": st.speculation_bytes,
            "secondary-bytes": st.overlay_bytes,
            "write-out-bytes": sum(b for _, b, _ in st.writeouts),
            "write-outs": [{"epoch": e, "bytes": b, "journaled": j} for e, b, j in st.writeouts],
            "memory-bytes": eng.budget.used,
            "memory-cap": eng.budget.cap,
            "nbd-connections": self.nbd.connections,
            "nbd-protocol-errors": self.nbd.protocol_errors,
            "nbd-refused-connections": self.nbd.refused_connections,
            "nbd-buffered-bytes": self.nbd.buffered,
            "nbd-buffered-peak": self.nbd.buffered_peak,
            "nbd-pauses": self.nbd.pauses,
            "nbd-tls-failures": self.nbd.tls_failures,
            "max-epoch-bytes": eng.max_log_bytes,
            "limit-refusals": eng.limit_refusals,
            "qmp-refused": self.qmp.refused,
        }
        if st.applying_epoch is not None:
            out["apply-progress"] = {"epoch": st.applying_epoch,
                                     "done": eng.apply_done_bytes,
                                     "total": eng.apply_total_bytes}
        if self.apply_error is not None:
            out["error"] = self.apply_error
        return out

    async def _run_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """QEMU's shape, so generic QMP drivers that ask every peer can talk to us."""
        return {"running": True, "singlestep": False, "status": "running"}

    async def _version(self, args: dict[str, Any]) -> dict[str, Any]:
        return version_info()

    async def _commands(self, args: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": n} for n in ("qmp_capabilities", *self.qmp.specs)]

    async def _quit(self, args: dict[str, Any]) -> dict[str, Any]:
        asyncio.get_running_loop().call_soon(self.stop)
        return {}
