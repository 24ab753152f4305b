"""Heartbeats and the failover table, in virtual time."""

from __future__ import annotations

import pytest

from colo_proxy.core.heartbeat import Action, Heartbeats, Lost, Peer, Phase, decide

P, M = 0.5, 3


def drive(hb: Heartbeats, until: float, answers: dict[Peer, float]) -> list[Lost]:
    """Run the schedule as the driver does; each peer answers every probe sent before its
    ``answers`` time (at once) and never after."""
    lost: list[Lost] = []
    now = 0.0
    while now <= until:
        lost += hb.tick(now)
        for peer in hb.due(now):
            if now < answers.get(peer, float("inf")):
                hb.answered(peer, now)
        deadline = hb.next_deadline()
        if deadline is None:
            break
        now = deadline
    return lost


def test_silent_peer_lost_after_misses_plus_one_periods() -> None:
    hb = Heartbeats((Peer.PRIMARY, Peer.SECONDARY), P, M)
    lost = drive(hb, 10.0, {Peer.PRIMARY: 3.01})  # last answer at t=3.0
    budget = P * (M + 1)
    assert [(x.peer, x.at, x.silent_for) for x in lost] == [(Peer.PRIMARY, 3.0 + budget, budget)]
    assert hb.state[Peer.SECONDARY].lost is False
    assert hb.state[Peer.PRIMARY].misses == M


def test_never_answering_peer_is_not_armed_and_never_lost() -> None:
    hb = Heartbeats((Peer.DISK,), P, M)
    assert drive(hb, 10.0, {Peer.DISK: 0.0}) == []
    assert not hb.armed(Peer.DISK) and hb.state[Peer.DISK].failures > M


def test_an_answer_resets_the_misses() -> None:
    hb = Heartbeats((Peer.PRIMARY,), P, M)
    hb.due(0.0)
    hb.answered(Peer.PRIMARY, 0.0)
    for i in range(1, M):
        hb.due(i * P)
        assert hb.failed(Peer.PRIMARY, i * P) is None
    hb.due(M * P)
    hb.answered(Peer.PRIMARY, M * P)
    for i in range(M + 1, 2 * M):
        hb.due(i * P)
        assert hb.failed(Peer.PRIMARY, i * P) is None
    hb.due(2 * M * P)
    assert hb.failed(Peer.PRIMARY, 2 * M * P) == Lost(Peer.PRIMARY, 2 * M * P, M * P)
    assert hb.failed(Peer.PRIMARY, 9.0) is None  # lost once
    assert hb.due(9.0) == [] and hb.next_deadline() is None


@pytest.mark.parametrize(
    ("phase", "peer", "expected"),
    [
        (Phase.PROTECTED, Peer.PRIMARY, (Phase.TAKEOVER, Action.TAKEOVER)),
        (Phase.PROTECTED, Peer.SECONDARY, (Phase.PRIMARY_ALONE, Action.PRIMARY_ALONE)),
        (Phase.PROTECTED, Peer.DISK, (Phase.PROTECTED, Action.REPORT)),
        (Phase.PRIMARY_ALONE, Peer.PRIMARY, (Phase.PRIMARY_ALONE, Action.REPORT)),
        (Phase.TAKEOVER, Peer.SECONDARY, (Phase.TAKEOVER, Action.REPORT)),
        (Phase.PROMOTED, Peer.DISK, (Phase.PROMOTED, Action.REPORT)),
    ],
)
def test_failover_table(phase: Phase, peer: Peer, expected: tuple[Phase, Action]) -> None:
    assert decide(phase, peer) == expected


def test_bad_settings() -> None:
    with pytest.raises(ValueError):
        Heartbeats((Peer.PRIMARY,), 0.0, 3)
    with pytest.raises(ValueError):
        Heartbeats((Peer.PRIMARY,), 0.5, 0)
