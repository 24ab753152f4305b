"""The checkpoint cycle is a transition table: listed moves happen, others raise."""

from __future__ import annotations

from collections import Counter

import pytest

from colo_proxy.core.checkpoint import (
    TRANSITIONS,
    CheckpointPolicy,
    CheckpointState,
    IllegalTransition,
    Move,
)
from colo_proxy.core.events import CheckpointReason

R = CheckpointReason.DIVERGENCE


def test_the_cycle_with_rate_limit_and_coalescing() -> None:
    policy = CheckpointPolicy(1.0, Counter())
    policy.want(R, 0.0)
    assert policy.state is CheckpointState.REQUESTED and len(policy.take()) == 1
    policy.want(CheckpointReason.TIMEOUT, 0.1)  # coalesced into the pending one
    policy.started()
    policy.want(CheckpointReason.HOLD_LIMIT, 0.2)  # while running: asks again when done
    assert policy.done(0.3) is CheckpointReason.HOLD_LIMIT
    policy.want(R, 0.5)  # within the rate limit
    assert policy.state is CheckpointState.DEFERRED and policy.take() == []
    policy.tick(1.2)
    assert policy.state is CheckpointState.DEFERRED
    policy.tick(1.3)
    assert policy.state is CheckpointState.REQUESTED
    assert [r.time for r in policy.take()] == [1.3]
    assert policy.counters == Counter(checkpoint_requests_coalesced=1, checkpoints_completed=1,
                                      checkpoint_requests_rate_limited=1)


@pytest.mark.parametrize("state", list(CheckpointState))
@pytest.mark.parametrize("move", list(Move))
def test_moves_outside_the_table_raise(state: CheckpointState, move: Move) -> None:
    policy = CheckpointPolicy(0.0, Counter())
    policy.state = state
    if (state, move) in TRANSITIONS:
        policy._move(move)
        assert policy.state is TRANSITIONS[(state, move)]
    else:
        with pytest.raises(IllegalTransition):
            policy._move(move)
        assert policy.state is state


def test_started_and_done_are_legal_everywhere() -> None:
    """QEMU checkpoints on its own timer too; done ends any state."""
    for state in CheckpointState:
        assert TRANSITIONS[(state, Move.STARTED)] is CheckpointState.RUNNING
        assert TRANSITIONS[(state, Move.DONE)] is CheckpointState.IDLE
