"""Binds the sans-IO ``Replica`` to the store: logs, journals, the image.

Synchronous on purpose.  The asyncio agent calls the quick parts on the event
loop and runs the slow, blocking steps (``write_journal``, ``run_apply`` and, at
failover, ``run_apply_overlay``) in a worker thread; tests drive the same object
directly, crash it anywhere and recover it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from colo_proxy.disk.buffers import (
    Action,
    Apply,
    ApplyOverlay,
    DiskStateError,
    Export,
    FailoverComplete,
    Refusal,
    Refused,
    Release,
    Replica,
    Seal,
    Status,
    WriteBase,
)
from colo_proxy.disk.store import (
    Image,
    JournalLog,
    Log,
    MemoryBudget,
    SpillLog,
    StateDir,
    apply_extents,
    apply_journal,
    read_pieces,
    write_journal,
)

DEFAULT_MEMORY_CAP = 256 << 20


def default_log_limit(image_size: int) -> int:
    """Bytes one epoch may log (speculation plus overlay) when none is given: twice
    the disk plus 64 MiB, far more than a sane checkpoint interval writes, yet a
    bound on the spill files a runaway writer (or a stuck controller) can grow."""
    return 2 * image_size + (64 << 20)


class DiskEngine:
    """One replicated disk: image + state directory + in-memory/spilled buffers."""

    def __init__(self, image: Path, state_dir: Path,
                 memory_cap: int = DEFAULT_MEMORY_CAP, max_log_bytes: int | None = None) -> None:
        self.image = Image(image)
        self.max_log_bytes = max_log_bytes or default_log_limit(self.image.size)
        self.limit_refusals = 0
        try:
            self.state = StateDir(state_dir)
        except BaseException:
            self.image.close()
            raise
        try:
            applied = self.state.recover(self.image)
        except BaseException:
            self.state.close()
            self.image.close()
            raise
        self.replica = Replica(self.image.size, applied)
        self.budget = MemoryBudget(memory_cap)
        self.logs: dict[int, Log] = {}
        self.apply_done_bytes = 0
        self.apply_total_bytes = 0
        self._ensure_logs()

    @property
    def size(self) -> int:
        return self.image.size

    def _ensure_logs(self) -> None:
        for buf in (self.replica.speculation_id, self.replica.overlay_id):
            if buf is not None and buf not in self.logs:
                self.logs[buf] = SpillLog(self.budget, self.state.path)

    def _release(self, actions: list[Action]) -> list[Action]:
        """Carry out Release actions here; hand the rest back to the caller."""
        rest: list[Action] = []
        for act in actions:
            if isinstance(act, Release):
                log = self.logs.pop(act.buffer, None)
                if isinstance(log, JournalLog):
                    log.remove()
                elif log is not None:
                    log.close()
            else:
                rest.append(act)
        self._ensure_logs()
        return rest

    # -- data path ---------------------------------------------------------------------
    def write(self, export: Export, offset: int,
              data: bytes | bytearray | memoryview) -> Refusal | None:
        if self._open_log_bytes() + len(data) > self.max_log_bytes:
            self.limit_refusals += 1
            return Refusal.LIMIT
        placed = self.replica.write(export, offset, len(data))
        if isinstance(placed, Refused):
            return placed.reason
        if isinstance(placed, WriteBase):
            self.image.write(offset, data)
            return None
        log = self.logs[placed.buffer]
        assert isinstance(log, SpillLog)
        try:
            pos = log.append(data)
        except OSError:
            self.replica.write_failed(placed, offset, len(data))
            raise
        if pos != placed.pos:
            raise DiskStateError(f"log position {pos} != planned {placed.pos}")
        return None

    def _open_log_bytes(self) -> int:
        """Bytes in the logs still taking writes (this epoch's speculation, the overlay)."""
        total = 0
        for buf in (self.replica.speculation_id, self.replica.overlay_id):
            log = self.logs.get(buf) if buf is not None else None
            if isinstance(log, SpillLog):
                total += log.length
        return total

    def write_zeroes(self, export: Export, offset: int, length: int) -> Refusal | None:
        placed = self.replica.write(export, offset, length, zero=True)
        if isinstance(placed, Refused):
            return placed.reason
        if isinstance(placed, WriteBase):
            self.image.zero(offset, length)
        return None

    def read(self, export: Export, offset: int, length: int) -> bytes:
        return read_pieces(self.replica.read(export, offset, length), self.image, self.logs)

    def flush(self, export: Export) -> None:
        """Buffered data has no durability before its checkpoint; passthrough data does."""
        if self.replica.passthrough(export):
            self.image.sync()

    # -- checkpoints -------------------------------------------------------------------
    def begin_checkpoint(self, epoch: int) -> Seal:
        actions = self.replica.checkpoint(epoch)
        rest = self._release(actions)
        seal = rest[0]
        assert isinstance(seal, Seal)
        return seal

    def write_journal(self, seal: Seal) -> JournalLog:
        """Blocking: journal the sealed buffer durably (may run in a worker thread)."""
        log = self.logs[seal.buffer]
        return write_journal(self.state.path, seal.epoch, seal.extents, log.read)

    def finish_checkpoint(self, epoch: int, journal: JournalLog) -> list[Action]:
        buf = self.replica.new_buffer_id()
        self.logs[buf] = journal
        return self._track(self._release(self.replica.journaled(epoch, buf)))

    def fail_checkpoint(self, epoch: int) -> list[Action]:
        return self._track(self._release(self.replica.seal_failed(epoch)))

    def checkpoint(self, epoch: int) -> list[Action]:
        """Seal, journal and acknowledge in one go (tests and simple drivers)."""
        seal = self.begin_checkpoint(epoch)
        try:
            journal = self.write_journal(seal)
        except OSError:
            self.fail_checkpoint(epoch)
            raise
        return self.finish_checkpoint(epoch, journal)

    def _track(self, actions: list[Action]) -> list[Action]:
        for act in actions:
            if isinstance(act, Apply | ApplyOverlay):
                self.apply_done_bytes = 0
                self.apply_total_bytes = sum(e.length for e in act.extents)
        return actions

    def run_apply(self, apply: Apply) -> None:
        """Blocking: write a journal into the image, fsync, record the epoch."""
        journal = self.logs[apply.buffer]
        assert isinstance(journal, JournalLog)

        def progress(n: int) -> None:
            self.apply_done_bytes += n

        apply_journal(self.image, journal, progress)
        self.state.set_applied_epoch(apply.epoch)

    def finish_apply(self, epoch: int) -> list[Action]:
        return self._track(self._release(self.replica.applied(epoch)))

    def run_apply_overlay(self, apply: ApplyOverlay) -> None:
        """Blocking: copy the secondary's sealed overlay into the image and fsync.

        The sealed log takes no more appends (new writes go to a fresh overlay), so a
        worker thread may read it while the loop serves I/O.  No epoch is recorded:
        the overlay is the running secondary's data, not part of any checkpoint.
        """
        log = self.logs[apply.buffer]

        def progress(n: int) -> None:
            self.apply_done_bytes += n

        apply_extents(self.image, apply.extents, log.read, progress)

    def finish_apply_overlay(self, buffer: int) -> list[Action]:
        return self._track(self._release(self.replica.overlay_applied(buffer)))

    def failover(self) -> list[Action]:
        return self._track(self._release(self.replica.failover()))

    def drain(self, actions: list[Action],
              on_action: Callable[[Action], None] | None = None) -> int | None:
        """Synchronously apply everything pending; return the failover epoch if one completed."""
        pending = list(actions)
        done: int | None = None
        while pending:
            act = pending.pop(0)
            if on_action is not None:
                on_action(act)
            if isinstance(act, Apply):
                self.run_apply(act)
                pending.extend(self.finish_apply(act.epoch))
            elif isinstance(act, ApplyOverlay):
                self.run_apply_overlay(act)
                pending.extend(self.finish_apply_overlay(act.buffer))
            elif isinstance(act, FailoverComplete):
                done = act.epoch
        return done

    def status(self) -> Status:
        return self.replica.status()

    def close(self) -> None:
        for log in self.logs.values():
            log.close()
        self.logs.clear()
        self.image.close()
        self.state.close()
