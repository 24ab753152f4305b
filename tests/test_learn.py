"""`colo-proxy learn` on real-server golden pairs recorded on identical instances."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from colo_proxy import learn
from colo_proxy.cli import main

PCAPS = Path(__file__).resolve().parents[1] / "pcaps"
DATE_MASK = {"pattern": r"\r\nDate: ([^\r\n]*)", "port": 80, "protocol": "tcp"}


def learned(tmp_path: Path, capsys: pytest.CaptureFixture[str], *cases: str) -> dict[str, Any]:
    out = tmp_path / "learned.toml"
    assert main(["learn", *(str(PCAPS / c) for c in cases), "--out", str(out)]) == 0
    capsys.readouterr()
    return tomllib.loads(out.read_text()) | {"_text": out.read_text(), "_path": out}


def replay_divergences(case: str, config: Path, capsys: pytest.CaptureFixture[str]) -> int:
    d = PCAPS / case
    assert main(["replay", str(d / "primary.pcap"), str(d / "secondary.pcap"), "--json",
                 "--guest", "10.77.0.1", "--config", str(config)]) == 0
    return len(json.loads(capsys.readouterr().out)["divergences"])


def test_twin_nginx_gives_the_date_mask_and_it_removes_every_divergence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    got = learned(tmp_path, capsys, "nginx-twin")
    assert got["masks"] == [DATE_MASK]
    assert "flow_rules" not in got
    assert "6 of 6 occurrences differ" in got["_text"]
    assert "removes 6 of 6 divergences" in got["_text"]
    # applied by replay (issue 11's masks in the core): nothing diverges any more
    assert replay_divergences("nginx-twin", got["_path"], capsys) == 0


def test_date_mask_from_two_pairs_counts_both(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    got = learned(tmp_path, capsys, "nginx-twin", "nginx-date")
    assert got["masks"] == [DATE_MASK]
    assert "11 of 14 occurrences differ (5 flows, 2 pairs)" in got["_text"]
    assert replay_divergences("nginx-date", got["_path"], capsys) == 0


def test_deterministic_bulk_transfer_gives_nothing(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    got = learned(tmp_path, capsys, "bulk-real")
    assert set(got) == {"_text", "_path"}
    assert "nothing to propose" in got["_text"]


def test_tls_gets_an_mc_rule_not_a_mask(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    got = learned(tmp_path, capsys, "tls-real")
    assert "masks" not in got
    assert got["flow_rules"] == [{"mode": "mc", "protocol": "tcp", "port": 443}]
    assert "54 divergences" in got["_text"]


def test_field_patterns() -> None:
    a = b"HTTP/1.1 200 OK\r\nDate: Thu, 03 Dec 2026 12:40:00 GMT\r\nServer: x\r\n"
    b = a.replace(b"12:40:00", b"12:40:01")
    ((s, e),) = learn.runs(a, b)
    assert learn.field_pattern(a, b, s, e) == r"\r\nDate: ([^\r\n]*)"
    longer = a.replace(b"GMT", b"GMT+1")
    b2 = longer.replace(b"12:40:00", b"12:40:01")
    assert learn.field_pattern(a, b2, s, e) is None  # the line's length changed
    ra, rb = b"*2\r\n$10\r\n1796301614\r\n", b"*2\r\n$10\r\n1796301616\r\n"
    ((s, e),) = learn.runs(ra, rb)
    assert learn.field_pattern(ra, rb, s, e) == r"\n\$10\r\n([0-9]{10})"
    assert learn.esc(b"a.b\x00") == r"a\.b\x00"
