"""tools/check_streams.py matching and explanations, without tshark."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tools_loader import load_tool

REPO = Path(__file__).resolve().parents[1]


cs = load_tool("check_streams")
K1 = ("10.0.0.1", 1000, "10.0.0.2", 80)
K2 = ("10.0.0.2", 80, "10.0.0.1", 1000)


def d(key: tuple[str, int, str, int], data: bytes, gaps: list[tuple[int, int]] | None = None,
      ) -> object:
    return cs.Direction(key, data, gaps or [], "t")


@pytest.mark.parametrize(("a", "b", "expected"), [
    (b"", b"", None), (b"abc", b"abc", None), (b"abc", b"abd", 2), (b"abc", b"ab", 2),
    (b"", b"x", 0), (bytes(1000) + b"x", bytes(1001), 1000),
])
def test_first_difference(a: bytes, b: bytes, expected: int | None) -> None:
    assert cs.first_difference(a, b) == expected


def test_matches_by_key_and_occurrence() -> None:
    rows = cs.compare(
        [d(K1, b"one"), d(K2, b"reply"), d(K1, b"two")],
        [d(K2, b"reply"), d(K1, b"one"), d(K1, b"twX"), d(K1, b"three")],
    )
    got = [(r.key, r.occurrence, r.status, r.first_diff) for r in rows]
    assert got == [
        (K1, 0, "equal", None), (K1, 1, "differ", 2), (K1, 2, "missing-ours", None),
        (K2, 0, "equal", None),
    ]
    assert [r.name for r in rows][:2] == ["10.0.0.1:1000>10.0.0.2:80#0",
                                          "10.0.0.1:1000>10.0.0.2:80#1"]


def test_empty_directions_are_not_matched() -> None:
    rows = cs.compare([d(K1, b"x")], [d(K2, b""), d(K1, b"x")])
    assert [r.status for r in rows] == ["equal"]


def test_unacked_hole_needs_our_gap_exactly_where_the_oracle_stops() -> None:
    ours = d(K1, b"abcdef", [(3, 10)])
    assert cs.compare([ours], [d(K1, b"abc")])[0].explanation == "unacked-hole"
    assert cs.compare([ours], [d(K1, b"ab")])[0].explanation is None
    assert cs.compare([ours], [d(K1, b"abX")])[0].explanation is None
    assert cs.compare([d(K1, b"abcdef")], [d(K1, b"abc")])[0].explanation is None


def test_direction_the_oracle_leaves_empty() -> None:
    lead_gap = d(K1, b"data", [(0, 79)])
    row = cs.compare([lead_gap], [d(K1, b"")])[0]
    assert (row.status, row.explanation) == ("missing-oracle", "unacked-hole")
    assert cs.compare([lead_gap], [])[0].explanation is None
    assert cs.compare([d(K1, b"data")], [d(K1, b"")])[0].explanation is None


def test_allowlist_by_row_name_and_wildcard() -> None:
    name = "10.0.0.1:1000>10.0.0.2:80#0"
    assert cs.compare([d(K1, b"a")], [d(K1, b"b")], {name: "why"})[0].explanation == "why"
    assert cs.compare([d(K1, b"a")], [d(K1, b"b")], {"*": "any"})[0].explanation == "any"
    assert cs.compare([d(K1, b"a")], [d(K1, b"b")], {"x#0": "no"})[0].explanation is None


def test_ipv6_names_and_normalisation() -> None:
    assert cs._split_node("[2001:db8:0::1]:443") == ("2001:db8::1", 443)
    assert cs._split_node("10.0.0.1:80") == ("10.0.0.1", 80)
    row = cs.compare([d(("2001:db8::1", 1, "2001:db8::2", 2), b"a")], [])[0]
    assert row.name == "[2001:db8::1]:1>[2001:db8::2]:2#0"
