"""When held output may go: only once the VM checkpoint AND the disk epoch are both done.

Sans-IO helper for the checkpoint flow (Remus rule): the driver reports QEMU's
checkpoint completion (RESUME after the STOP of epoch N) and the disk agent's
acknowledgement of ``colo-disk-checkpoint {epoch: N}``, in either order; output
held up to epoch N is released when the slower of the two arrives.
"""

from __future__ import annotations


class CommitGate:
    def __init__(self, epoch: int = 0) -> None:
        self.memory_epoch = epoch
        self.disk_epoch = epoch
        self.released_epoch = epoch

    def memory_done(self, epoch: int) -> int | None:
        """QEMU finished checkpoint ``epoch``; returns the epoch now releasable, if any."""
        self.memory_epoch = max(self.memory_epoch, epoch)
        return self._advance()

    def disk_acked(self, epoch: int) -> int | None:
        """The disk agent acknowledged ``epoch``; returns the epoch now releasable, if any."""
        self.disk_epoch = max(self.disk_epoch, epoch)
        return self._advance()

    def _advance(self) -> int | None:
        ready = min(self.memory_epoch, self.disk_epoch)
        if ready > self.released_epoch:
            self.released_epoch = ready
            return ready
        return None
