"""Every golden case under pcaps/ replays to its expected verdicts.

Each case directory holds primary.pcap, secondary.pcap and expected.json,
written by tools/gen_golden.py (or tools/lab_capture.py for real stacks)
from what it generated, never from colo-proxy's own output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from colo_proxy.cli import main

PCAPS = Path(__file__).resolve().parents[1] / "pcaps"
CASES = sorted(p.parent.name for p in PCAPS.glob("*/expected.json"))


def test_there_are_golden_cases() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("window", ["0", "0.05"])
@pytest.mark.parametrize("case", CASES)
def test_golden_case(case: str, window: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Frame by frame, and in batches of what arrived within 50 ms (as live reads)."""
    d = PCAPS / case
    expected: dict[str, Any] = json.loads((d / "expected.json").read_text())
    argv = ["replay", str(d / "primary.pcap"), str(d / "secondary.pcap"), "--json",
            "--batch-window", window, *expected.get("args", [])]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert [(x["kind"], x["offset"]) for x in got["divergences"]] == [
        (x["kind"], x["offset"]) for x in expected["divergences"]
    ]
    assert [c["reason"] for c in got["checkpoints"]] == expected["checkpoint_reasons"]
    for key in ("primary_frames", "secondary_frames", "released_frames", "held_frames"):
        assert got[key] == expected[key], key
