"""Heartbeats and the failover decision, sans-IO (time in, decisions out).

Theory of operation
-------------------
QEMU has no heartbeat of its own: noticing that a VM is gone is the management
layer's job (reference section 4).  :class:`Heartbeats` tracks each peer
(primary QEMU, secondary QEMU, disk agent).  Every ``period`` seconds a probe
is due for each peer; the driver sends it (a QMP ``query-status``) and reports
:meth:`Heartbeats.answered` or :meth:`Heartbeats.failed`.  A probe still
unanswered one period after it was sent counts as failed.  ``misses``
consecutive failures make the peer *lost*, once: a lost peer stays lost.

A peer counts only once *armed*: it must have answered once, so a slow
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
from dataclasses import dataclass, field


class Peer(enum.Enum):
    """What colo-proxy watches."""

    PRIMARY = "primary"
    SECONDARY = "secondary"
    DISK = "disk"


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
class PeerState:
    """One peer's probe bookkeeping."""

    armed: bool = False
    lost: bool = False
    misses: int = 0
    probes: int = 0
    answers: int = 0
    failures: int = 0
    sent_at: float | None = None
    next_at: float = 0.0
    last_answer: float | None = None
    lost_at: float | None = None


@dataclass(frozen=True, slots=True)
class Lost:
    """A peer declared lost at ``at``; ``silent_for`` is the time since its last answer."""

    peer: Peer
    at: float
    silent_for: float


@dataclass(slots=True)
class Heartbeats:
    """Probe schedule and miss counting for a set of peers."""

    peers: tuple[Peer, ...]
    period: float
    misses: int
    state: dict[Peer, PeerState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.period <= 0 or self.misses < 1:
            raise ValueError("heartbeat period must be positive and misses at least 1")
        self.state = {p: PeerState() for p in self.peers}

    def due(self, now: float) -> list[Peer]:
        """Peers to probe now (each is marked as probed at ``now``)."""
        out = []
        for peer, st in self.state.items():
            if st.lost or st.sent_at is not None or now < st.next_at:
                continue
            st.sent_at = now
            st.next_at = now + self.period
            st.probes += 1
            out.append(peer)
        return out

    def answered(self, peer: Peer, now: float) -> None:
        """The probe of ``peer`` was answered."""
        st = self.state[peer]
        st.sent_at = None
        st.armed = True
        st.misses = 0
        st.answers += 1
        st.last_answer = now

    def failed(self, peer: Peer, now: float) -> Lost | None:
        """The probe of ``peer`` failed (error, closed connection, no answer in time)."""
        st = self.state[peer]
        st.sent_at = None
        st.failures += 1
        if not st.armed or st.lost:
            return None
        st.misses += 1
        if st.misses < self.misses:
            return None
        st.lost = True
        st.lost_at = now
        assert st.last_answer is not None
        return Lost(peer, now, now - st.last_answer)

    def tick(self, now: float) -> list[Lost]:
        """Probes unanswered for a whole period count as failed."""
        out = []
        for peer, st in self.state.items():
            if st.sent_at is not None and now - st.sent_at >= self.period:
                lost = self.failed(peer, now)
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

    def armed(self, peer: Peer) -> bool:
        return self.state[peer].armed

    def report(self) -> dict[str, object]:
        """Per-peer counters for the run report."""
        return {
            p.value: {
                "armed": st.armed, "lost": st.lost, "probes": st.probes,
                "answers": st.answers, "failures": st.failures, "misses": st.misses,
            }
            for p, st in self.state.items()
        }
