"""Sans-IO replication buffers: which bytes live where, and what to do at each epoch.

Theory of operation (Remus-style REDO log, see reference section 5):

    REPLICATING --failover()--> FAILING_OVER --write-outs, then overlay, applied--> FAILED_OVER
         |  (journal I/O failed)
         +--> FAULTED

* Primary writes (export REPLICATION) go to the SPECULATION buffer.
* ``checkpoint(N)`` seals speculation as the write-out of epoch N and starts a new
  speculation buffer.  The driver journals the sealed data (``Seal``), then reports
  ``journaled(N)``; that is the acknowledgement.  Write-outs are applied strictly in
  epoch order (``Apply``); ``applied(N)`` drops the buffer, base now holds epoch N.
* The secondary VM (export SECONDARY, COLO mode) writes to an OVERLAY over the
  committed state.  A checkpoint throws it away: the secondary becomes a copy of
  the primary.
* Reads resolve top-down: speculation (or overlay), write-outs newest first, base.
* ``failover()`` throws away speculation only.  The secondary VM does not go back to
  the checkpoint, it runs on from where it is, so its overlay is its disk's newest
  state and must survive (QEMU's own replication commits its active disk likewise).
  While FAILING_OVER the overlay stays the top layer of the secondary export (reads
  and writes; the replication export is refused writes and reads the same view) and
  the pending write-outs are applied below it in epoch order.  After the last one
  the overlay is sealed and a fresh one started on top for new writes; the driver
  copies the sealed overlay into the base (``ApplyOverlay``, then fsync) and reports
  ``overlay_applied``.  Until then the sealed overlay serves its ranges, so a read
  never meets a half-written base.  Rounds repeat while the fresh overlay holds
  anything (each round copies only what was written during the one before); when
  one ends empty the phase becomes FAILED_OVER and secondary writes pass straight
  through to the base image.
* The failover epoch reported is the last committed epoch: the base held exactly
  that before the overlay (never part of any epoch) was copied onto it.

No I/O here: every buffer is a log the driver owns; this module hands out log
positions and says which log position or base range serves each read.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from colo_proxy.disk.extents import ZERO, Extent, ExtentMap, compact, data_bytes
from colo_proxy.errors import ColoProxyError

BASE = -2
"""``Piece.buffer`` for bytes that come from the base image."""

MAX_EPOCH = 2**63 - 1
"""Epochs are journaled as unsigned 64-bit numbers; keep well inside that."""


class DiskStateError(ColoProxyError):
    """The driver used the state machine out of order (a bug, not peer input)."""


class Export(enum.Enum):
    """Who is writing: the primary's mirror or the running secondary VM."""

    REPLICATION = "replication"
    SECONDARY = "secondary"


class Phase(enum.Enum):
    REPLICATING = "replicating"
    FAILING_OVER = "failing-over"
    FAILED_OVER = "failed-over"
    FAULTED = "faulted"


class Refusal(enum.Enum):
    """Why a write was refused; the NBD driver maps these to error codes."""

    SHUTDOWN = "shutdown"  # replication export after failover
    FAULTED = "faulted"
    LIMIT = "limit"  # the epoch's log is at its size limit (checkpoint more often)


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of a read: ``length`` bytes at disk ``offset`` from ``buffer`` at ``pos``.

    ``buffer`` is a buffer id, BASE (read the image at ``offset``) or ZERO.
    """

    offset: int
    length: int
    buffer: int
    pos: int


@dataclass(frozen=True, slots=True)
class WriteTo:
    """Append the write's data to ``buffer``'s log; it lands at ``pos`` (None for zeros)."""

    buffer: int
    pos: int | None


@dataclass(frozen=True, slots=True)
class WriteBase:
    """Write straight to the base image (after failover)."""


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Refusal


@dataclass(frozen=True, slots=True)
class Seal:
    """Journal ``extents`` (positions in ``buffer``'s log) as epoch ``epoch``, durably."""

    epoch: int
    buffer: int
    extents: tuple[Extent, ...]


@dataclass(frozen=True, slots=True)
class Apply:
    """Write epoch ``epoch``'s journal ``buffer`` into the base image, then fsync."""

    epoch: int
    buffer: int
    extents: tuple[Extent, ...]


@dataclass(frozen=True, slots=True)
class ApplyOverlay:
    """Write the sealed overlay ``buffer``'s log (positions in ``extents``) into the
    base image, then fsync; report it with ``overlay_applied(buffer)``."""

    buffer: int
    extents: tuple[Extent, ...]


@dataclass(frozen=True, slots=True)
class Release:
    """The driver may free this buffer's log (memory or spill file)."""

    buffer: int


@dataclass(frozen=True, slots=True)
class EpochApplied:
    epoch: int


@dataclass(frozen=True, slots=True)
class FailoverComplete:
    """Every write-out is on disk; the image holds exactly ``epoch``."""

    epoch: int


Action = Seal | Apply | ApplyOverlay | Release | EpochApplied | FailoverComplete


@dataclass(slots=True)
class _Buffer:
    id: int
    extents: ExtentMap = field(default_factory=ExtentMap)
    log_len: int = 0


@dataclass(slots=True)
class _WriteOut:
    epoch: int
    buffer: _Buffer
    journaled: bool = False


@dataclass(frozen=True, slots=True)
class Status:
    """A snapshot for ``query-colo-disk``."""

    phase: Phase
    sealed_epoch: int
    committed_epoch: int
    applied_epoch: int
    applying_epoch: int | None
    speculation_bytes: int
    overlay_bytes: int  # the live overlay plus one being copied into the base
    writeouts: tuple[tuple[int, int, bool], ...]  # (epoch, bytes, journaled)


class Replica:
    """The disk-buffer state machine of one replicated disk of ``size`` bytes."""

    def __init__(self, size: int, applied_epoch: int = 0) -> None:
        if size < 0 or applied_epoch < 0:
            raise DiskStateError("size and epoch must be non-negative")
        self.size = size
        self.phase = Phase.REPLICATING
        self.applied_epoch = applied_epoch
        self.sealed_epoch = applied_epoch
        self.committed_epoch = applied_epoch
        self._next_id = 0
        self._spec: _Buffer | None = self._new_buffer()
        self._overlay: _Buffer | None = self._new_buffer()
        self._writeouts: list[_WriteOut] = []
        self._applying: int | None = None
        self._sealed_overlay: _Buffer | None = None  # being copied into the base

    # -- ids -------------------------------------------------------------------------
    def _new_buffer(self) -> _Buffer:
        self._next_id += 1
        return _Buffer(self._next_id)

    def new_buffer_id(self) -> int:
        """An id for a log the driver creates itself (a journal)."""
        self._next_id += 1
        return self._next_id

    @property
    def speculation_id(self) -> int | None:
        return None if self._spec is None else self._spec.id

    @property
    def overlay_id(self) -> int | None:
        return None if self._overlay is None else self._overlay.id

    # -- data path -------------------------------------------------------------------
    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskStateError(f"range {offset}+{length} outside disk of {self.size}")

    def _top(self, export: Export) -> _Buffer | None:
        return self._spec if export is Export.REPLICATION else self._overlay

    def _read_layers(self, export: Export) -> list[_Buffer]:
        """Top-down layers of a read.  Once failing over there is one disk, the
        secondary's: both exports read it (the replication export only reads)."""
        if self.phase is Phase.REPLICATING or self.phase is Phase.FAULTED:
            top = self._top(export)
            layers = [] if top is None else [top]
        else:
            layers = [b for b in (self._overlay, self._sealed_overlay) if b is not None]
        layers.extend(w.buffer for w in reversed(self._writeouts))
        return layers

    def write(self, export: Export, offset: int, length: int,
              zero: bool = False) -> WriteTo | WriteBase | Refused:
        """Place a write (or a zeroing) of ``length`` bytes at ``offset``."""
        self._check_range(offset, length)
        if self.phase is Phase.FAULTED:
            return Refused(Refusal.FAULTED)
        if self.phase is Phase.FAILED_OVER and export is Export.SECONDARY:
            return WriteBase()
        top = self._top(export)
        if top is None:
            return Refused(Refusal.SHUTDOWN)
        if zero:
            top.extents.insert(offset, length, ZERO)
            return WriteTo(top.id, None)
        pos = top.log_len
        top.log_len += length
        top.extents.insert(offset, length, pos)
        return WriteTo(top.id, pos)

    def write_failed(self, placed: WriteTo, offset: int, length: int) -> None:
        """The driver could not store a placed write: give back its log space.

        The range then reads as zeros, which NBD allows after a failed write
        (its contents are unspecified), and later writes keep their positions.
        """
        for buf in (self._spec, self._overlay):
            if buf is not None and buf.id == placed.buffer:
                buf.extents.insert(offset, length, ZERO)
                if placed.pos is not None and buf.log_len == placed.pos + length:
                    buf.log_len = placed.pos
                return

    def passthrough(self, export: Export) -> bool:
        """True when this export's writes go to the base image (flush must fsync it)."""
        return self.phase is Phase.FAILED_OVER and export is Export.SECONDARY

    def read(self, export: Export, offset: int, length: int) -> list[Piece]:
        """Which layer serves each byte of a read, in disk order."""
        self._check_range(offset, length)
        out: list[Piece] = []
        self._resolve(self._read_layers(export), 0, offset, length, out)
        return out

    def _resolve(self, layers: list[_Buffer], depth: int, offset: int, length: int,
                 out: list[Piece]) -> None:
        if depth == len(layers):
            out.append(Piece(offset, length, BASE, offset))
            return
        layer = layers[depth]
        for off, n, pos in layer.extents.lookup(offset, length):
            if pos is None:
                self._resolve(layers, depth + 1, off, n, out)
            elif pos == ZERO:
                out.append(Piece(off, n, ZERO, 0))
            else:
                out.append(Piece(off, n, layer.id, pos))

    # -- epochs ----------------------------------------------------------------------
    def checkpoint(self, epoch: int) -> list[Action]:
        """Seal speculation as epoch ``epoch``; the secondary's overlay is discarded."""
        if self.phase is not Phase.REPLICATING:
            raise DiskStateError(f"checkpoint refused: disk is {self.phase.value}")
        if epoch <= self.sealed_epoch:
            raise DiskStateError(
                f"epoch {epoch} is not after the last checkpoint {self.sealed_epoch}")
        if epoch > MAX_EPOCH:
            raise DiskStateError(f"epoch {epoch} is larger than {MAX_EPOCH}")
        assert self._spec is not None and self._overlay is not None
        sealed = self._spec
        self._spec = self._new_buffer()
        actions: list[Action] = [Release(self._overlay.id)]
        self._overlay = self._new_buffer()
        self._writeouts.append(_WriteOut(epoch, sealed))
        self.sealed_epoch = epoch
        actions.insert(0, Seal(epoch, sealed.id, tuple(sealed.extents.extents())))
        return actions

    def journaled(self, epoch: int, journal: int) -> list[Action]:
        """The driver wrote epoch ``epoch`` durably as log ``journal`` (compact layout)."""
        wo = self._find(epoch)
        if wo.journaled:
            raise DiskStateError(f"epoch {epoch} journaled twice")
        old = wo.buffer
        jbuf = _Buffer(journal)
        layout = compact(old.extents.extents())
        for ext in layout:
            jbuf.extents.insert(ext.offset, ext.length, ext.pos)
        jbuf.log_len = data_bytes(layout)
        wo.buffer = jbuf
        wo.journaled = True
        if epoch > self.committed_epoch:
            self.committed_epoch = epoch
        actions: list[Action] = [Release(old.id)]
        actions.extend(self._maybe_apply())
        return actions

    def seal_failed(self, epoch: int) -> list[Action]:
        """Journaling failed: the epoch was never acknowledged.  Replication cannot go on."""
        wo = self._find(epoch)
        self._writeouts.remove(wo)
        self.sealed_epoch = max([self.committed_epoch, *(w.epoch for w in self._writeouts)])
        actions: list[Action] = [Release(wo.buffer.id)]
        if self.phase is Phase.REPLICATING:
            self.phase = Phase.FAULTED
        actions.extend(self._maybe_apply())
        return actions

    def applied(self, epoch: int) -> list[Action]:
        """The base image now holds ``epoch`` (written and fsynced)."""
        if self._applying != epoch or not self._writeouts or self._writeouts[0].epoch != epoch:
            raise DiskStateError(f"epoch {epoch} was not being applied")
        wo = self._writeouts.pop(0)
        self._applying = None
        self.applied_epoch = epoch
        actions: list[Action] = [Release(wo.buffer.id), EpochApplied(epoch)]
        actions.extend(self._maybe_apply())
        return actions

    def _find(self, epoch: int) -> _WriteOut:
        for wo in self._writeouts:
            if wo.epoch == epoch:
                return wo
        raise DiskStateError(f"no write-out for epoch {epoch}")

    def _maybe_apply(self) -> list[Action]:
        if self._applying is None and self._writeouts and self._writeouts[0].journaled:
            wo = self._writeouts[0]
            self._applying = wo.epoch
            return [Apply(wo.epoch, wo.buffer.id, tuple(wo.buffer.extents.extents()))]
        if (self.phase is Phase.FAILING_OVER and not self._writeouts
                and self._sealed_overlay is None):
            return self._next_overlay_round()
        return []

    def _next_overlay_round(self) -> list[Action]:
        """Write-outs are all in the base: copy the overlay there, or finish."""
        assert self._overlay is not None
        if len(self._overlay.extents) == 0:
            actions: list[Action] = [Release(self._overlay.id)]
            self._overlay = None
            self.phase = Phase.FAILED_OVER
            actions.append(FailoverComplete(self.applied_epoch))
            return actions
        sealed = self._sealed_overlay = self._overlay
        self._overlay = self._new_buffer()
        return [ApplyOverlay(sealed.id, tuple(sealed.extents.extents()))]

    def overlay_applied(self, buffer: int) -> list[Action]:
        """The base image now holds the sealed overlay ``buffer`` (written and fsynced)."""
        if self._sealed_overlay is None or self._sealed_overlay.id != buffer:
            raise DiskStateError(f"overlay {buffer} was not being applied")
        self._sealed_overlay = None
        actions: list[Action] = [Release(buffer)]
        actions.extend(self._next_overlay_round())
        return actions

    def failover(self) -> list[Action]:
        """Stop replicating: drop speculation, apply write-outs, then the overlay; take over."""
        if self.phase is Phase.FAILED_OVER:
            return [FailoverComplete(self.applied_epoch)]
        if self.phase is Phase.FAILING_OVER:
            return []
        actions: list[Action] = []
        if self._spec is not None:
            actions.append(Release(self._spec.id))
        self._spec = None
        self.phase = Phase.FAILING_OVER
        actions.extend(self._maybe_apply())
        return actions

    def status(self) -> Status:
        return Status(
            phase=self.phase,
            sealed_epoch=self.sealed_epoch,
            committed_epoch=self.committed_epoch,
            applied_epoch=self.applied_epoch,
            applying_epoch=self._applying,
            speculation_bytes=0 if self._spec is None else self._spec.extents.mapped_bytes,
            overlay_bytes=sum(b.extents.mapped_bytes
                              for b in (self._overlay, self._sealed_overlay) if b is not None),
            writeouts=tuple((w.epoch, w.buffer.extents.mapped_bytes, w.journaled)
                            for w in self._writeouts),
        )
