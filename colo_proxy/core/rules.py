"""Operator rules: which mode a flow runs in, and which noise fields are masked.

A flow rule matches on protocol, either endpoint's address (or network) and
port, and a VLAN id; the first rule that matches a flow decides its mode.  A
mask rule names a same-length noise field by a regular expression over the
stream (group 1 if the pattern has one, else the whole match), for one port
or all.  Both are plain frozen values, built from TOML tables or from flags
(`parse_flow_rule`, `parse_mask`), so the Config that carries them stays
hashable and comparable.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Final

from colo_proxy.core.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP
from colo_proxy.errors import ConfigError

FLOW_MODES: Final = ("compare", "mc", "mask", "passthrough")
"""compare: COLO; mc: held until the next checkpoint, uncompared; mask: compare with
noise fields blanked; passthrough: released at once, unprotected (the operator's choice)."""

PROTOCOLS: Final[dict[str, tuple[int, ...]]] = {
    "tcp": (PROTO_TCP,), "udp": (PROTO_UDP,), "icmp": (PROTO_ICMP, PROTO_ICMPV6),
}

RuleKey = tuple[int, tuple[int, ...], bytes, bytes, int, int]
"""A flow key as the core keeps it: (proto, vlans, src, dst, sport, dport)."""


def _protocols(name: str | None, where: str) -> tuple[int, ...] | None:
    if name is None:
        return None
    text = str(name).lower()
    if text in PROTOCOLS:
        return PROTOCOLS[text]
    if text.isdigit() and 0 <= int(text) <= 255:
        return (int(text),)
    raise ConfigError(f"{where}: protocol must be tcp, udp, icmp or a number, got {name!r}")


def _port(value: object, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{where}: port must be 0-65535, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class FlowRule:
    """One `[[flow_rules]]` entry or `--flow-rule`; unset fields match anything."""

    mode: str
    protocol: str | None = None
    port: int | None = None
    addr: str | None = None
    vlan: int | None = None

    def __post_init__(self) -> None:
        where = f"flow rule {self.describe()}"
        if self.mode not in FLOW_MODES:
            raise ConfigError(f"{where}: mode must be one of {', '.join(FLOW_MODES)}, "
                              f"got {self.mode!r}")
        _protocols(self.protocol, where)
        _port(self.port, where)
        if self.addr is not None:
            try:
                ipaddress.ip_network(self.addr, strict=False)
            except ValueError:
                raise ConfigError(f"{where}: addr {self.addr!r} is not an address or "
                                  "network") from None
        if self.vlan is not None and (
            isinstance(self.vlan, bool) or not isinstance(self.vlan, int)
            or not 0 <= self.vlan <= 4095
        ):
            raise ConfigError(f"{where}: vlan must be 0-4095, got {self.vlan!r}")

    def describe(self) -> str:
        parts = [f"mode={self.mode}"]
        for name in ("protocol", "port", "addr", "vlan"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value}")
        return ",".join(parts)


@dataclass(frozen=True, slots=True)
class MaskRule:
    """One `[[masks]]` entry or `--mask`: a noise field blanked on both sides."""

    pattern: str
    port: int | None = None
    protocol: str | None = None
    name: str = ""

    def __post_init__(self) -> None:
        where = f"mask {self.name or self.pattern!r}"
        try:
            re.compile(self.pattern.encode())
        except (re.error, AttributeError) as err:
            raise ConfigError(f"{where}: bad pattern: {err}") from None
        _protocols(self.protocol, where)
        _port(self.port, where)


class CompiledRule:
    """A FlowRule ready to match flow keys (addresses as raw bytes)."""

    __slots__ = ("mode", "net", "port", "protos", "vlan")

    def __init__(self, rule: FlowRule) -> None:
        self.mode = rule.mode
        self.protos = _protocols(rule.protocol, "flow rule")
        self.port = rule.port
        self.net = None if rule.addr is None else ipaddress.ip_network(rule.addr, strict=False)
        self.vlan = rule.vlan

    def matches(self, key: RuleKey) -> bool:
        proto, vlans, src, dst, sport, dport = key
        if self.protos is not None and proto not in self.protos:
            return False
        if self.port is not None and self.port not in (sport, dport):
            return False
        if self.vlan is not None and self.vlan not in vlans:
            return False
        net = self.net
        if net is not None:
            return any(
                len(raw) == (4 if net.version == 4 else 16)
                and ipaddress.ip_address(raw) in net
                for raw in (src, dst)
            )
        return True


class CompiledMask:
    """A MaskRule ready to search stream bytes."""

    __slots__ = ("port", "protos", "regex")

    def __init__(self, rule: MaskRule) -> None:
        self.regex = re.compile(rule.pattern.encode())
        self.port = rule.port
        self.protos = _protocols(rule.protocol, "mask")

    def applies(self, key: RuleKey) -> bool:
        proto, _vlans, _src, _dst, sport, dport = key
        if self.protos is not None and proto not in self.protos:
            return False
        return self.port is None or self.port in (sport, dport)


def parse_pairs(text: str, what: str) -> dict[str, Any]:
    """`key=value,key=value` (the flag syntax of --flow-rule)."""
    out: dict[str, Any] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"{what} {text!r}: expected key=value, got {part!r}")
        out[name.strip()] = value.strip()
    return out


def flow_rule_from(values: dict[str, Any], where: str = "flow rule") -> FlowRule:
    """A FlowRule from a TOML table or parsed flag; unknown keys are errors."""
    known = {"mode", "protocol", "port", "addr", "vlan"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(known))})")
    if "mode" not in values:
        raise ConfigError(f"{where}: mode is required")
    vlan = values.get("vlan")
    if isinstance(vlan, str) and vlan.isdigit():
        vlan = int(vlan)
    return FlowRule(
        mode=str(values["mode"]), protocol=values.get("protocol"),
        port=_port(values.get("port"), where), addr=values.get("addr"), vlan=vlan,
    )


def mask_from(values: dict[str, Any], where: str = "mask") -> MaskRule:
    """A MaskRule from a TOML table; unknown keys are errors."""
    known = {"pattern", "port", "protocol", "name"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(known))})")
    if not isinstance(values.get("pattern"), str):
        raise ConfigError(f"{where}: pattern (a regular expression) is required")
    return MaskRule(pattern=values["pattern"], port=_port(values.get("port"), where),
                    protocol=values.get("protocol"), name=str(values.get("name", "")))


def parse_flow_rule(text: str) -> FlowRule:
    """`--flow-rule mode=mc,protocol=tcp,port=443`."""
    return flow_rule_from(parse_pairs(text, "--flow-rule"), f"--flow-rule {text!r}")


def parse_mask(text: str) -> MaskRule:
    """`--mask [PROTO/]PORT:REGEX` or `--mask REGEX` (every port)."""
    head, sep, pattern = text.partition(":")
    if sep and re.fullmatch(r"(?:[a-z]+/)?\d+", head):
        proto, _, port = head.rpartition("/")
        return mask_from({"pattern": pattern, "port": int(port), "protocol": proto or None},
                         f"--mask {text!r}")
    return mask_from({"pattern": text}, f"--mask {text!r}")
