"""The divergence log: what differed, kept for the driver, counted by kind."""

from __future__ import annotations

from collections import Counter
from typing import Final, final

from colo_proxy.core.events import CheckpointReason, Divergence, DivergenceKind, OverlapConflict
from colo_proxy.core.flows import FlowKey, flow_label

MAX_DIVERGENCES_KEPT: Final = 10000
"""Divergences (and, separately, overlap conflicts) kept; the rest are only counted."""

_TIMEOUT_KINDS: Final = (DivergenceKind.TIMEOUT, DivergenceKind.ACK)

_MIDSTREAM: Final = (
    "picked up mid-stream: offsets count from the first byte each side was seen to send"
)


@final
class DivergenceLog:
    """Divergences until the driver takes them, overlap conflicts, counts by kind."""

    __slots__ = ("counters", "divergences", "kinds", "overlap_conflicts")

    def __init__(self, counters: Counter[str]) -> None:
        self.counters = counters
        self.divergences: list[Divergence] = []
        self.overlap_conflicts: list[OverlapConflict] = []
        self.kinds: Counter[str] = Counter()

    def divergence(
        self, key: FlowKey, kind: DivergenceKind, offset: int | None, primary: bytes,
        secondary: bytes, now: float, detail: str, midstream: bool,
    ) -> CheckpointReason:
        """Record one; returns the reason for the checkpoint it asks for."""
        if offset is not None and offset < 0:  # a core bug: never report one
            self.counters["negative_offsets_clamped"] += 1
            offset = 0
        if midstream:
            detail = "; ".join(filter(None, (detail, _MIDSTREAM)))
        self.kinds[kind.value] += 1
        if len(self.divergences) < MAX_DIVERGENCES_KEPT:
            self.divergences.append(
                Divergence(now, flow_label(key), kind, offset, primary, secondary, detail)
            )
        else:
            self.counters["divergences_not_kept"] += 1
        return CheckpointReason.TIMEOUT if kind in _TIMEOUT_KINDS else CheckpointReason.DIVERGENCE

    def overlap_conflict(self, key: FlowKey, side: str, offset: int | None, now: float) -> None:
        """A within-side overlap whose bytes differ (kept: the first MAX_DIVERGENCES_KEPT)."""
        self.counters[f"tcp_overlap_conflicts_{side}"] += 1
        if len(self.overlap_conflicts) < MAX_DIVERGENCES_KEPT:
            self.overlap_conflicts.append(OverlapConflict(now, flow_label(key), side, offset))

    def take(self) -> list[Divergence]:
        out, self.divergences = self.divergences, []
        return out
