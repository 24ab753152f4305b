"""The hybrid policy in virtual time: flow modes, masks, cool-downs, rate limit, VM mode.

Table-driven where the cases share a shape; each test drives a real Proxy
(both the fast and the general path) with synthetic TCP/UDP traffic.
"""

from __future__ import annotations

from collections import Counter

import pytest

from colo_proxy.core.checkpoint import CheckpointPolicy, CheckpointState
from colo_proxy.core.config import Config
from colo_proxy.core.events import CheckpointReason, Side
from colo_proxy.core.masks import masked_agree
from colo_proxy.core.proxy import Proxy
from colo_proxy.core.rules import FlowRule, MaskRule, parse_flow_rule, parse_mask
from colo_proxy.errors import ConfigError
from colo_proxy.testing.synth import TcpServerStream, ipv4_frame, udp_datagram
from tests.core.harness import P, S, both_paths, make_proxy

pytestmark = pytest.mark.usefixtures(both_paths.__name__)

TLS_HELLO = b"\x16\x03\x03\x00\x40\x02\x00\x00\x3c\x03\x03"
DATE = re_date = r"\r\nDate: ([^\r\n]*)"


def http(date: str, body: bytes = b"hello") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: " + date.encode()
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class Clock:
    """Feeds frames at a virtual time and collects what the proxy says."""

    def __init__(self, config: Config) -> None:
        self.proxy = make_proxy(config)
        self.now = 0.0
        self.released: list[bytes] = []
        self.reasons: list[str] = []
        self.divergences: list[tuple[str, int | None]] = []
        self.switches: list[tuple[str, str, str]] = []
        self.in_checkpoint = False

    def feed(self, side: Side, frame: bytes, dt: float = 0.001) -> None:
        self.now += dt
        self.proxy.feed(side, frame, self.now)
        self.collect()

    def advance(self, until: float, step: float = 0.01) -> None:
        while self.now + step <= until:
            self.now += step
            self.proxy.tick(self.now)
            self.collect()

    def collect(self) -> None:
        out = self.proxy.take_output()
        self.released += [d[o:] for d, o in out.released]
        self.reasons += [r.reason.value for r in out.requests]
        self.divergences += [(d.kind.value, d.offset) for d in out.divergences]
        self.switches += [(s.scope, s.old, s.new) for s in out.switches]
        if out.requests:
            self.in_checkpoint = True

    def checkpoint(self, dt: float = 0.005) -> list[bytes]:
        """Complete the requested checkpoint; returns what it released."""
        before = len(self.released)
        self.proxy.checkpoint_started(self.now)
        self.now += dt
        self.proxy.checkpoint_done(self.now)
        self.in_checkpoint = False
        self.collect()
        return self.released[before:]


def connection(port: int, sport: int = 80, isn: int = 1000) -> tuple[TcpServerStream,
                                                                       TcpServerStream]:
    return (TcpServerStream(sport=sport, dport=port, isn=isn),
            TcpServerStream(sport=sport, dport=port, isn=isn + 99991))


def exchange(clock: Clock, port: int, pri: bytes, sec: bytes, sport: int = 80) -> list[bytes]:
    """One connection: SYN-ACKs, one response each; returns the primary's frames."""
    p, s = connection(port, sport)
    frames = [p.synack(), p.data(0, pri)]
    clock.feed(P, frames[0])
    clock.feed(S, s.synack())
    clock.feed(P, frames[1])
    clock.feed(S, s.data(0, sec))
    return frames


# -- rules and masks as values ----------------------------------------------------

@pytest.mark.parametrize(("text", "rule"), [
    ("mode=mc,protocol=tcp,port=443", FlowRule("mc", "tcp", 443)),
    ("mode=passthrough,addr=10.0.0.0/8", FlowRule("passthrough", addr="10.0.0.0/8")),
    ("mode=mask,vlan=12", FlowRule("mask", vlan=12)),
])
def test_flow_rule_flags(text: str, rule: FlowRule) -> None:
    assert parse_flow_rule(text) == rule


@pytest.mark.parametrize(("text", "error"), [
    ("protocol=tcp", "mode is required"),
    ("mode=fast", "mode must be one of"),
    ("mode=mc,port=70000", "port must be 0-65535"),
    ("mode=mc,addr=nowhere", "not an address"),
    ("mode=mc,colour=red", "unknown key"),
    ("mode=mc,protocol=sctpx", "protocol must be"),
])
def test_bad_flow_rules_are_clear_errors(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_flow_rule(text)


def test_mask_flags_and_toml() -> None:
    assert parse_mask("80:Date: (.*)") == MaskRule("Date: (.*)", 80)
    assert parse_mask("udp/53:x(..)") == MaskRule("x(..)", 53, "udp")
    assert parse_mask("ID=(\\d+)") == MaskRule("ID=(\\d+)")
    with pytest.raises(ConfigError, match="bad pattern"):
        parse_mask("80:(unclosed")
    cfg = Config.from_mapping({"masks": [{"pattern": DATE, "port": 80}],
                               "flow_rules": [{"mode": "mc", "port": 443}]})
    assert cfg.masks == (MaskRule(DATE, 80),) and cfg.flow_rules == (FlowRule("mc", port=443),)
    with pytest.raises(ConfigError, match="expected a table"):
        Config.from_mapping({"masks": ["Date"]})


@pytest.mark.parametrize(("pri", "sec", "want"), [
    (b"A\r\nDate: Mon 01\r\nB", b"A\r\nDate: Mon 02\r\nB", (18, 1, False)),  # masked
    (b"A\r\nDate: Mon 1\r\nB", b"A\r\nDate: Mon 02\r\nB", (13, 0, False)),  # length differs
    (b"A\r\nDate: Mon 01", b"A\r\nDate: Mon 02", (14, 0, True)),  # field still open: wait
    (b"A\r\nDaet: Mon 01\r\nB", b"A\r\nDaet: Mon 02\r\nB", (14, 0, False)),  # no mask there
    (b"same bytes", b"same bytes", (10, 0, False)),
])
def test_masked_agree(pri: bytes, sec: bytes, want: tuple[int, int, bool]) -> None:
    import re
    n = min(len(pri), len(sec))
    got = masked_agree(b"", bytearray(pri), bytearray(sec), n, [re.compile(DATE.encode())])
    assert got == want


# -- per-flow modes ---------------------------------------------------------------

def test_tls_flow_runs_mc_held_until_the_checkpoint() -> None:
    clock = Clock(Config(mc_period=0.05))
    frames = exchange(clock, 40001, TLS_HELLO + b"primary-random", TLS_HELLO + b"second-random",
                      sport=443)
    assert clock.divergences == []
    assert clock.released == frames[:1]  # the SYN-ACK matched; the TLS bytes are held
    clock.advance(0.2)
    assert clock.reasons == ["mc_period"]
    assert clock.checkpoint() == frames[1:]
    assert clock.proxy.counters["flows_tls"] == 1
    assert clock.proxy.policy_report()["flows_by_mode"] == {"mc": 1}


def test_tls_compared_when_told_to() -> None:
    clock = Clock(Config(encrypted_flows="compare"))
    exchange(clock, 40001, TLS_HELLO + b"primary-random", TLS_HELLO + b"second-random",
             sport=443)
    assert clock.divergences == [("payload", len(TLS_HELLO))]


def test_passthrough_rule_releases_at_once_and_is_counted() -> None:
    clock = Clock(Config(flow_rules=(FlowRule("passthrough", port=8080),)))
    frames = exchange(clock, 40001, b"one answer", b"another one", sport=8080)
    assert clock.released == frames and clock.divergences == []
    assert clock.proxy.counters["frames_passthrough"] == 2
    assert clock.proxy.counters["secondary_frames_dropped_uncompared_mode"] == 2


def test_first_matching_rule_wins() -> None:
    rules = (FlowRule("compare", port=80), FlowRule("passthrough"))
    clock = Clock(Config(flow_rules=rules))
    exchange(clock, 40001, b"answer A", b"answer B")
    assert clock.divergences == [("payload", 7)]


def test_mask_hides_a_same_length_date_only() -> None:
    clock = Clock(Config(masks=(MaskRule(DATE, 80),)))
    frames = exchange(clock, 40001, http("Mon, 01 Dec 2026 10:00:01 GMT"),
                      http("Mon, 01 Dec 2026 10:00:02 GMT"))
    assert clock.divergences == [] and clock.released == frames
    assert clock.proxy.counters["masked_bytes"] == len("1 GMT")  # first difference to field end
    exchange(clock, 40002, http("Mon, 01 Dec 2026 10:00:01 GMT"),
             http("Mon, 01 Dec 2026 10:00:1 GMT"))
    assert clock.divergences == [("payload", 61)]


def test_mask_waits_for_a_field_split_across_segments() -> None:
    clock = Clock(Config(masks=(MaskRule(DATE, 80),)))
    p, s = connection(40001)
    a, b = http("Mon 01"), http("Mon 02")
    cut = a.index(b"Mon") + 5
    for side, frame in [(P, p.synack()), (S, s.synack()), (P, p.data(0, a[:cut])),
                        (S, s.data(0, b[:cut])), (P, p.data(cut, a[cut:])),
                        (S, s.data(cut, b[cut:]))]:
        clock.feed(side, frame)
    assert clock.divergences == []
    assert len(clock.released) == 3


def test_udp_mask_and_mc_rule() -> None:
    src, dst = bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2))
    clock = Clock(Config(masks=(MaskRule("t=(\\d+)", 53, "udp"),),
                         flow_rules=(FlowRule("mc", "udp", 5000),)))
    p1 = ipv4_frame(src, dst, 17, udp_datagram(53, 999, b"ok t=1234"))
    clock.feed(P, p1)
    clock.feed(S, ipv4_frame(src, dst, 17, udp_datagram(53, 999, b"ok t=5678")))
    assert clock.released == [p1] and clock.divergences == []
    p2 = ipv4_frame(src, dst, 17, udp_datagram(5000, 999, b"mc one"))
    clock.feed(P, p2)
    clock.feed(S, ipv4_frame(src, dst, 17, udp_datagram(5000, 999, b"mc two")))
    assert clock.released == [p1]
    clock.advance(0.5)
    assert clock.reasons == ["mc_period"] and clock.checkpoint() == [p2]


# -- services: storms, cool-downs, probes, hysteresis -----------------------------

def storm(clock: Clock, first_port: int, n: int) -> None:
    for i in range(n):
        exchange(clock, first_port + i, b"x-" + str(i).encode() + b"-P",
                 b"x-" + str(i).encode() + b"-S")
        if clock.in_checkpoint:
            clock.checkpoint()


def test_a_storm_moves_the_service_to_mc_then_a_probe_brings_it_back() -> None:
    clock = Clock(Config(flow_divergence_limit=3, flow_divergence_window=10.0,
                         flow_cooldown=5.0, min_checkpoint_interval=0.0, mode="colo"))
    storm(clock, 41000, 3)
    assert len(clock.divergences) == 3
    assert clock.switches == [("TCP 10.0.0.1:80", "compare", "mc")]
    storm(clock, 41100, 4)  # in the cool-down: no more divergences, output waits for checkpoints
    assert len(clock.divergences) == 3
    clock.advance(clock.now + 6.0)
    clock.checkpoint()
    exchange(clock, 41200, b"same", b"same")  # after the cool-down: probed back to compare
    assert ("TCP 10.0.0.1:80", "mc", "compare") in clock.switches
    storm(clock, 41300, 1)  # diverges again within the window: cool-down doubles
    assert clock.switches[-1] == ("TCP 10.0.0.1:80", "compare", "mc")
    svc = next(iter(clock.proxy.flow_policy.services.values()))
    assert svc.cooldown == 10.0


def test_other_services_keep_comparing_during_a_cool_down() -> None:
    clock = Clock(Config(flow_divergence_limit=2, min_checkpoint_interval=0.0))
    storm(clock, 41000, 2)
    exchange(clock, 42000, b"A", b"B", sport=8080)
    assert clock.divergences[-1] == ("payload", 0)


def test_pure_colo_never_moves_a_service() -> None:
    clock = Clock(Config(policy="colo", flow_divergence_limit=1, min_checkpoint_interval=0.0))
    storm(clock, 41000, 5)
    assert len(clock.divergences) == 5 and clock.switches == []


# -- rate limit and early notice --------------------------------------------------

@pytest.mark.parametrize(("burst", "interval", "times", "sent"), [
    (1, 1.0, [0.0, 0.1, 0.2], [0.0]),
    (2, 1.0, [0.0, 0.1, 0.2], [0.0, 0.1]),
    (3, 0.5, [0.0, 0.0, 0.0, 0.1, 0.9], [0.0, 0.0, 0.0, 0.9]),  # 0.1 deferred, sent at 0.9
    (1, 0.0, [0.0, 0.1, 0.2], [0.0, 0.1, 0.2]),
])
def test_token_bucket(burst: int, interval: float, times: list[float], sent: list[float]) -> None:
    """Each request is completed at once; the ones the bucket refuses are deferred."""
    policy = CheckpointPolicy(interval, Counter(), burst)
    out = []
    for t in times:
        policy.tick(t)
        policy.want(CheckpointReason.DIVERGENCE, t)
        for req in policy.take():
            out.append(req.time)
            policy.started()
            policy.done(t)
    assert out == sent


def test_rate_limit_holds_over_a_storm() -> None:
    """However many divergences, checkpoints stay within burst + duration / interval."""
    clock = Clock(Config(min_checkpoint_interval=0.5, checkpoint_burst=2, policy="colo"))
    for i in range(60):
        exchange(clock, 43000 + i, b"P" * 10, b"S" * 10)
        clock.advance(clock.now + 0.05)
        if clock.in_checkpoint:
            clock.checkpoint(0.0)
    duration = clock.now
    assert len(clock.reasons) <= 2 + duration / 0.5
    assert len(clock.reasons) >= duration / 0.5 - 1


def test_early_notice_holds_everything_until_the_checkpoint() -> None:
    clock = Clock(Config(min_checkpoint_interval=1.0, flow_divergence_limit=99))
    exchange(clock, 44000, b"A", b"B")  # diverges: the checkpoint goes out at once
    clock.checkpoint()
    exchange(clock, 44001, b"C", b"D")  # diverges again, inside the rate limit
    assert clock.proxy.state is CheckpointState.DEFERRED
    assert clock.proxy.secondary_paused
    before = len(clock.released)
    frames = exchange(clock, 44002, b"same", b"same")
    assert len(clock.released) == before  # equal output waits too: nothing is compared
    assert clock.proxy.counters["early_notices"] == 1
    clock.advance(clock.now + 1.1)
    assert clock.reasons[-1] == "divergence"
    released = clock.checkpoint()
    assert frames[0] in released and frames[1] in released
    assert not clock.proxy.secondary_paused
    exchange(clock, 44003, b"again", b"again")
    assert clock.released[-2:] == [clock.released[-2], clock.released[-1]]
    assert clock.divergences[-1] == ("payload", 0)  # the second divergence only


def test_a_refused_checkpoint_releases_nothing() -> None:
    """A checkpoint the driver could not carry out (QMP refused it) never completes:
    mc output stays held, however long, and the request is not forgotten."""
    clock = Clock(Config(mode="mc", mc_period=0.05))
    frames = exchange(clock, 45000, b"same", b"same")
    clock.advance(5.0)
    assert clock.reasons == ["mc_period"] and clock.proxy.state is CheckpointState.REQUESTED
    assert not any(f in clock.released for f in frames)
    assert clock.proxy.held_frames() == 2


# -- the whole VM -----------------------------------------------------------------

def test_forced_mc_holds_every_flow_until_periodic_checkpoints() -> None:
    clock = Clock(Config(mode="mc", mc_period=0.1))
    frames = exchange(clock, 46000, b"same", b"same")
    assert clock.released == [] and clock.divergences == []
    clock.advance(0.3)
    assert clock.reasons == ["mc_period"]
    assert clock.checkpoint() == frames
    clock.advance(clock.now + 100.0)
    assert clock.switches == []  # forced: never switches


def vm_storm(clock: Clock, n: int, first_port: int) -> None:
    for i in range(n):
        exchange(clock, first_port + i, b"P%d" % i, b"S%d" % i)
        clock.advance(clock.now + 0.1)
        if clock.in_checkpoint:
            clock.checkpoint()


def test_vm_switches_to_mc_on_a_divergence_rate_and_probes_back() -> None:
    cfg = Config(vm_window=1.0, vm_mc_checkpoint_rate=3.0, vm_mc_min_time=2.0,
                 flow_divergence_limit=999, min_checkpoint_interval=0.0)
    clock = Clock(cfg)
    vm_storm(clock, 20, 47000)
    assert ("vm", "colo", "mc") in clock.switches
    assert clock.proxy.vm.mode == "mc"
    n_div = len(clock.divergences)
    exchange(clock, 47100, b"P", b"S")  # in MC: not compared
    assert len(clock.divergences) == n_div
    clock.advance(clock.now + 2.5)
    clock.checkpoint()
    assert clock.switches[-1] == ("vm", "mc", "colo")
    vm_storm(clock, 20, 47200)  # the probe fails: back to MC, and the next dwell doubles
    assert clock.switches[-1] == ("vm", "colo", "mc")
    assert clock.proxy.vm.dwell == 4.0
    report = clock.proxy.policy_report()
    assert report["vm_mode"] == "mc"
    mode_time = report["mode_time"]
    assert isinstance(mode_time, dict) and mode_time["mc"] > 2.0 and mode_time["colo"] > 0


def test_a_high_dirty_rate_keeps_the_vm_in_colo() -> None:
    cfg = Config(vm_window=1.0, vm_mc_checkpoint_rate=3.0, flow_divergence_limit=999,
                 min_checkpoint_interval=0.0, vm_max_dirty_rate=100.0)
    clock = Clock(cfg)
    clock.proxy.observe_dirty_rate(500.0)
    vm_storm(clock, 20, 48000)
    assert clock.switches == [] and clock.proxy.vm.mode == "colo"


def test_policy_costs_nothing_when_everything_matches() -> None:
    """The default policy on deterministic traffic: compare only, no switch, no holds left."""
    proxy = Proxy(Config())
    p, s = connection(49000)
    proxy.feed(P, p.synack(), 0.0)
    proxy.feed(S, s.synack(), 0.0)
    for i in range(50):
        proxy.feed(P, p.data(i * 100, bytes(100)), 0.01 * i)
        proxy.feed(S, s.data(i * 100, bytes(100)), 0.01 * i)
    out = proxy.take_output()
    assert len(out.released) == 51 and out.switches == [] and out.requests == []
    assert proxy.policy_report()["flows_by_mode"] == {"compare": 1}
