"""When to ask for a checkpoint: the proxy's checkpoint cycle as a transition table.

    IDLE --want--> REQUESTED --started--> RUNNING
      ^  \\--want, too soon--> DEFERRED --due--> REQUESTED
      \\------------------ done (from any state) -------/

Requests are rate limited by a token bucket: `burst` requests back to back,
then one per `min_interval`; tokens accrue from the end of each checkpoint
(not while one runs), so with burst 1 a request waits min_interval after
the end of the last checkpoint.  Requests are coalesced: one request
stands for every reason found while it waits.  A reason found while
RUNNING asks again once this checkpoint is done (the snapshot predates
it).  `started` is legal in every state: QEMU also checkpoints on its own
timer.  A move the table does not list raises
IllegalTransition (a core bug), as the disk agent's Phase machine does.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable
from typing import Final, final

from colo_proxy.core.events import CheckpointReason, CheckpointRequest


class CheckpointState(enum.Enum):
    """Where the proxy is in its checkpoint cycle."""

    IDLE = "idle"
    DEFERRED = "deferred"
    REQUESTED = "requested"
    RUNNING = "running"


class Move(enum.Enum):
    """What happened to the checkpoint cycle."""

    REQUEST = "request"
    """A reason, outside the rate limit: the request goes out."""
    DEFER = "defer"
    """A reason, inside the rate limit: the request waits until it falls due."""
    DUE = "due"
    """A deferred request fell due and goes out."""
    STARTED = "started"
    DONE = "done"


_S = CheckpointState
TRANSITIONS: Final[dict[tuple[CheckpointState, Move], CheckpointState]] = {
    (_S.IDLE, Move.REQUEST): _S.REQUESTED,
    (_S.IDLE, Move.DEFER): _S.DEFERRED,
    (_S.DEFERRED, Move.DUE): _S.REQUESTED,
    **{(state, Move.STARTED): _S.RUNNING for state in _S},
    **{(state, Move.DONE): _S.IDLE for state in _S},
}
"""Every legal move; anything else raises IllegalTransition."""


class IllegalTransition(Exception):
    """A move the checkpoint cycle does not allow in its current state (a core bug)."""


@final
class CheckpointPolicy:
    """The checkpoint cycle: state, rate limit, coalescing, requests to the driver."""

    __slots__ = ("_again", "_last_end", "_tokens", "_tokens_at", "burst", "counters", "deferred",
                 "min_interval", "on_emit", "reasons", "requests", "state")

    def __init__(
        self, min_interval: float, counters: Counter[str], burst: int = 1,
        on_emit: Callable[[CheckpointReason, float], None] | None = None,
    ) -> None:
        self.state = CheckpointState.IDLE
        self.min_interval = min_interval
        self.counters = counters
        self.reasons: Counter[str] = Counter()
        """Requests sent, by reason (stats)."""
        self.requests: list[CheckpointRequest] = []
        """Requests the driver has not taken yet."""
        self.deferred: tuple[CheckpointReason, float] | None = None
        """A rate-limited request and when it falls due."""
        self._again: CheckpointReason | None = None
        self._last_end = float("-inf")
        self.burst = burst
        self._tokens = float(burst)
        self._tokens_at = float("-inf")
        """Tokens left at _tokens_at; they accrue one per min_interval up to burst."""
        self.on_emit = on_emit
        """Told of every request that goes out (the hybrid policy's signal)."""

    def _move(self, move: Move) -> None:
        new = TRANSITIONS.get((self.state, move))
        if new is None:
            raise IllegalTransition(f"checkpoint {move.value} while {self.state.value}")
        self.state = new

    def want(self, reason: CheckpointReason, now: float) -> None:
        """A reason for a checkpoint: request it, defer it, or fold it into one pending."""
        state = self.state
        if state is CheckpointState.RUNNING:
            if self._again is None:
                self._again = reason
            return
        if state is not CheckpointState.IDLE:
            self.counters["checkpoint_requests_coalesced"] += 1
            return
        due = self._due()
        if now >= due:
            self._move(Move.REQUEST)
            self._emit(reason, now)
        else:
            self.counters["checkpoint_requests_rate_limited"] += 1
            self._move(Move.DEFER)
            self.deferred = (reason, due)

    def _tokens_now(self, now: float) -> float:
        if self.min_interval <= 0 or self._tokens_at == float("-inf"):
            return float(self.burst)
        accrued = (now - self._tokens_at) / self.min_interval
        return min(float(self.burst), self._tokens + max(accrued, 0.0))

    def _due(self) -> float:
        """When the bucket next holds a whole token."""
        if self.min_interval <= 0 or self._tokens_at == float("-inf") or self._tokens >= 1:
            return float("-inf")
        return self._tokens_at + (1 - self._tokens) * self.min_interval

    def tick(self, now: float) -> None:
        """Send a deferred request once it is due."""
        if self.deferred is not None and now >= self.deferred[1]:
            reason = self.deferred[0]
            self.deferred = None
            self._move(Move.DUE)
            self._emit(reason, now)

    def started(self) -> None:
        """The VMs stopped for a checkpoint."""
        self._move(Move.STARTED)
        self.deferred = None

    def done(self, now: float) -> CheckpointReason | None:
        """The checkpoint committed.  Returns a reason found while it ran: the caller
        asks again (want) once the flows have been resynchronised."""
        again = self._again if self.state is CheckpointState.RUNNING else None
        self._again = None
        self.deferred = None
        self.counters["checkpoints_completed"] += 1
        self._move(Move.DONE)
        self._last_end = now
        self._tokens_at = now  # tokens accrue again from the end (none while it ran)
        return again

    def take(self) -> list[CheckpointRequest]:
        out, self.requests = self.requests, []
        return out

    def _emit(self, reason: CheckpointReason, now: float) -> None:
        self._tokens = self._tokens_now(now) - 1
        self._tokens_at = now
        self.reasons[reason.value] += 1
        self.requests.append(CheckpointRequest(now, reason))
        if self.on_emit is not None:
            self.on_emit(reason, now)
