"""Hostile captures: a corrupted gzip stream, a pcapng with an absurd if_tsoffset."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import dpkt
import pytest

from colo_proxy.drivers.pcap import PcapWriter, ReadInfo, read_frames
from colo_proxy.errors import InputError
from colo_proxy.testing.synth import TcpServerStream

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "pcaps" / "sample" / "primary.pcap"


def corrupt_gzip(tmp: Path) -> Path:
    """A 60 KB capture gzipped, with one byte of the deflate stream changed near its
    end so that zlib itself fails (not the CRC check): the first such byte is used."""
    rng = random.Random(13)
    plain = tmp / "plain.pcap"
    w = PcapWriter(plain)
    for i in range(40):
        w.write(1.0 + i / 1000, rng.randbytes(1500))
    w.close()
    raw = gzip.compress(plain.read_bytes(), mtime=0)
    for at in range(len(raw) * 3 // 4, len(raw) - 8):
        bad = bytearray(raw)
        bad[at] ^= 0x55
        try:
            gzip.decompress(bytes(bad))
        except zlib.error:
            out = tmp / "bad.pcap.gz"
            out.write_bytes(bytes(bad))
            return out
        except (OSError, EOFError):
            continue
    raise AssertionError("no corruption makes zlib fail")


def test_corrupted_gzip_is_an_input_error(tmp_path: Path) -> None:
    bad = corrupt_gzip(tmp_path)
    got = []
    with pytest.raises(InputError, match=r"bad\.pcap\.gz.*record \d+") as err:
        for item in read_frames(bad):
            got.append(item)
    assert 0 < len(got) < 40 and f"after record {len(got)}" in str(err.value)


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "colo_proxy.cli", *argv], capture_output=True, text=True,
        timeout=120, cwd=ROOT, check=False)


def test_corrupted_gzip_replay_exits_2_in_one_line(tmp_path: Path) -> None:
    bad = corrupt_gzip(tmp_path)
    res = cli("replay", str(bad), str(SAMPLE))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "bad.pcap.gz" in res.stderr


TSOFFSET = 2**62


def write_pcapng(path: Path, frames: list[tuple[float, bytes]], tsoffset: int) -> Path:
    opts = [dpkt.pcapng.PcapngOptionLE(code=dpkt.pcapng.PCAPNG_OPT_IF_TSOFFSET,
                                       data=struct.pack("<q", tsoffset)),
            dpkt.pcapng.PcapngOptionLE(code=dpkt.pcapng.PCAPNG_OPT_ENDOFOPT)]
    idb = dpkt.pcapng.InterfaceDescriptionBlockLE(snaplen=65535, opts=opts)
    with path.open("wb") as fh:
        w = dpkt.pcapng.Writer(fh, idb=idb)
        for ts, frame in frames:
            w.writepkt(frame, ts=ts)
    return path


def four_frames() -> tuple[list[tuple[float, bytes]], list[tuple[float, bytes]]]:
    """Both guests answer the handshake; then the primary sends two segments the
    secondary never matches: a compare timeout, 3 s later."""
    p, s = TcpServerStream(isn=10), TcpServerStream(isn=10)
    pri = [(1.0, p.synack()), (1.5, p.data(0, b"a" * 100)), (1.75, p.data(100, b"b" * 100))]
    sec = [(1.0005, s.synack())]
    return pri, sec


def test_absurd_tsoffset_keeps_exact_differences_and_is_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pri, _ = four_frames()
    path = write_pcapng(tmp_path / "p.pcapng", pri, TSOFFSET)
    info = ReadInfo()
    with caplog.at_level(logging.WARNING):
        got = list(read_frames(path, info))
    times = [t for t, _ in got]
    assert [b - a for a, b in itertools.pairwise(times)] == [0.5, 0.25]
    assert info.absurd_tsoffset == TSOFFSET and info.absurd_timestamps == 0
    assert "if_tsoffset" in caplog.text


@pytest.mark.timeout(120)
def test_replay_with_absurd_tsoffset_reports_timeout_not_flush(tmp_path: Path) -> None:
    """The whole command: it finishes (no spinning on a float that 3 s cannot move) and
    gives the verdict the same capture gives without the offset."""
    pri, sec = four_frames()
    verdicts = []
    for off in (0, TSOFFSET):
        p = write_pcapng(tmp_path / f"p{off}.pcapng", pri, off)
        s = write_pcapng(tmp_path / f"s{off}.pcapng", sec, off)
        res = cli("replay", str(p), str(s), "--json")
        assert res.returncode == 0, res.stderr
        rep = json.loads(res.stdout)
        verdicts.append([c["reason"] for c in rep["checkpoints"]])
    assert verdicts[0] == ["timeout"]
    assert verdicts[1] == verdicts[0]
