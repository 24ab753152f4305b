"""Careless users: one-line errors (exit 2) instead of tracebacks, one size syntax,
one config file for every command."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from colo_proxy.config_args import config_from_args, parse_size
from colo_proxy.errors import ConfigError
from colo_proxy.runtime import bridge_cli, run_cli

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "pcaps" / "sample"


def cli(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", "import sys; from colo_proxy.cli import main; sys.exit(main())",
         *argv], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if " INFO " not in ln]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    return img


def agent(image: Path, tmp_path: Path, *extra: str, nbd: str = "", qmp: str = "") -> list[str]:
    return ["disk-agent", "--image", str(image), "--nbd", nbd or f"unix:{tmp_path}/n.sock",
            "--qmp", qmp or f"unix:{tmp_path}/q.sock", *extra]


def test_disk_agent_socket_in_missing_directory(image: Path, tmp_path: Path) -> None:
    line = one_line_error(cli(*agent(image, tmp_path, nbd=f"unix:{tmp_path}/no/such/n.sock")))
    assert "no/such/n.sock" in line


def test_disk_agent_bad_log_level(image: Path, tmp_path: Path) -> None:
    res = cli(*agent(image, tmp_path, "--log-level", "verbose"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "verbose" in res.stderr


def test_disk_agent_unresolvable_address(image: Path, tmp_path: Path) -> None:
    line = one_line_error(cli(*agent(image, tmp_path, nbd="tcp:no-such-host.invalid:10809")))
    assert "no-such-host.invalid" in line


def test_disk_agent_unusable_state_dir(image: Path, tmp_path: Path) -> None:
    line = one_line_error(cli(*agent(image, tmp_path, "--state-dir", "/proc/hd13-no")))
    assert "/proc/hd13-no" in line


def test_disk_agent_refuses_qcow2(tmp_path: Path) -> None:
    img = tmp_path / "disk.qcow2"
    # A qcow2 header: magic, version 3, then zeros (what qemu-img writes first).
    img.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(1 << 16))
    line = one_line_error(cli(*agent(img, tmp_path)))
    assert "qcow2" in line


def test_run_socket_in_missing_directory(tmp_path: Path) -> None:
    res = cli("run", "--primary-in", f"unix:{tmp_path}/no/p.sock,server",
              "--secondary-in", f"unix:{tmp_path}/s.sock,server",
              "--outdev", f"unix:{tmp_path}/o.sock,server", timeout=30)
    line = one_line_error(res)
    assert "no/p.sock" in line


def test_replay_bad_config_path() -> None:
    line = one_line_error(cli("replay", str(SAMPLE / "primary.pcap"),
                              str(SAMPLE / "secondary.pcap"), "--config", "/no/such/file.toml"))
    assert "/no/such/file.toml" in line


# -- one size syntax ----------------------------------------------------------------

@pytest.mark.parametrize("text,value", [("64M", 64 << 20), ("512k", 512 << 10), ("2GiB", 2 << 30),
                                        ("1000", 1000), ("4MB", 4 << 20)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def run_parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    run_cli.add_parser(sub)
    bridge_cli.add_parser(sub)
    return parser.parse_args(argv)


def test_every_byte_flag_takes_a_size() -> None:
    args = run_parse(["run", "--max-hold-bytes", "64M", "--max-fragment-bytes", "1M",
                      "--outdev-buffer", "32M"])
    assert config_from_args(args).max_hold_bytes == 64 << 20
    assert run_cli.run_values(args)["outdev_buffer"] == 32 << 20
    args = run_parse(["bridge", "--output-buffer", "8M", "--ring-block-size", "1M"])
    values = run_cli.section_values(args, "bridge", bridge_cli.BRIDGE_KEYS)
    assert values["output_buffer"] == 8 << 20 and values["ring_block_size"] == 1 << 20


def test_replay_accepts_size_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from colo_proxy.cli import main

    assert main(["replay", str(SAMPLE / "primary.pcap"), str(SAMPLE / "secondary.pcap"),
                 "--max-hold-bytes", "64M"]) == 0


def test_sizes_in_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('max_hold_bytes = "64M"\n[run]\noutdev_buffer = "1M"\n')
    args = run_parse(["run", "--config", str(cfg)])
    assert config_from_args(args).max_hold_bytes == 64 << 20
    assert run_cli.run_values(args)["outdev_buffer"] == 1 << 20


# -- one config file ------------------------------------------------------------------

def test_top_level_and_core_table_both_honoured(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("compare_timeout = 1.5\n[core]\nmax_flows = 100\n")
    config = config_from_args(run_parse(["run", "--config", str(cfg)]))
    assert config.compare_timeout == 1.5 and config.max_flows == 100


@pytest.mark.parametrize("toml", [
    "compare_timout = 1.5\n[core]\nmax_flows = 100\n",      # typo at top level beside [core]
    "[core]\nmax_flow = 100\n",
    "[bridge]\nclient_iff = 'a'\n",                           # typo in another command's table
    "[brigde]\nclient_if = 'a'\n",                            # unknown table
])
def test_unknown_keys_always_an_error(tmp_path: Path, toml: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    for argv in (["run", "--config", str(cfg)], ["bridge", "--config", str(cfg)]):
        with pytest.raises(ConfigError):
            config_from_args(run_parse(argv))


SHARED = """
compare_timeout = 2.0
qmp = "unix:/tmp/hd13-none-qmp.sock"

[core]
max_flows = 1000

[run]
primary_in = "unix:/tmp/hd13-p.sock,server"
secondary_in = "unix:/tmp/hd13-s.sock,server"
outdev = "unix:/tmp/hd13-o.sock,server"

[bridge]
client_if = "hd13c"
primary_if = "hd13p"
secondary_if = "hd13s"
"""


def test_one_file_for_replay_run_and_bridge(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from colo_proxy.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(SHARED)
    assert main(["replay", str(SAMPLE / "primary.pcap"), str(SAMPLE / "secondary.pcap"),
                 "--config", str(cfg)]) == 0
    args = run_parse(["run", "--config", str(cfg)])
    settings = run_cli.settings_from_values(run_cli.run_values(args))
    config = config_from_args(args)
    assert settings.outdev.server and config.max_flows == 1000 and config.compare_timeout == 2.0
    args = run_parse(["bridge", "--config", str(cfg)])
    values = run_cli.section_values(args, "bridge", bridge_cli.BRIDGE_KEYS)
    assert values["client_if"] == "hd13c" and values["qmp"] == "unix:/tmp/hd13-none-qmp.sock"
    assert config_from_args(args).max_flows == 1000
