"""tools/lab_capture_noise.py: the workloads, and fresh recordings of real servers.

A fresh recording differs from the committed one wherever time is involved, so the
check is what the noise is: in nginx-twin every difference lies in a `Date:` value,
in bulk-real nothing differs, in tls-real the first difference is the ServerHello
random (offset 11 of each connection).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from tests.test_golden_data import lab_available, load_tool

ROOT = Path(__file__).resolve().parents[1]


def test_workloads_are_pinned_and_distinct() -> None:
    lab = load_tool("lab_capture_noise")
    ports = []
    for variant in lab.VARIANTS:
        _server, conns = lab.plan(variant)
        ports += [c.port for c in conns]
        assert variant in lab.LAG and variant in lab.DESCRIPTION
    assert len(ports) == len(set(ports))


def record(lab: ModuleType, variant: str, out: Path, attempts: int = 5) -> None:
    """One fresh recording; a recording spoilt by load (late start, tcpdump loss) is retried."""
    why = ""
    for _ in range(attempts):
        try:
            lab.capture(variant, out / variant, "o14t-")
            return
        except lab.Incomplete as exc:  # the machine, not the code: record again
            why = str(exc)
    pytest.skip(f"{variant}: {attempts} recordings spoilt by load, last: {why}")


@pytest.mark.integration
def test_fresh_recordings_show_the_same_kind_of_noise(tmp_path: Path) -> None:
    reason = lab_available("nginx", "openssl", "tshark")
    if reason is not None:
        pytest.skip(reason)
    lab = load_tool("lab_capture_noise")
    follow = load_tool("tshark_follow")
    for variant in ("nginx-twin", "bulk-real", "tls-real"):
        record(lab, variant, tmp_path)
    twin = tmp_path / "nginx-twin"
    pri = follow.guest_streams(twin / "primary.pcap", "10.77.0.1")
    sec = follow.guest_streams(twin / "secondary.pcap", "10.77.0.1")
    divs = json.loads((twin / "expected.json").read_text())["divergences"]
    assert divs and len(pri) == 3
    for key, stream in pri.items():
        for d in follow.stream_divergences(stream, sec[key]):
            start = stream.rfind(b"\r\n", 0, d["offset"]) + 2
            assert stream[start:start + 6] == b"Date: ", stream[start:d["offset"] + 8]
    assert json.loads((tmp_path / "bulk-real" / "expected.json").read_text())[
        "divergences"] == []
    tls = json.loads((tmp_path / "tls-real" / "expected.json").read_text())
    assert sorted(d["offset"] for d in tls["divergences"])[:3] == [11, 11, 11]
    assert not any(p.name.startswith("o14t-") for p in Path("/run/netns").glob("*"))
    shutil.rmtree(tmp_path, ignore_errors=True)
