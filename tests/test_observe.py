"""The live tap: saved divergences stay within their bound; latencies and counts are seen."""

from __future__ import annotations

import json
import time
from pathlib import Path

from scapy.all import IP, TCP, Ether

from colo_proxy.core.config import Config
from colo_proxy.core.events import Divergence, DivergenceKind, Side
from colo_proxy.core.proxy import Proxy
from colo_proxy.explain import load_cases
from colo_proxy.observe import DivergenceSaver, TapProxy

FLOW = "TCP 10.0.0.1:80 > 10.0.0.2:40000"


def seg(flags: str, seq: int, data: bytes = b"") -> bytes:
    return bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2")
                 / TCP(sport=80, dport=40000, flags=flags, seq=seq, ack=1) / data)


def div() -> Divergence:
    return Divergence(1.0, FLOW, DivergenceKind.PAYLOAD, 3, b"x", b"y")


def test_saved_pairs_are_bounded(tmp_path: Path) -> None:
    frames = [(seg("SA", 99), 0), (seg("PA", 100, b"abcdef" * 100), 0)]
    size = 2 * sum(len(f) + 16 for f, _ in frames) + 2048  # both sides, meta.json
    saver = DivergenceSaver(str(tmp_path), max_bytes=size + 10)
    saver.fed(Side.PRIMARY, frames, 0.0)
    saver.fed(Side.SECONDARY, frames, 0.0)
    saver.divergence(div())
    saver.divergence(div())  # would pass the bound: counted, not written
    assert saver.report()["saved"] == 1 and saver.report()["not_saved"] == 1
    (case,) = tmp_path.iterdir()
    meta = json.loads((case / "meta.json").read_text())
    assert meta["frames"] == {"primary": 2, "secondary": 2}
    assert load_cases(str(case))[0].divergence["offset"] == 3


def test_tap_sees_released_frames_and_checkpoints() -> None:
    seen: dict[str, list[float]] = {"lat": [], "ck": [], "req": []}

    class Obs:
        def fed(self, side: Side, frames: list[tuple[bytes, int]], now: float) -> None:
            pass

        def released(self, latencies: list[float], nbytes: int, frames: int) -> None:
            seen["lat"] += latencies

        def divergence(self, d: Divergence) -> None:
            pass

        def requested(self, reason: str) -> None:
            seen["req"].append(1.0)

        def checkpoint(self, duration: float) -> None:
            seen["ck"].append(duration)

    tap = TapProxy(Proxy(Config()), [Obs()])
    syn = seg("SA", 99)
    tap.feed_many(Side.PRIMARY, [(syn, 0)], time.monotonic())
    tap.take_output()
    tap.feed_many(Side.SECONDARY, [(syn, 0)], time.monotonic())
    tap.take_output()
    assert len(seen["lat"]) == 1 and 0 <= seen["lat"][0] < 60  # the SYN-ACK, once matched
    tap.checkpoint_started(11.0)
    tap.checkpoint_done(11.5)
    assert seen["ck"] == [0.5]
    assert tap.stats()["primary_frames"] == 1  # everything else is the real core's


def test_json_log_lines() -> None:
    import logging

    from colo_proxy.logfmt import JsonFormatter

    record = logging.LogRecord("colo_proxy.run", logging.WARNING, "x", 1, "divergence %s", ("a",),
                               None)
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "warning" and line["message"] == "divergence a"
    assert line["logger"] == "colo_proxy.run" and line["time"].endswith("Z")
