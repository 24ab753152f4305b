"""Inputs and outputs of the sans-IO core.

The core never performs I/O: drivers hand it frames with the current time
and carry out what it asks for.  Everything here is a frozen, slotted value
so actions can be logged, compared in tests and passed across tasks safely.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, final


class Side(enum.IntEnum):
    """Who produced a frame.  Values are small ints so they index lists."""

    PRIMARY = 0
    SECONDARY = 1
    CLIENT = 2


class CheckpointReason(enum.Enum):
    """Why the core asked for a checkpoint (reported, and used in stats)."""

    DIVERGENCE = "divergence"
    TIMEOUT = "timeout"
    HOLD_LIMIT = "hold_limit"
    FLOW_TABLE = "flow_table"
    FLUSH = "flush"
    MC_PERIOD = "mc_period"
    """Output held in MC waited mc_period: the checkpoint that releases it."""


class DivergenceKind(enum.Enum):
    """What kind of disagreement between primary and secondary was seen."""

    PAYLOAD = "payload"
    LENGTH = "length"
    CLOSE = "close"
    HANDSHAKE = "handshake"
    UDP = "udp"
    ICMP = "icmp"
    OTHER = "other"
    TIMEOUT = "timeout"
    ACK = "ack"


@dataclass(frozen=True, slots=True)
class CheckpointRequest:
    """The core wants the VMs checkpointed; the driver asks QEMU (or notify_dev)."""

    time: float
    reason: CheckpointReason


@dataclass(frozen=True, slots=True)
class Divergence:
    """A recorded disagreement: what, where, and the first differing bytes."""

    time: float
    flow: str
    kind: DivergenceKind
    offset: int | None
    primary: bytes = b""
    secondary: bytes = b""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class OverlapConflict:
    """One side sent different bytes for an offset it had already sent.

    The first copy is kept and compared; the client may have received
    either, so this is reported for the operator, not treated as divergence.
    """

    time: float
    flow: str
    side: str
    offset: int | None


@dataclass(frozen=True, slots=True)
class ModeSwitch:
    """The policy moved the whole VM, or one service, between COLO and MC."""

    time: float
    scope: str
    """"vm", or the service (guest address and port) whose flows moved."""
    old: str
    new: str
    reason: str


@final
class CoreOutput:
    """Everything the core produced since the last drain (Proxy.take_output).

    The driver acts on it in this order: send `released` to the client, carry
    out `requests`, report `divergences`.  A plain slotted class, not a frozen
    dataclass: one is built per drain (per read, live), and a frozen
    dataclass's generated ``__init__`` stays interpreted (``object.__setattr__``
    per field) even when compiled.
    """

    __slots__ = ("divergences", "released", "requests", "switches")

    def __init__(self, released: list[tuple[bytes, int]], requests: list[CheckpointRequest],
                 divergences: list[Divergence], switches: list[ModeSwitch]) -> None:
        self.released: Final = released
        """Primary frames safe to send to the client, as (data, offset), in order."""
        self.requests: Final = requests
        """Checkpoint requests the driver must carry out."""
        self.divergences: Final = divergences
        """Divergences seen since the last drain."""
        self.switches: Final = switches
        """Mode switches since the last drain (the whole VM's: set QEMU's checkpoint
        period)."""

    def __repr__(self) -> str:
        return (f"CoreOutput(released={self.released!r}, requests={self.requests!r}, "
                f"divergences={self.divergences!r}, switches={self.switches!r})")
