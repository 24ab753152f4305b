"""One frozen, validated configuration object for the core.

Drivers and the CLI build it from flags and TOML; nothing reads globals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from colo_proxy.errors import ConfigError

AFTER_CHECKPOINT_MODES: tuple[str, ...] = ("auto", "reset", "continues")

CHOICES: dict[str, tuple[str, ...]] = {"secondary_after_checkpoint": AFTER_CHECKPOINT_MODES}
"""Settings that take one of a few words instead of a number."""


@dataclass(frozen=True, slots=True)
class Config:
    """Thresholds and limits.  Times are seconds, sizes are bytes."""

    compare_timeout: float = 3.0
    """Unmatched output older than this forces a checkpoint (QEMU's default)."""
    scan_interval: float = 0.1
    """How often held output is checked against the timeout (virtual time)."""
    max_hold_bytes: int = 64 * 1024 * 1024
    """Primary bytes held across all flows before a checkpoint is forced."""
    max_flow_hold_bytes: int = 16 * 1024 * 1024
    """Primary bytes held in one flow before a checkpoint is forced."""
    max_hold_frames: int = 262144
    """Primary frames held across all flows before a checkpoint is forced."""
    max_hold_flows: int = 16384
    """Flows holding primary output before a checkpoint is forced."""
    max_flows: int = 65536
    """Soft cap on tracked flows; idle, empty flows are evicted first."""
    flow_idle_timeout: float = 300.0
    """An idle flow that holds nothing is forgotten after this long."""
    closed_flow_timeout: float = 10.0
    """A closed TCP flow that holds nothing is forgotten after this long."""
    min_checkpoint_interval: float = 0.1
    """Rate limit: at least this long between the end of one checkpoint and a request."""
    datagram_reorder_window: int = 16
    """UDP/ICMP/other: how far apart a datagram and its partner may arrive."""
    max_fragments: int = 64
    """Fragments kept for one IP datagram before it is given up."""
    max_fragment_bytes: int = 4 * 1024 * 1024
    """Bytes held in incomplete IP datagrams, per side."""
    fragment_timeout: float = 30.0
    """An incomplete IP datagram is given up after this long."""
    max_sec_buffer_bytes: int = 16 * 1024 * 1024
    """Secondary bytes buffered in one flow ahead of the primary before a checkpoint."""
    secondary_after_checkpoint: str = "auto"
    """After a checkpoint the secondary: reset (copies the primary), continues, auto (per flow)."""
    # reset: it continues from the primary's state, as on a real COLO pair; continues: it
    # goes on in its own sequence space (independent recordings, a failed checkpoint);
    # auto: each flow decides from the secondary's next segment (see tcp.py).

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in CHOICES:
                if value not in CHOICES[f.name]:
                    allowed = ", ".join(CHOICES[f.name])
                    raise ConfigError(f"{f.name}: expected one of {allowed}, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{f.name}: expected a number, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}: must be finite, got {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise ConfigError(f"{f.name}: expected an integer, got {value!r}")
            if value < 0:
                raise ConfigError(f"{f.name}: must not be negative, got {value!r}")
        if self.scan_interval <= 0:
            raise ConfigError("scan_interval: must be positive")
        if self.max_fragments < 1:
            raise ConfigError("max_fragments: must be at least 1")

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> Config:
        """Build from a TOML table or flag dict; unknown keys are an error."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        converted: dict[str, Any] = {}
        for name, value in values.items():
            if known[name] == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            converted[name] = value
        return cls(**converted)
