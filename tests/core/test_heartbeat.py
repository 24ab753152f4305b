"""Heartbeats and the failover table, in virtual time."""

from __future__ import annotations

import pytest

from colo_proxy.core.heartbeat import (
    Action,
    Heartbeats,
    Lost,
    Peer,
    Phase,
    Probe,
    Via,
    arp_probe,
    decide,
    probe_mac,
    probe_reply_seq,
)

P, M = 0.5, 3
PRI, SEC, DISK = Probe(Peer.PRIMARY), Probe(Peer.SECONDARY), Probe(Peer.DISK)
PRI_DATA, SEC_DATA = Probe(Peer.PRIMARY, Via.DATA), Probe(Peer.SECONDARY, Via.DATA)


def drive(hb: Heartbeats, until: float, answers: dict[Probe, float]) -> list[Lost]:
    """Run the schedule as the driver does; each path answers every probe sent before its
    ``answers`` time (at once) and never after."""
    lost: list[Lost] = []
    now = 0.0
    while now <= until:
        lost += hb.tick(now)
        for probe in hb.due(now):
            if now < answers.get(probe, float("inf")):
                hb.answered(probe, now)
        deadline = hb.next_deadline()
        if deadline is None:
            break
        now = deadline
    return lost


def test_silent_peer_lost_after_misses_plus_one_periods() -> None:
    hb = Heartbeats((Peer.PRIMARY, Peer.SECONDARY), P, M)
    lost = drive(hb, 10.0, {PRI: 3.01})  # last answer at t=3.0
    budget = P * (M + 1)
    assert [(x.peer, x.at, x.silent_for) for x in lost] == [(Peer.PRIMARY, 3.0 + budget, budget)]
    assert hb.state[SEC].lost is False
    assert hb.state[PRI].misses == M


def test_a_silent_probe_reported_twice_is_one_miss() -> None:
    # the driver's own timeout and tick() both see the same unanswered probe
    hb = Heartbeats((Peer.PRIMARY,), P, M)
    hb.due(0.0)
    hb.answered(PRI, 0.0)
    hb.due(P)
    assert hb.tick(2 * P) == []
    assert hb.failed(PRI, 2 * P) is None
    assert hb.state[PRI].misses == 1 and hb.state[PRI].failures == 1


def test_never_answering_peer_is_not_armed_and_never_lost() -> None:
    hb = Heartbeats((Peer.DISK,), P, M)
    assert drive(hb, 10.0, {DISK: 0.0}) == []
    assert not hb.armed(Peer.DISK) and hb.state[DISK].failures > M


def test_an_answer_resets_the_misses() -> None:
    hb = Heartbeats((Peer.PRIMARY,), P, M)
    hb.due(0.0)
    hb.answered(PRI, 0.0)
    for i in range(1, M):
        hb.due(i * P)
        assert hb.failed(PRI, i * P) is None
    hb.due(M * P)
    hb.answered(PRI, M * P)
    for i in range(M + 1, 2 * M):
        hb.due(i * P)
        assert hb.failed(PRI, i * P) is None
    hb.due(2 * M * P)
    assert hb.failed(PRI, 2 * M * P) == Lost(Peer.PRIMARY, 2 * M * P, M * P)
    assert hb.failed(PRI, 9.0) is None  # lost once
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
    with pytest.raises(ValueError):
        Heartbeats((Peer.PRIMARY,), 0.5, 3, data=(Peer.SECONDARY,))
    with pytest.raises(ValueError):
        Heartbeats((Peer.PRIMARY,), 0.5, 3, data=(Peer.PRIMARY,),
                   carriers={Peer.PRIMARY: Peer.PRIMARY})


def data_paths() -> Heartbeats:
    return Heartbeats((Peer.PRIMARY, Peer.SECONDARY), P, M,
                      data=(Peer.PRIMARY, Peer.SECONDARY),
                      carriers={Peer.SECONDARY: Peer.PRIMARY})


def test_dead_data_path_with_live_qmp_loses_the_peer_once() -> None:
    hb = data_paths()
    lost = drive(hb, 10.0, {PRI_DATA: 3.01})  # QMP answers throughout
    budget = P * (M + 1)
    assert lost == [Lost(Peer.PRIMARY, 3.0 + budget, budget, Via.DATA)]
    # the peer is lost on every path, and no second loss is ever reported for it
    assert hb.state[PRI].lost and hb.state[PRI_DATA].lost
    assert not hb.state[SEC].lost and not hb.state[SEC_DATA].lost
    report = hb.report()
    assert report["primary"]["lost"] and report["primary"]["data"]["lost"]  # type: ignore[index]


def test_carried_probe_does_not_fail_while_its_carrier_is_silent() -> None:
    # the whole primary goes (QMP and data): the secondary's data probe, which came
    # through the primary, must not make the secondary look dead as well
    hb = data_paths()
    lost = drive(hb, 10.0, {PRI: 3.01, PRI_DATA: 3.01, SEC_DATA: 3.01})
    assert [(x.peer, x.via) for x in lost] == [(Peer.PRIMARY, Via.QMP)]
    assert hb.state[SEC_DATA].misses == 0 and hb.state[SEC_DATA].uncounted >= M


def test_carried_probe_fails_when_the_carrier_answers() -> None:
    hb = data_paths()
    lost = drive(hb, 10.0, {SEC_DATA: 3.01})
    assert [(x.peer, x.via) for x in lost] == [(Peer.SECONDARY, Via.DATA)]


def test_rerouted_probe_counts_its_own_misses() -> None:
    # after a takeover the secondary's probe no longer goes through the dead primary:
    # its misses count although the primary stays silent
    hb = data_paths()
    hb.reroute(SEC_DATA)
    lost = drive(hb, 10.0, {PRI: 3.01, PRI_DATA: 3.01, SEC_DATA: 3.01})
    assert (Peer.SECONDARY, Via.DATA) in [(x.peer, x.via) for x in lost]
    hb.reroute(Probe(Peer.DISK, Via.DATA))  # a probe not watched: nothing to do


def test_arp_probe_and_its_reply() -> None:
    guest = bytes([10, 215, 15, 2])
    probe = arp_probe(0x1_2345, guest)  # numbers wrap at 16 bits
    assert len(probe) == 60 and probe[:6] == b"\xff" * 6 and probe[6:12] == probe_mac(0x2345)
    assert probe[12:14] == b"\x08\x06" and probe[28:32] == b"\0" * 4 and probe[38:42] == guest
    assert probe_reply_seq(probe) is None  # a request is not an answer
    guest_mac = bytes.fromhex("525400150002")
    # what Linux sends back to an ARP probe: unicast to the probe's MAC, sender IP = its own
    reply = (probe_mac(0x2345) + guest_mac + b"\x08\x06\x00\x01\x08\x00\x06\x04\x00\x02"
             + guest_mac + guest + probe_mac(0x2345) + b"\0" * 4)
    assert probe_reply_seq(reply) == 0x2345
    assert probe_reply_seq(b"\0" * 12 + reply, 12) == 0x2345  # after a vnet header
    other = reply[:32] + guest_mac + reply[38:]  # a reply to someone else
    assert probe_reply_seq(other) is None
    assert probe_reply_seq(reply[:41]) is None
