"""Every golden case under pcaps/ replays to its expected verdicts.

Each case directory holds primary.pcap, secondary.pcap and expected.json,
written by tools/gen_golden.py, tools/lab_capture.py or
tools/lab_capture_indep.py from what they generated or recorded (tshark's
reassembly for real captures), never from colo-proxy's own output.

Cases with a `clock_offset` are independent recordings: they must also hold
with the secondary's clock shifted further (editcap -t), as two tcpdumps
started by hand would be.  The other cases model a real COLO pair, whose
secondary is reset by each checkpoint: they must hold with
`--secondary-after-checkpoint reset` as well as with the default auto.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from colo_proxy.cli import main
from colo_proxy.runtime import replay as replay_driver

PCAPS = Path(__file__).resolve().parents[1] / "pcaps"
CASES = sorted(p.parent.name for p in PCAPS.glob("*/expected.json"))
INDEPENDENT = [c for c in CASES if "clock_offset" in json.loads(
    (PCAPS / c / "expected.json").read_text())]
COLO_PAIR = [c for c in CASES if c not in INDEPENDENT]
SHIFTS = ["-60", "-5", "-2.5", "2.5", "5", "60"]


@pytest.fixture(params=[True, False], ids=["fast", "general"])
def both_paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """Run a case with the core's fast paths, then with every frame on the general path."""
    if not request.param:
        monkeypatch.setattr(replay_driver, "Replay",
                            functools.partial(replay_driver.Replay, fast_path=False))
    yield request.param


def expected_of(case: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PCAPS / case / "expected.json").read_text())
    return data


def replay(capsys: pytest.CaptureFixture[str], primary: Path, secondary: Path,
           *args: str) -> dict[str, Any]:
    if "--policy" not in args:  # the verdicts are pure comparison's (tshark's reassembly)
        args = (*args, "--policy", "colo")
    assert main(["replay", str(primary), str(secondary), "--json", *args]) == 0
    got: dict[str, Any] = json.loads(capsys.readouterr().out)
    return got


def check(got: dict[str, Any], expected: dict[str, Any], shift: float = 0.0) -> None:
    pairs = [(x["kind"], x["offset"]) for x in got["divergences"]]
    want = [(x["kind"], x["offset"]) for x in expected["divergences"]]
    if expected.get("divergence_order") == "any":
        key = (lambda kv: (kv[0], -1 if kv[1] is None else kv[1]))  # noqa: E731
        pairs, want = sorted(pairs, key=key), sorted(want, key=key)
    assert pairs == want
    assert all(x["offset"] is None or x["offset"] >= 0 for x in got["divergences"])
    if "checkpoint_reasons" in expected:
        assert [c["reason"] for c in got["checkpoints"]] == expected["checkpoint_reasons"]
    for key in ("primary_frames", "secondary_frames", "released_frames", "held_frames"):
        assert got[key] == expected[key], key
    if "clock_offset" in expected:
        tolerance = expected.get("clock_offset_tolerance", 0.05)
        assert abs(got["clock_offset"] - (expected["clock_offset"] + shift)) <= tolerance


def test_there_are_golden_cases() -> None:
    assert len(CASES) >= 20 and len(INDEPENDENT) >= 8


@pytest.mark.parametrize("window", ["0", "0.05"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.usefixtures(both_paths.__name__)
def test_golden_case(case: str, window: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Frame by frame, and in batches of what arrived within 50 ms (as live reads)."""
    d = PCAPS / case
    expected = expected_of(case)
    got = replay(capsys, d / "primary.pcap", d / "secondary.pcap", "--batch-window", window,
                 *expected.get("args", []))
    check(got, expected)


@pytest.mark.parametrize("case", COLO_PAIR)
@pytest.mark.usefixtures(both_paths.__name__)
def test_colo_pair_cases_hold_with_reset(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Captures of a real pair: forcing the reset after each checkpoint changes nothing."""
    d = PCAPS / case
    expected = expected_of(case)
    got = replay(capsys, d / "primary.pcap", d / "secondary.pcap",
                 "--secondary-after-checkpoint", "reset", *expected.get("args", []))
    check(got, expected)


@pytest.mark.skipif(shutil.which("editcap") is None, reason="editcap (tshark) not installed")
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("case", INDEPENDENT)
def test_independent_cases_hold_with_shifted_clocks(
    case: str, shift: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The secondary capture shifted by editcap -t: --align auto finds it, verdicts hold."""
    d = PCAPS / case
    expected = expected_of(case)
    shifted = tmp_path / "secondary.pcap"
    subprocess.run(["editcap", "-F", "pcap", "-t", shift, str(d / "secondary.pcap"),
                    str(shifted)], check=True, capture_output=True)
    got = replay(capsys, d / "primary.pcap", shifted, *expected.get("args", []))
    check(got, expected, float(shift))
