"""One frozen, validated configuration object for the core.

Drivers and the CLI build it from flags and TOML; nothing reads globals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Final

from colo_proxy.core.rules import FlowRule, MaskRule, flow_rule_from, mask_from
from colo_proxy.errors import ConfigError

AFTER_CHECKPOINT_MODES: tuple[str, ...] = ("auto", "reset", "continues")
VM_MODES: tuple[str, ...] = ("auto", "colo", "mc")
ENCRYPTED_MODES: tuple[str, ...] = ("mc", "compare", "passthrough")

POLICIES: tuple[str, ...] = ("hybrid", "colo")

CHOICES: dict[str, tuple[str, ...]] = {
    "secondary_after_checkpoint": AFTER_CHECKPOINT_MODES,
    "policy": POLICIES,
    "mode": VM_MODES,
    "encrypted_flows": ENCRYPTED_MODES,
}
"""Settings that take one of a few words instead of a number."""

RULE_LISTS: tuple[str, ...] = ("flow_rules", "masks")
"""Settings that are lists of tables ([[flow_rules]], [[masks]]; --flow-rule, --mask)."""


def type_name(annotation: object) -> str:
    """A dataclass field's type as a name: "float" both pure (a string, as
    `from __future__ import annotations` leaves it) and compiled (the class)."""
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", str(annotation))


FIELD_DOCS: Final[dict[str, str]] = {
    "compare_timeout": "Unmatched output older than this forces a checkpoint (QEMU's default).",
    "scan_interval": "How often held output is checked against the timeout (virtual time).",
    "max_hold_bytes": "Primary bytes held across all flows before a checkpoint is forced.",
    "max_flow_hold_bytes": "Primary bytes held in one flow before a checkpoint is forced.",
    "max_hold_frames": "Primary frames held across all flows before a checkpoint is forced.",
    "max_hold_flows": "Flows holding primary output before a checkpoint is forced.",
    "max_flows": "Soft cap on tracked flows; idle, empty flows are evicted first.",
    "max_flows_hard": (
        "Hard cap on tracked flows: past it new flows are refused, their frames dropped and "
        "counted, until a checkpoint frees the table (0: 4 x max_flows)."
    ),
    "max_hold_bytes_hard": (
        "Held primary bytes past which new flows are refused (0: 4 x max_hold_bytes)."
    ),
    "flow_idle_timeout": "An idle flow that holds nothing is forgotten after this long.",
    "closed_flow_timeout": "A closed TCP flow that holds nothing is forgotten after this long.",
    "min_checkpoint_interval": (
        "Rate limit: at least this long between the end of one checkpoint and a request."
    ),
    "datagram_reorder_window": (
        "UDP/ICMP/other: how far apart a datagram and its partner may arrive."
    ),
    "max_fragments": "Fragments kept for one IP datagram before it is given up.",
    "max_fragment_bytes": "Bytes held in incomplete IP datagrams, per side.",
    "fragment_timeout": "An incomplete IP datagram is given up after this long.",
    "max_sec_buffer_bytes": (
        "Secondary bytes buffered in one flow ahead of the primary before a checkpoint."
    ),
    "secondary_after_checkpoint": (
        "After a checkpoint the secondary: reset (copies the primary), continues, auto (per flow)."
    ),
    "checkpoint_burst": (
        "Rate limit: checkpoints allowed back to back before min_checkpoint_interval applies."
    ),
    "policy": (
        "hybrid (modes per flow and for the VM, early notice) or colo (pure COLO: compare all)."
    ),
    "mode": "Whole VM: colo (compare), mc (hold all output until each checkpoint), auto (switch).",
    "encrypted_flows": "TLS and SSH connections (never equal on two VMs): mc, compare, passthrough",
    "mc_period": "MC: held output waits at most this long before a checkpoint is asked for.",
    "flow_divergence_limit": (
        "A service (guest address and port) diverging this often in the window moves to mc."
    ),
    "flow_divergence_window": "The window flow_divergence_limit counts divergences in.",
    "flow_cooldown": "How long a diverging service stays mc before a probe (doubles on failure).",
    "vm_window": "The window the whole-VM signals are measured over.",
    "vm_mc_checkpoint_rate": "Divergence checkpoints per second that move the whole VM to MC.",
    "vm_mc_held_share": "Share of primary frames in mc flows that moves the whole VM to MC.",
    "vm_mc_min_time": "Time in MC before probing COLO again (doubles after a failed probe).",
    "vm_max_dirty_rate": "Dirty pages MB/s above which MC is left (0: not used).",
    "flow_rules": "Per-flow modes ([[flow_rules]] mode, protocol, port, addr, vlan): first wins",
    "masks": "Noise fields blanked on both sides: [[masks]] pattern (regex), port, protocol.",
}
"""What each Config field means, for --help and readers (one entry per field)."""


@dataclass(frozen=True, slots=True)
class Config:
    """Thresholds and limits.  Times are seconds, sizes are bytes.

    What each field means is in FIELD_DOCS (also --help): a table rather than
    attribute docstrings, so it reads the same when this class is compiled.
    """

    compare_timeout: float = 3.0
    scan_interval: float = 0.1
    max_hold_bytes: int = 64 * 1024 * 1024
    max_flow_hold_bytes: int = 16 * 1024 * 1024
    max_hold_frames: int = 262144
    max_hold_flows: int = 16384
    max_flows: int = 65536
    max_flows_hard: int = 0
    max_hold_bytes_hard: int = 0
    flow_idle_timeout: float = 300.0
    closed_flow_timeout: float = 10.0
    min_checkpoint_interval: float = 0.1
    datagram_reorder_window: int = 16
    max_fragments: int = 64
    max_fragment_bytes: int = 4 * 1024 * 1024
    fragment_timeout: float = 30.0
    max_sec_buffer_bytes: int = 16 * 1024 * 1024
    secondary_after_checkpoint: str = "auto"
    # reset: it continues from the primary's state, as on a real COLO pair; continues: it
    # goes on in its own sequence space (independent recordings, a failed checkpoint);
    # auto: each flow decides from the secondary's next segment (see tcp.py).
    checkpoint_burst: int = 1
    policy: str = "hybrid"
    mode: str = "auto"
    encrypted_flows: str = "mc"
    mc_period: float = 0.1
    flow_divergence_limit: int = 3
    flow_divergence_window: float = 10.0
    flow_cooldown: float = 30.0
    vm_window: float = 5.0
    vm_mc_checkpoint_rate: float = 5.0
    vm_mc_held_share: float = 0.5
    vm_mc_min_time: float = 10.0
    vm_max_dirty_rate: float = 0.0
    flow_rules: tuple[FlowRule, ...] = ()
    masks: tuple[MaskRule, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in RULE_LISTS:
                kind = FlowRule if f.name == "flow_rules" else MaskRule
                if not isinstance(value, tuple) or not all(isinstance(v, kind) for v in value):
                    raise ConfigError(f"{f.name}: expected a list of rules, got {value!r}")
                continue
            if f.name in CHOICES:
                if value not in CHOICES[f.name]:
                    allowed = ", ".join(CHOICES[f.name])
                    raise ConfigError(f"{f.name}: expected one of {allowed}, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{f.name}: expected a number, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}: must be finite, got {value!r}")
            if type_name(f.type) == "int" and not isinstance(value, int):
                raise ConfigError(f"{f.name}: expected an integer, got {value!r}")
            if value < 0:
                raise ConfigError(f"{f.name}: must not be negative, got {value!r}")
        if self.scan_interval <= 0:
            raise ConfigError("scan_interval: must be positive")
        if self.max_fragments < 1:
            raise ConfigError("max_fragments: must be at least 1")
        if 0 < self.max_flows_hard < self.max_flows:
            raise ConfigError("max_flows_hard: must be 0 (4 x max_flows) or at least max_flows")
        if self.checkpoint_burst < 1:
            raise ConfigError("checkpoint_burst: must be at least 1")
        if self.flow_divergence_limit < 1:
            raise ConfigError("flow_divergence_limit: must be at least 1")
        if self.mc_period <= 0:
            raise ConfigError("mc_period: must be positive")

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> Config:
        """Build from a TOML table or flag dict; unknown keys are an error."""
        known = {f.name: type_name(f.type) for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        converted: dict[str, Any] = {}
        for name, value in values.items():
            if known[name] == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif name in RULE_LISTS:
                value = rule_list(name, value)
            converted[name] = value
        return cls(**converted)


def rule_list(name: str, value: object) -> tuple[FlowRule, ...] | tuple[MaskRule, ...]:
    """A TOML array of tables (or rules already built) as a tuple of rules."""
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{name}: expected a list of tables ([[{name}]]), got {value!r}")
    if name == "flow_rules":
        return tuple(
            v if isinstance(v, FlowRule) else flow_rule_from(_table(name, i, v), f"{name}[{i}]")
            for i, v in enumerate(value)
        )
    return tuple(
        v if isinstance(v, MaskRule) else mask_from(_table(name, i, v), f"{name}[{i}]")
        for i, v in enumerate(value)
    )


def _table(name: str, i: int, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{name}[{i}]: expected a table, got {value!r}")
    return value
