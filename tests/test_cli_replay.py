"""`colo-proxy replay` and `streams` from the command line: outputs and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from colo_proxy.cli import main
from colo_proxy.drivers.pcap import PcapWriter, read_frames
from colo_proxy.synth import CLIENT_MAC, GUEST_MAC, TcpServerStream, ipv4_frame, tcp_segment

DATA = bytes(range(256)) * 20


def write(path: Path, frames: list[bytes], t0: float = 100.0, step: float = 0.001) -> Path:
    w = PcapWriter(path)
    for i, f in enumerate(frames):
        w.write(t0 + i * step, f)
    w.close()
    return path


def pair(tmp: Path, flip: int | None = None) -> tuple[Path, Path]:
    # After a divergence the checkpoint makes the secondary a copy of the
    # primary, so its later frames carry the primary's sequence numbers:
    # different ISNs only where nothing diverges.
    p, s = TcpServerStream(isn=10), TcpServerStream(isn=10 if flip is not None else 99999)
    bad = bytearray(DATA)
    if flip is not None:
        bad[flip] ^= 1
    pri = [p.synack()] + [p.data(o, DATA[o:o + 1448]) for o in range(0, len(DATA), 1448)]
    sec = [s.synack()] + [s.data(o, bytes(bad[o:o + 700])) for o in range(0, len(DATA), 700)]
    return write(tmp / "p.pcap", pri), write(tmp / "s.pcap", sec, t0=100.0005)


def replay_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["replay", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_json_report_contract(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p, s = pair(tmp_path, flip=3000)
    rep = replay_json(capsys, str(p), str(s))
    for key in ("primary_frames", "secondary_frames", "released_frames", "released_payload_bytes",
                "held_frames", "checkpoints", "divergences", "malformed"):
        assert key in rep
    assert rep["primary_frames"] == 5 and rep["secondary_frames"] == 9
    assert rep["checkpoints"] == [{"time": pytest.approx(0.0055), "reason": "divergence"}]
    (div,) = rep["divergences"]  # type: ignore[misc]
    assert div["kind"] == "payload" and div["offset"] == 3000
    assert div["flow"] == "TCP 10.0.0.1:80 > 10.0.0.2:40000"
    assert rep["released_frames"] == 5 and rep["held_frames"] == 0
    assert rep["released_payload_bytes"] == len(DATA)


def test_summary_shows_hexdump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p, s = pair(tmp_path, flip=3000)
    assert main(["replay", str(p), str(s)]) == 0
    out = capsys.readouterr().out
    assert "payload at offset 3000" in out
    assert f"primary   {DATA[3000]:02x}" in out
    assert f"secondary {DATA[3000] ^ 1:02x}" in out


def test_released_pcap_is_stamped_with_release_time(tmp_path: Path) -> None:
    p, s = pair(tmp_path)
    out = tmp_path / "rel.pcap"
    assert main(["replay", str(p), str(s), "--released", str(out)]) == 0
    released = list(read_frames(out))
    assert [f for _, f in released] == [f for _, f in read_frames(p)]
    offered = [t for t, _ in read_frames(p)]
    assert all(rt >= ot for (rt, _), ot in zip(released, offered, strict=True))


def test_silent_secondary_times_out_in_virtual_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p, _ = pair(tmp_path)
    empty = write(tmp_path / "e.pcap", [])
    rep = replay_json(capsys, str(p), str(empty), "--compare-timeout", "1.5")
    assert [c["reason"] for c in rep["checkpoints"]] == ["timeout"]  # type: ignore[index,union-attr]
    # due 1.5 s after the first unmatched frame, reported then (not at the next scan or frame)
    assert rep["checkpoints"][0]["time"] == pytest.approx(1.5)  # type: ignore[index]
    assert rep["held_frames"] == 0 and rep["final_flush"] is False


def test_config_file_and_flag_precedence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p, _ = pair(tmp_path)
    empty = write(tmp_path / "e.pcap", [])
    cfg = tmp_path / "c.toml"
    cfg.write_text("[core]\ncompare_timeout = 0.5\n")
    rep = replay_json(capsys, str(p), str(empty), "--config", str(cfg))
    assert rep["checkpoints"][0]["time"] < 0.7  # type: ignore[index]
    rep = replay_json(capsys, str(p), str(empty), "--config", str(cfg), "--compare-timeout", "2")
    assert rep["checkpoints"][0]["time"] == pytest.approx(2.0)  # type: ignore[index]


def test_guest_filter_with_both_directions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = TcpServerStream()
    client = ipv4_frame(g.dst, g.src, 6, tcp_segment(40000, 80, 5001, 1001, 0x18, b"GET /"),
                        src_mac=CLIENT_MAC, dst_mac=GUEST_MAC)
    frames = [g.synack(), client, g.data(0, b"200 OK", ack_offset=5)]
    p = write(tmp_path / "p.pcap", frames)
    s = write(tmp_path / "s.pcap", frames)
    rep = replay_json(capsys, str(p), str(s))  # inferred: 10.0.0.1 sends the SYN-ACK
    assert rep["guest"] == "10.0.0.1" and rep["client_frames"] == 2
    assert rep["primary_frames"] == 3 and rep["primary_guest_frames"] == 2
    assert rep["divergences"] == []
    rep = replay_json(capsys, str(p), str(s), "--guest", "52:54:00:12:34:56")
    assert rep["client_frames"] == 2 and rep["released_frames"] == 2


@pytest.mark.parametrize("content", [b"", b"not a capture at all", None])
def test_bad_inputs_give_one_line_and_status_2(tmp_path: Path, content: bytes | None) -> None:
    good, _ = pair(tmp_path)
    bad = tmp_path / "bad.pcap"
    if content is not None:
        bad.write_bytes(content)
    proc = subprocess.run(
        [sys.executable, "-m", "colo_proxy.cli", "replay", str(good), str(bad)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "bad.pcap" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_truncated_capture_is_an_error(tmp_path: Path) -> None:
    good, sec = pair(tmp_path)
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(sec.read_bytes()[:-500])
    proc = subprocess.run(
        [sys.executable, "-m", "colo_proxy.cli", "replay", str(good), str(cut)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2 and "truncated" in proc.stderr


@pytest.mark.parametrize("args", [["--compare-timeout", "-1"], ["--guest", "nonsense"],
                                  ["--checkpoint-latency", "-2"], ["--batch-window", "-1"],
                                  ["--batch-window", "nan"]])
def test_bad_values_are_errors(tmp_path: Path, args: list[str],
                               capsys: pytest.CaptureFixture[str]) -> None:
    p, s = pair(tmp_path)
    assert main(["replay", str(p), str(s), *args]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("window", ["0", "0.01"])
def test_checkpoint_latency_holds_output_until_commit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], window: str
) -> None:
    p, s = pair(tmp_path, flip=10)
    out = tmp_path / "rel.pcap"
    rep = replay_json(capsys, str(p), str(s), "--checkpoint-latency", "0.25",
                      "--released", str(out), "--batch-window", window)
    t_ckpt = rep["checkpoints"][0]["time"]  # type: ignore[index]
    times = [t - 100.0 for t, _ in read_frames(out)]
    # Only the SYN-ACK precedes the divergence; the rest leave when the checkpoint commits.
    assert times[0] < t_ckpt and all(t == pytest.approx(t_ckpt + 0.25) for t in times[1:])


def test_streams_command_writes_index(tmp_path: Path) -> None:
    p, _ = pair(tmp_path)
    assert main(["streams", str(p), "--out", str(tmp_path / "st")]) == 0
    index = json.loads((tmp_path / "st" / "index.json").read_text())
    assert len(index) == 1 and index[0]["bytes"] == len(DATA)
    assert (tmp_path / "st" / index[0]["file"]).read_bytes() == DATA


def test_long_timeouts_do_not_step_through_idle_virtual_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p, _ = pair(tmp_path)
    empty = write(tmp_path / "e.pcap", [])
    rep = replay_json(capsys, str(p), str(empty), "--compare-timeout", "1e7")
    (ck,) = rep["checkpoints"]  # type: ignore[misc]
    assert ck["reason"] == "timeout" and ck["time"] == pytest.approx(1e7)
