"""`colo-proxy explain` on real-server golden pairs: bytes side by side, frames, rule."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from colo_proxy.cli import main
from colo_proxy.explain import side_by_side

PCAPS = Path(__file__).resolve().parents[1] / "pcaps"


def report_of(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
              *extra: str) -> Path:
    d = PCAPS / case
    args = json.loads((d / "expected.json").read_text())["args"]
    assert main(["replay", str(d / "primary.pcap"), str(d / "secondary.pcap"), "--json",
                 *args, *extra]) == 0
    path = tmp_path / f"{case}.json"
    path.write_text(capsys.readouterr().out)
    return path


def test_nginx_date_divergence_is_shown_at_the_date_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = report_of("nginx-date", tmp_path, capsys, "--policy", "colo")
    divs = json.loads(report.read_text())["divergences"]
    assert main(["explain", str(report), "--divergence", "1", "--color", "never"]) == 0
    out = capsys.readouterr().out
    first = divs[0]
    assert f"divergence 1 of {len(divs)}: payload at offset {first['offset']}" in out
    assert f"flow:      {first['flow']}" in out
    assert "rule:      compare: the same stream offset carries different bytes" in out
    assert "then:      checkpoint 'divergence'" in out
    # the aligned rows: the Date line on both sides, the differing second marked
    (row,) = [line for line in out.splitlines() if ":40:0" in line and " | " in line]
    left, right = row.split(" | ")
    marks = out.splitlines()[out.splitlines().index(row) + 1]
    assert set(marks.strip()) == {"^", " "} and left[-16:] != right[:16]
    assert marks.index("^") == len(left) - 16 + left[-16:].index(":40:0") + 5  # the digit
    assert re.search(r"primary   frame #\d+ +2026-\d\d-\d\d \S+ UTC +\(t=\+[\d.]+ s\)", out)
    assert re.search(r"secondary frame #\d+", out)


def test_tls_divergence_shows_hex_and_a_rate_limited_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = report_of("tls-real", tmp_path, capsys, "--policy", "colo")
    assert main(["explain", str(report), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ +\d+  ([0-9a-f]{2} ){15}[0-9a-f]{2} \| ", out, re.M)  # hex rows
    # divergences found while the checkpoint rate limit holds the next one back
    assert "(rate limit: min_checkpoint_interval = 0.1 s after the previous one)" in out


def test_every_divergence_without_number_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = report_of("nginx-twin", tmp_path, capsys, "--policy", "colo")
    assert main(["explain", str(report), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert out.count("divergence ") >= 6 and "divergence 6 of 6" in out
    assert main(["explain", str(report), "--divergence", "7"]) == 2
    assert "1..6" in capsys.readouterr().err
    assert main(["explain", str(tmp_path)]) == 2  # a directory without meta.json


def test_color_highlights_only_differing_bytes() -> None:
    rows = side_by_side(b"Date: 12:40:00 GMT", b"Date: 12:40:01 GMT", 0, 18, color=True)
    styled = [(str(t)[s.start:s.end]) for t in rows for s in t.spans if s.style]
    assert styled == ["0", "1"]
    plain = side_by_side(b"abc", b"abd", 0, 3, color=False)
    assert [" ".join(str(x).split()) for x in plain] == ["0 abc | abd", "^ ^"]
