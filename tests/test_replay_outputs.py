"""Replay on real captures' terms: clock offsets, timers in pauses, safe output files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from colo_proxy.cli import main
from colo_proxy.drivers import align
from colo_proxy.drivers.pcap import SNAPLEN, read_frames
from colo_proxy.synth import TcpServerStream
from tests.test_cli_replay import DATA, pair, replay_json, write


def test_released_never_overwrites_an_input(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    p, s = pair(tmp_path)
    before = p.read_bytes()
    assert main(["replay", str(p), str(s), "--released", str(p)]) == 2
    assert "is an input of this run" in capsys.readouterr().err
    assert p.read_bytes() == before


def test_failed_run_leaves_an_existing_output_untouched(tmp_path: Path) -> None:
    p, _ = pair(tmp_path)
    out = tmp_path / "released.pcap"
    out.write_bytes(b"an earlier run's result")
    broken = tmp_path / "broken.pcap"
    broken.write_bytes(p.read_bytes()[:-10])  # truncated: the replay fails part way
    assert main(["replay", str(p), str(broken), "--released", str(out)]) == 2
    assert out.read_bytes() == b"an earlier run's result"
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".released")]


def test_released_capture_snaplen_covers_any_frame(tmp_path: Path) -> None:
    p, s = pair(tmp_path)
    out = tmp_path / "rel.pcap"
    assert main(["replay", str(p), str(s), "--released", str(out)]) == 0
    assert int.from_bytes(out.read_bytes()[16:20], "little") == SNAPLEN >= 65535 + 14
    assert len(list(read_frames(out))) == 5


def test_streams_out_refuses_to_overwrite_its_input_and_keeps_old_files(tmp_path: Path) -> None:
    p, _ = pair(tmp_path)
    out = tmp_path / "st"
    out.mkdir()
    (out / "index.json").write_text("old")
    broken = tmp_path / "broken.pcap"
    broken.write_bytes(p.read_bytes()[:-10])
    assert main(["streams", str(broken), "--out", str(out)]) == 2
    assert (out / "index.json").read_text() == "old"
    assert main(["streams", str(p), "--out", str(out)]) == 0
    assert json.loads((out / "index.json").read_text())[0]["bytes"] == len(DATA)


def test_timeout_in_a_long_pause_is_reported_when_due(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """60 s without traffic: the timeout is due 3 s after the unmatched frame, not at 60 s."""
    srv = TcpServerStream(isn=10)
    pri = write(tmp_path / "p.pcap", [srv.synack(), srv.data(0, b"x" * 100)], step=0.001)
    # the secondary sends its SYN-ACK, then nothing until a frame 60 s later
    sec = write(tmp_path / "s.pcap", [TcpServerStream(isn=99).synack(),
                                      TcpServerStream(isn=99).data(100, b"y")], step=60.0)
    out = tmp_path / "rel.pcap"
    rep = replay_json(capsys, str(pri), str(sec), "--align", "none", "--released", str(out))
    (div, *_) = rep["divergences"]  # type: ignore[misc]
    assert div["kind"] == "timeout" and div["time"] == pytest.approx(3.001)
    stamps = [t - 100.0 for t, _ in read_frames(out)]
    assert stamps[-1] == pytest.approx(3.001)  # released by the timeout's checkpoint, then


def test_align_auto_finds_the_offset_and_none_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    guest = TcpServerStream(isn=10)
    client = TcpServerStream(src=guest.dst, dst=guest.src, sport=40000, dport=80, isn=5)
    frames = [guest.synack(), client.data(0, b"GET / HTTP/1.1\r\n\r\n"),
              guest.data(0, DATA[:1000], 18)]
    sguest = TcpServerStream(isn=77777)
    sclient = TcpServerStream(src=guest.dst, dst=guest.src, sport=40000, dport=80, isn=9)
    sframes = [sguest.synack(), sclient.data(0, b"GET / HTTP/1.1\r\n\r\n"),
               sguest.data(0, DATA[:1000], 18)]
    p = write(tmp_path / "p.pcap", frames, t0=1000.0)
    s = write(tmp_path / "s.pcap", sframes, t0=1004.25)
    rep = replay_json(capsys, str(p), str(s), "--guest", "10.0.0.1")
    assert rep["clock_offset"] == pytest.approx(4.25)
    assert rep["clock_offset_estimate"]["method"].startswith("client requests")  # type: ignore[index]
    assert rep["divergences"] == [] and rep["warnings"] == []
    rep = replay_json(capsys, str(p), str(s), "--guest", "10.0.0.1", "--align", "none")
    assert rep["clock_offset"] == 0.0
    assert any("4.250 s apart" in w for w in rep["warnings"])  # type: ignore[union-attr]
    assert [d["kind"] for d in rep["divergences"]] == ["timeout"]  # type: ignore[union-attr]
    rep = replay_json(capsys, str(p), str(s), "--guest", "10.0.0.1", "--align", "4.25")
    assert rep["divergences"] == [] and rep["warnings"] == []


def test_align_rejects_garbage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p, s = pair(tmp_path)
    assert main(["replay", str(p), str(s), "--align", "soon"]) == 2
    assert "--align" in capsys.readouterr().err


def test_estimate_prefers_requests_and_guesses_only_large_first_frame_offsets() -> None:
    a, b = align.SideScan(first_guest=10.0), align.SideScan(first_guest=10.2)
    est = align.estimate(a, b)
    assert est.method == "first guest frame of each"
    assert align.choose("auto", est, 3.0).applied == 0.0  # jitter, not a clock offset
    b.first_guest = 13.0
    chosen = align.choose("auto", align.estimate(a, b), 3.0)
    assert chosen.applied == pytest.approx(3.0) and chosen.warnings
    key = (6, 40000, 80, b"d" * 12)
    a.by_port[key], b.by_port[key] = 11.0, 16.5
    assert align.estimate(a, b).offset == pytest.approx(5.5)
