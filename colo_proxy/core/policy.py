"""The hybrid COLO/MC policy: which mode each flow, and the whole VM, runs in.

Flows
-----
A new flow takes the class of the first operator rule that matches it
(compare, mc, mask, passthrough); without one it compares, with masks if a
mask rule covers its port, and a TLS or SSH connection moves to
`encrypted_flows` (mc) as soon as its first bytes show it.

Services (a guest address and port) learn from their divergences: one that
diverges `flow_divergence_limit` times within `flow_divergence_window` runs
its flows as mc for `flow_cooldown`, then is probed back to compare; a probe
that diverges again within the window doubles the cool-down (up to 8x), one
that lasts a whole cool-down resets it.  Modes change only at checkpoints,
where every flow starts clean.

The whole VM
------------
In `mode = auto` the VM moves to MC when, over `vm_window`, divergence-driven
checkpoints come faster than `vm_mc_checkpoint_rate`, or more than
`vm_mc_held_share` of the primary's frames are in mc flows, or output waits
longer on average than an MC period would make it; never when the dirty-page
rate (QEMU's calc-dirty-rate) is above `vm_max_dirty_rate`.  After
`vm_mc_min_time` in MC it probes COLO again; a probe that falls back within
two windows doubles that time.  Every switch is a ModeSwitch with its reason.

`policy = "colo"` turns all of this off (pure COLO: every flow compares,
operator rules and masks aside, and nothing is held early).
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Final, final

from colo_proxy.core.config import Config
from colo_proxy.core.events import CheckpointReason, ModeSwitch
from colo_proxy.core.flows import (
    CLASS_COMPARE,
    CLASS_MASK,
    CLASS_MC,
    CLASS_NAMES,
    CLASS_PASSTHROUGH,
    MODE_COMPARE,
    MODE_MC,
    MODE_PASSTHROUGH,
    FlowKey,
    HeldCounts,
    flow_label,
)
from colo_proxy.core.rules import CompiledMask, CompiledRule

MAX_COOLDOWN_FACTOR: Final = 8
MAX_SERVICES: Final = 4096
"""Services remembered; beyond it those not cooling down are forgotten."""
RESYNC_REASONS: Final = (CheckpointReason.DIVERGENCE, CheckpointReason.TIMEOUT)
"""Checkpoints that resynchronise a diverged secondary (the others release held output)."""

ServiceKey = tuple[int, tuple[int, ...], bytes, int]
"""(protocol, VLAN tags, guest address, guest port): what a flow's divergences teach about."""

_ENCRYPTED_MODES: Final = {"mc": MODE_MC, "passthrough": MODE_PASSTHROUGH,
                           "compare": MODE_COMPARE}


def service_of(key: FlowKey) -> ServiceKey:
    """Flows are guest output: the guest's end is the source."""
    return (key[0], key[1], key[2], key[4])


def encrypted_kind(payload: bytes) -> str | None:
    """"tls" or "ssh" when a stream's first bytes are a TLS record or an SSH banner."""
    if len(payload) >= 3 and 0x14 <= payload[0] <= 0x17 and payload[1] == 3 and payload[2] <= 4:
        return "tls"
    if payload.startswith(b"SSH-"):
        return "ssh"
    return None


@final
class Service:
    """What one service's divergences taught: its recent ones and its cool-down."""

    __slots__ = ("cooldown", "probe_at", "times", "until")

    def __init__(self, cooldown: float) -> None:
        self.times: deque[float] = deque()
        self.until = float("-inf")
        """Its flows run mc until then."""
        self.cooldown = cooldown
        self.probe_at: float | None = None
        """When it was last probed back to compare (None: not on probation)."""


@final
class FlowPolicy:
    """Classification of flows and the services' cool-downs."""

    __slots__ = ("base_cooldown", "counters", "encrypted_mode", "limit", "masks", "rules",
                 "services", "switches", "window")

    def __init__(self, cfg: Config, counters: Counter[str], switches: list[ModeSwitch]) -> None:
        pure = cfg.policy == "colo"
        self.rules = [CompiledRule(r) for r in cfg.flow_rules]
        self.masks = [CompiledMask(m) for m in cfg.masks]
        self.encrypted_mode = "compare" if pure else cfg.encrypted_flows
        self.limit = 0 if pure else cfg.flow_divergence_limit
        """0: services never move to mc."""
        self.window = cfg.flow_divergence_window
        self.base_cooldown = cfg.flow_cooldown
        self.counters = counters
        self.switches = switches
        self.services: dict[ServiceKey, Service] = {}

    def classify(self, flow: HeldCounts) -> bool:
        """Set the flow's class and masks from the rules; True when a rule decided it."""
        if not self.rules and not self.masks:  # the common case: nothing to match
            self.counters["flows_compare"] += 1
            return False
        key = flow.key
        klass = CLASS_COMPARE
        explicit = False
        for rule in self.rules:
            if rule.matches(key):
                klass = CLASS_NAMES.index(rule.mode)
                explicit = True
                break
        if klass in (CLASS_COMPARE, CLASS_MASK):
            masks = tuple(m.regex for m in self.masks if m.applies(key))
            if masks and (klass == CLASS_MASK or not explicit):
                klass = CLASS_MASK
                flow.masks = masks
        flow.klass = klass
        self.counters["flows_" + CLASS_NAMES[klass]] += 1
        return explicit

    def sniffs(self) -> bool:
        """Whether unruled TCP flows are watched for TLS/SSH first bytes."""
        return self.encrypted_mode != "compare"

    def encrypted(self, flow: HeldCounts, what: str) -> int:
        """The flow turned out TLS or SSH: its class and mode from now on."""
        counters = self.counters
        counters["flows_" + what] += 1
        mode = _ENCRYPTED_MODES[self.encrypted_mode]
        if mode != MODE_COMPARE:
            counters["flows_" + CLASS_NAMES[flow.klass]] -= 1
            flow.klass = CLASS_MC if mode == MODE_MC else CLASS_PASSTHROUGH
            counters["flows_" + CLASS_NAMES[flow.klass]] += 1
        return mode

    def mode_of(self, flow: HeldCounts, now: float, vm_mc: bool) -> int:
        """The mode a flow runs in from now (at its creation or a checkpoint)."""
        klass = flow.klass
        if klass == CLASS_PASSTHROUGH:
            return MODE_PASSTHROUGH
        if klass == CLASS_MC or vm_mc or (self.services and self._cooling(flow.key, now)):
            return MODE_MC
        return MODE_COMPARE

    def diverged(self, key: FlowKey, now: float) -> None:
        """A flow of this service diverged: count it; move the service to mc past the limit."""
        if not self.limit:
            return
        skey = service_of(key)
        svc = self.services.get(skey)
        if svc is None:
            if len(self.services) >= MAX_SERVICES:
                self._forget_calm(now)
            svc = self.services[skey] = Service(self.base_cooldown)
        if now < svc.until or not self.limit:
            return
        times = svc.times
        times.append(now)
        while times and times[0] < now - self.window:
            times.popleft()
        if svc.probe_at is not None and now - svc.probe_at <= self.window:
            svc.cooldown = min(svc.cooldown * 2, self.base_cooldown * MAX_COOLDOWN_FACTOR)
            self._to_mc(key, svc, now, "probe failed: diverged again")
        elif len(times) >= self.limit:
            self._to_mc(key, svc, now, f"{len(times)} divergences in {self.window:g} s")

    def _to_mc(self, key: FlowKey, svc: Service, now: float, why: str) -> None:
        svc.until = now + svc.cooldown
        svc.times.clear()
        svc.probe_at = None
        self.counters["service_switches_to_mc"] += 1
        self.switches.append(ModeSwitch(now, _service_label(key), "compare", "mc",
                                        f"{why}; mc for {svc.cooldown:g} s"))

    def _cooling(self, key: FlowKey, now: float) -> bool:
        svc = self.services.get(service_of(key))
        if svc is None:
            return False
        if now < svc.until:
            return True
        if svc.until != float("-inf"):  # the cool-down just ended: probe
            svc.until = float("-inf")
            svc.probe_at = now
            self.counters["service_probes"] += 1
            self.switches.append(ModeSwitch(now, _service_label(key), "mc", "compare", "probe"))
        elif svc.probe_at is not None and now - svc.probe_at >= svc.cooldown:
            svc.probe_at = None  # a probe that held for a whole cool-down: trusted again
            svc.cooldown = self.base_cooldown
        return False

    def _forget_calm(self, now: float) -> None:
        for skey in [k for k, s in self.services.items() if s.until <= now]:
            del self.services[skey]

    def cooling_services(self, now: float) -> int:
        return sum(1 for s in self.services.values() if s.until > now)


def _service_label(key: FlowKey) -> str:
    """The flow's label without the client's end: "TCP 10.0.0.1:80"."""
    label = flow_label(key)
    return label.split(" > ")[0]


@final
class VmPolicy:
    """The whole VM's mode (colo or mc), its signals, switches and time in each mode."""

    __slots__ = ("cfg", "counters", "dirty_rate", "dwell", "forced", "mode", "probe_at",
                 "resyncs", "samples", "since", "switched_at", "switches", "time_in")

    def __init__(self, cfg: Config, counters: Counter[str], switches: list[ModeSwitch]) -> None:
        self.cfg = cfg
        self.counters = counters
        self.switches = switches
        self.forced = "colo" if cfg.policy == "colo" else cfg.mode
        self.mode = "mc" if self.forced == "mc" else "colo"
        self.since: float | None = None
        """Where time_in was last brought up to date."""
        self.switched_at: float | None = None
        """When the VM last switched (the dwell before the next one counts from it)."""
        self.time_in = {"colo": 0.0, "mc": 0.0}
        self.resyncs: deque[float] = deque()
        """When divergence-driven checkpoints were asked for (within the window)."""
        self.samples: deque[tuple[float, int, int, float, int]] = deque()
        """(time, primary frames, frames held mc, latency sum, released frames) at checkpoints."""
        self.dwell = cfg.vm_mc_min_time
        self.probe_at: float | None = None
        self.dirty_rate: float | None = None
        """MB/s, from QEMU's calc-dirty-rate when the driver measures it."""

    @property
    def mc(self) -> bool:
        return self.mode == "mc"

    def start(self, now: float) -> None:
        if self.since is None:
            self.since = now

    def requested(self, reason: CheckpointReason, now: float) -> None:
        """A checkpoint request went out (the divergence-driven ones are a signal)."""
        if reason in RESYNC_REASONS:
            self.resyncs.append(now)

    def decide(
        self, now: float, frames: int, mc_frames: int, latency_sum: float, released: int
    ) -> ModeSwitch | None:
        """At a checkpoint: switch the VM's mode if the signals say so (auto only)."""
        self.start(now)
        window = self.cfg.vm_window
        samples = self.samples
        samples.append((now, frames, mc_frames, latency_sum, released))
        while len(samples) > 1 and samples[1][0] <= now - window:
            samples.popleft()
        while self.resyncs and self.resyncs[0] < now - window:
            self.resyncs.popleft()
        if self.forced != "auto":
            return None
        since = self.switched_at  # None: no switch yet, no dwell to wait out
        dirty_high = (
            self.cfg.vm_max_dirty_rate > 0 and self.dirty_rate is not None
            and self.dirty_rate > self.cfg.vm_max_dirty_rate
        )
        if self.mode == "mc":
            if dirty_high:
                return self._switch(now, "colo", f"dirty rate {self.dirty_rate:g} MB/s")
            if since is None or now - since >= self.dwell:
                self.probe_at = now
                return self._switch(now, "colo", f"probe after {self.dwell:g} s in MC")
            return None
        if self.probe_at is not None and now - self.probe_at > 2 * window:
            self.probe_at = None  # the probe held: back to the shortest dwell
            self.dwell = self.cfg.vm_mc_min_time
        if dirty_high or (since is not None and now - since < window):
            return None
        why = self._reason_for_mc(now)
        if why is None:
            return None
        if self.probe_at is not None:  # fell back within two windows of a probe
            self.dwell = min(self.dwell * 2, self.cfg.vm_mc_min_time * MAX_COOLDOWN_FACTOR)
            self.probe_at = None
        return self._switch(now, "mc", why)

    def _reason_for_mc(self, now: float) -> str | None:
        cfg = self.cfg
        span = max(now - self.samples[0][0], 1e-9)
        rate = len(self.resyncs) / cfg.vm_window
        if cfg.vm_mc_checkpoint_rate > 0 and rate > cfg.vm_mc_checkpoint_rate:
            return f"{rate:g} divergence checkpoints/s over {cfg.vm_window:g} s"
        _, f0, m0, l0, r0 = self.samples[0]
        _, f1, m1, l1, r1 = self.samples[-1]
        frames = f1 - f0
        if cfg.vm_mc_held_share > 0 and frames > 0 and (m1 - m0) / frames > cfg.vm_mc_held_share:
            return f"{(m1 - m0) / frames:.0%} of output in mc flows over {span:.3g} s"
        released = r1 - r0
        if released > 0 and (l1 - l0) / released > cfg.mc_period:
            return f"mean added latency {(l1 - l0) / released * 1000:.3g} ms > MC period"
        return None

    def _switch(self, now: float, new: str, reason: str) -> ModeSwitch:
        old = self.mode
        self.account(now)
        self.mode = new
        self.switched_at = now
        self.counters["vm_switches_to_" + new] += 1
        switch = ModeSwitch(now, "vm", old, new, reason)
        self.switches.append(switch)
        return switch

    def account(self, now: float) -> None:
        """Add the time since the last switch to the current mode."""
        if self.since is not None and now > self.since:
            self.time_in[self.mode] += now - self.since
        self.since = now
