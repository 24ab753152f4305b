"""Heartbeats and the failover decision, sans-IO (time in, decisions out).

Theory of operation
-------------------
QEMU has no heartbeat of its own: noticing that a VM is gone is the management
layer's job (reference section 4).  :class:`Heartbeats` tracks each peer
(primary QEMU, secondary QEMU, disk agent) over one or two paths
(:class:`Via`): its control channel (a QMP ``query-status``) and, for the
VMs, the data path (a probe frame injected into the guest's input that the
guest must answer on its output, see :func:`arp_probe`).  A QEMU whose QMP
answers while its NIC, its chardevs or its guest's network are dead is only
seen by the data path.

Every ``period`` seconds a probe is due on each path; the driver sends it and
reports :meth:`Heartbeats.answered` or :meth:`Heartbeats.failed`.  A probe
still unanswered one period after it was sent counts as failed.  ``misses``
consecutive failures on one path make the peer *lost*, once, on every path: a
lost peer stays lost.  A probe that travels through another peer (the
secondary's data probe reaches it through the primary's filter-mirror) is
*carried*: its failure counts only if its carrier answered since it was sent,
so a dead primary never makes the secondary look dead too.

A path counts only once *armed*: it must have answered once, so a slow
start-up never looks like a death.  The detection budget is therefore
``period * (misses + 1)`` from the last answer.

:func:`decide` is the failover policy as a table: what losing a peer means
in the current :class:`Phase`.

    phase      lost        -> phase            action
    PROTECTED  PRIMARY     -> TAKEOVER         TAKEOVER (secondary becomes primary)
    PROTECTED  SECONDARY   -> PRIMARY_ALONE    PRIMARY_ALONE (pass output through)
    PROTECTED  DISK        -> PROTECTED        REPORT (output stays held until it is back)
    any other  any         -> unchanged        REPORT
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Final, NamedTuple


class Peer(enum.Enum):
    """What colo-proxy watches."""

    PRIMARY = "primary"
    SECONDARY = "secondary"
    DISK = "disk"


class Via(enum.Enum):
    """The path a probe takes."""

    QMP = "qmp"
    DATA = "data"


class Probe(NamedTuple):
    """One peer on one path: what is probed, counted and lost."""

    peer: Peer
    via: Via = Via.QMP


class Phase(enum.Enum):
    """Where the pair stands."""

    PROTECTED = "protected"
    """Both VMs (and the disk agent, if any) answer: COLO protects the primary."""
    PRIMARY_ALONE = "primary_alone"
    """The secondary is gone: the primary runs unprotected, output passes through."""
    TAKEOVER = "takeover"
    """The primary is gone: the secondary's takeover sequence is running."""
    PROMOTED = "promoted"
    """The takeover finished: the former secondary is the primary."""


class Action(enum.Enum):
    """What the driver must do about a lost peer."""

    TAKEOVER = "takeover"
    PRIMARY_ALONE = "primary_alone"
    REPORT = "report"


_TABLE: dict[tuple[Phase, Peer], tuple[Phase, Action]] = {
    (Phase.PROTECTED, Peer.PRIMARY): (Phase.TAKEOVER, Action.TAKEOVER),
    (Phase.PROTECTED, Peer.SECONDARY): (Phase.PRIMARY_ALONE, Action.PRIMARY_ALONE),
    (Phase.PROTECTED, Peer.DISK): (Phase.PROTECTED, Action.REPORT),
}


def decide(phase: Phase, lost: Peer) -> tuple[Phase, Action]:
    """The new phase and the action for losing ``lost`` while in ``phase``."""
    return _TABLE.get((phase, lost), (phase, Action.REPORT))


@dataclass(slots=True)
class PathState:
    """One probe path's bookkeeping."""

    carrier: Probe | None = None
    armed: bool = False
    lost: bool = False
    misses: int = 0
    probes: int = 0
    answers: int = 0
    failures: int = 0
    uncounted: int = 0
    sent_at: float | None = None
    next_at: float = 0.0
    last_answer: float | None = None
    lost_at: float | None = None


@dataclass(frozen=True, slots=True)
class Lost:
    """A peer declared lost at ``at`` on path ``via``; ``silent_for`` is the time since
    that path's last answer."""

    peer: Peer
    at: float
    silent_for: float
    via: Via = Via.QMP


@dataclass(slots=True)
class Heartbeats:
    """Probe schedule and miss counting for a set of peers, on one or two paths each.

    ``data`` names the peers also probed over the data path; ``carriers`` maps a
    peer whose data probe travels through another peer to that peer.
    """

    peers: tuple[Peer, ...]
    period: float
    misses: int
    data: tuple[Peer, ...] = ()
    carriers: dict[Peer, Peer] = field(default_factory=dict)
    state: dict[Probe, PathState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.period <= 0 or self.misses < 1:
            raise ValueError("heartbeat period must be positive and misses at least 1")
        if not set(self.data) <= set(self.peers):
            raise ValueError("data-path peers must be peers")
        for peer, carrier in self.carriers.items():
            if peer not in self.data or carrier not in self.data or peer is carrier:
                raise ValueError("a carried data probe needs another data-path peer as carrier")
        self.state = {Probe(p): PathState() for p in self.peers}
        for p in self.data:
            via = self.carriers.get(p)
            self.state[Probe(p, Via.DATA)] = PathState(
                carrier=Probe(via, Via.DATA) if via is not None else None
            )

    def due(self, now: float) -> list[Probe]:
        """Probes to send now (each is marked as sent at ``now``)."""
        out = []
        for probe, st in self.state.items():
            if st.lost or st.sent_at is not None or now < st.next_at:
                continue
            st.sent_at = now
            st.next_at = now + self.period
            st.probes += 1
            out.append(probe)
        return out

    def answered(self, probe: Probe, now: float) -> None:
        """``probe`` was answered (a late answer still counts: the path works)."""
        st = self.state[probe]
        st.sent_at = None
        st.armed = True
        st.misses = 0
        st.answers += 1
        st.last_answer = now

    def failed(self, probe: Probe, now: float) -> Lost | None:
        """``probe`` failed (error, closed connection, no answer in time).

        Only a probe still outstanding counts: the driver's own timeout and
        :meth:`tick` both report the same silent probe, and it is one miss.
        """
        st = self.state[probe]
        sent_at, st.sent_at = st.sent_at, None
        if sent_at is None:
            return None
        st.failures += 1
        if not st.armed or st.lost:
            return None
        if st.carrier is not None:
            carrier = self.state[st.carrier]
            if carrier.last_answer is None or carrier.last_answer < sent_at:
                st.uncounted += 1  # it never got there: the carrier is silent too
                return None
        st.misses += 1
        if st.misses < self.misses:
            return None
        for other, ost in self.state.items():
            if other.peer is probe.peer:
                ost.lost = True
                ost.sent_at = None
                ost.lost_at = now
        assert st.last_answer is not None
        return Lost(probe.peer, now, now - st.last_answer, probe.via)

    def tick(self, now: float) -> list[Lost]:
        """Probes unanswered for a whole period count as failed."""
        out = []
        for probe, st in self.state.items():
            if st.sent_at is not None and now - st.sent_at >= self.period:
                lost = self.failed(probe, now)
                if lost is not None:
                    out.append(lost)
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`due` or :meth:`tick` next has something to say."""
        times = []
        for st in self.state.values():
            if st.lost:
                continue
            times.append(st.next_at if st.sent_at is None else st.sent_at + self.period)
        return min(times) if times else None

    def reroute(self, probe: Probe) -> None:
        """``probe`` now travels its own path: no carrier excuses its misses any more.

        After a takeover the secondary's data probe no longer goes through the
        (dead) primary.  The one outstanding went the old way and is forgotten.
        """
        st = self.state.get(probe)
        if st is not None:
            st.carrier = None
            st.sent_at = None

    def armed(self, peer: Peer) -> bool:
        """Whether ``peer`` answered on every path it is probed on."""
        return all(st.armed for probe, st in self.state.items() if probe.peer is peer)

    def report(self) -> dict[str, object]:
        """Per-peer counters for the run report (``data`` nested when probed there)."""
        out: dict[str, object] = {}
        for probe, st in self.state.items():
            entry: dict[str, object] = {
                "armed": st.armed, "lost": st.lost, "probes": st.probes,
                "answers": st.answers, "failures": st.failures, "misses": st.misses,
            }
            if probe.via is Via.QMP:
                out[probe.peer.value] = entry
            else:
                entry["uncounted"] = st.uncounted
                peer_entry = out.setdefault(probe.peer.value, {})
                assert isinstance(peer_entry, dict)
                peer_entry["data"] = entry
        return out


# ---- the data-path probe: an ARP probe (RFC 5227) the guest answers ------------------

PROBE_MAC_PREFIX: Final = bytes.fromhex("02c01dbe")
"""Locally administered source MAC of data-path probes; the last two bytes number them."""
_ARP_HEAD: Final = bytes.fromhex("0806" "0001" "0800" "06" "04")
_ARP_REQUEST: Final = b"\x00\x01"
_ARP_REPLY: Final = b"\x00\x02"
_BROADCAST: Final = b"\xff" * 6


def probe_mac(seq: int) -> bytes:
    """The source MAC that numbers probe ``seq`` (mod 65536)."""
    return PROBE_MAC_PREFIX + struct.pack(">H", seq & 0xFFFF)


def arp_probe(seq: int, guest_ip: bytes) -> bytes:
    """A broadcast ARP probe (sender IP 0.0.0.0) for ``guest_ip``, numbered ``seq``.

    Linux answers a probe for one of its addresses with a unicast reply to the
    probe's MAC and keeps no neighbour entry for it, so the guest's state is not
    touched beyond the reply; both VMs get the same frame (the filter-mirror copies
    it), so COLO's comparison is not disturbed.
    """
    mac = probe_mac(seq)
    return (_BROADCAST + mac + _ARP_HEAD + _ARP_REQUEST + mac + b"\0\0\0\0"
            + b"\0" * 6 + guest_ip + b"\0" * 18)


def probe_reply_seq(frame: bytes, offset: int = 0) -> int | None:
    """The probe number an ARP reply to one of our probes answers, else None."""
    if (len(frame) < offset + 42 or frame[offset + 12:offset + 20] != _ARP_HEAD
            or frame[offset + 20:offset + 22] != _ARP_REPLY):
        return None
    target = frame[offset + 32:offset + 38]
    if target[:4] != PROBE_MAC_PREFIX:
        return None
    seq: int = struct.unpack(">H", target[4:6])[0]
    return seq
