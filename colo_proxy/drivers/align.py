"""Clock alignment of two captures taken on different hosts or started by hand.

Two tcpdumps started seconds apart put the same event at different times.
Replay compares in time order, so an offset at or above the compare timeout
would turn every connection into a timeout, and a smaller one shifts every
time in the report.  The best evidence is the client's input, which both
guests received: the same request (same client port and payload, or the
same payload in the same order) seen in both captures.  Without client
input, the first guest frame of each capture is a guess, applied only when
it is too large to be processing jitter.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

from colo_proxy.core.packet import PROTO_TCP, PROTO_UDP, parse_ip, parse_tcp, parse_udp

GUESS_MIN_OFFSET = 0.5
"""A first-frame estimate smaller than this is taken as jitter, not a clock offset."""
SPREAD_WARN = 0.5
"""Client requests that disagree by more than this (seconds) are worth a warning."""

RequestKey = tuple[int, int, int, bytes]
"""(protocol, client port or 0, server port, payload digest)."""


@dataclass
class SideScan:
    """What one capture shows for alignment: request times and its first guest frame."""

    first_guest: float | None = None
    by_port: dict[RequestKey, float] = field(default_factory=dict)
    by_payload: dict[RequestKey, list[float]] = field(default_factory=dict)

    def add(self, ts: float, frame: bytes, from_guest: bool) -> None:
        """Take one frame of this capture into account."""
        if from_guest:
            if self.first_guest is None:
                self.first_guest = ts
            return
        key = request_key(frame)
        if key is None:
            return
        self.by_port.setdefault(key, ts)
        self.by_payload.setdefault((key[0], 0, key[2], key[3]), []).append(ts)


@dataclass(frozen=True)
class ClockEstimate:
    """The estimated offset (secondary minus primary, seconds) and how it was found."""

    offset: float | None
    method: str
    matches: int = 0
    spread: float = 0.0


def request_key(frame: bytes) -> RequestKey | None:
    """Key of a client frame that carries payload (TCP or UDP), else None."""
    ip = parse_ip(frame, 0)
    if isinstance(ip, str) or ip.frag_id >= 0:
        return None
    if ip.proto == PROTO_TCP:
        hdr = parse_tcp(frame, ip.l4, ip.l4_end)
        if isinstance(hdr, str) or hdr.payload >= ip.l4_end:
            return None
        sport, dport, start, stop = hdr.sport, hdr.dport, hdr.payload, ip.l4_end
    elif ip.proto == PROTO_UDP:
        udp = parse_udp(frame, ip.l4, ip.l4_end)
        if isinstance(udp, str) or udp[2] >= udp[3]:
            return None
        sport, dport, start, stop = udp
    else:
        return None
    digest = hashlib.blake2b(frame[start:stop], digest_size=12).digest()
    return (ip.proto, sport, dport, digest)


def _diffs_by_port(pri: SideScan, sec: SideScan) -> list[float]:
    return [sec.by_port[k] - t for k, t in pri.by_port.items() if k in sec.by_port]


def _diffs_by_payload(pri: SideScan, sec: SideScan) -> list[float]:
    diffs: list[float] = []
    for key, times in pri.by_payload.items():
        other = sec.by_payload.get(key)
        if other:
            diffs.extend(b - a for a, b in zip(times, other, strict=False))
    return diffs


def estimate(pri: SideScan, sec: SideScan) -> ClockEstimate:
    """The offset that best lines the secondary capture up with the primary's."""
    for method, diffs in (
        ("client requests (same port and payload)", _diffs_by_port(pri, sec)),
        ("client requests (same payload, in order)", _diffs_by_payload(pri, sec)),
    ):
        if diffs:
            mid = statistics.median(diffs)
            spread = max(abs(d - mid) for d in diffs)
            return ClockEstimate(mid, method, len(diffs), spread)
    if pri.first_guest is not None and sec.first_guest is not None:
        return ClockEstimate(sec.first_guest - pri.first_guest, "first guest frame of each")
    return ClockEstimate(None, "no frames to compare")


def scan(frames: Iterable[tuple[float, bytes, bool]], limit: int) -> SideScan:
    """Scan up to `limit` (time, frame, from_guest) items of one capture."""
    side = SideScan()
    for n, (ts, frame, from_guest) in enumerate(frames):
        if n >= limit:
            break
        side.add(ts, frame, from_guest)
    return side


@dataclass(frozen=True)
class Alignment:
    """What replay applies and reports."""

    applied: float
    estimate: ClockEstimate
    warnings: tuple[str, ...]


def choose(setting: str, est: ClockEstimate, compare_timeout: float) -> Alignment:
    """Apply `--align` (auto, none or seconds) given the estimate; say what looks wrong."""
    warnings: list[str] = []
    guess = est.method == "first guest frame of each"
    if setting == "auto":
        applied = 0.0
        if est.offset is not None and (not guess or abs(est.offset) >= GUESS_MIN_OFFSET):
            applied = est.offset
            if guess:
                warnings.append(
                    f"clock offset {applied:+.3f} s guessed from the first guest frame of each "
                    "capture (no client request seen in both); give --align SECONDS if wrong"
                )
    else:
        applied = 0.0 if setting == "none" else float(setting)
        if est.offset is not None and not guess and abs(est.offset - applied) > min(
            SPREAD_WARN, compare_timeout / 2
        ):
            warnings.append(
                f"the captures look {est.offset:+.3f} s apart ({est.method}, {est.matches} "
                f"matches) but {applied:+.3f} s is applied; --align auto would apply the estimate"
            )
    if est.matches > 1 and est.spread > SPREAD_WARN:
        warnings.append(
            f"client requests disagree on the clock offset by up to {est.spread:.3f} s: "
            "the captures may not show the same workload"
        )
    return Alignment(applied, est, tuple(warnings))


def parse_align(text: str) -> str:
    """Validate an --align value: auto, none, or a number of seconds."""
    if text in ("auto", "none"):
        return text
    try:
        value = float(text)
    except ValueError as err:
        raise ValueError(f"--align: expected auto, none or seconds, got {text!r}") from err
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"--align: expected a finite number of seconds, got {text!r}")
    return text
