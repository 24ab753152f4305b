"""The policy's settings are the same for replay, run and bridge: flags and TOML."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from colo_proxy.cli import main

PCAPS = Path(__file__).resolve().parents[1] / "pcaps"
CASE = PCAPS / "nginx-date"


def test_toml_rules_and_masks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "policy.toml"
    cfg.write_text(
        'mode = "colo"\n'
        "[[flow_rules]]\nmode = \"passthrough\"\nport = 9999\n"
        "[[masks]]\npattern = '\\r\\nDate: ([^\\r\\n]*)'\nport = 80\n"
    )
    args = ["replay", str(CASE / "primary.pcap"), str(CASE / "secondary.pcap"), "--json",
            "--config", str(cfg)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["divergences"] == [] and report["policy"]["masked_bytes"] > 0
    assert report["policy"]["forced"] == "colo"


def test_flag_rules_come_before_the_files(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "policy.toml"
    cfg.write_text("[[flow_rules]]\nmode = \"compare\"\nport = 80\n")
    args = ["replay", str(CASE / "primary.pcap"), str(CASE / "secondary.pcap"), "--json",
            "--config", str(cfg), "--flow-rule", "mode=passthrough,port=80"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["divergences"] == [] and report["policy"]["frames_passthrough"] > 0
    assert any("unprotected" in w for w in report["warnings"])


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--flow-rule", "mode=fast", "mode must be one of"),
    ("--mask", "80:(unclosed", "bad pattern"),
    ("--mode", "sometimes", "invalid choice"),
])
def test_bad_policy_flags_are_one_line_errors(flag: str, value: str, message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "colo_proxy.cli", "replay", str(CASE / "primary.pcap"),
         str(CASE / "secondary.pcap"), flag, value], capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr


def test_bad_toml_rule_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "policy.toml"
    cfg.write_text("[[flow_rules]]\nport = 80\n")
    args = ["replay", str(CASE / "primary.pcap"), str(CASE / "secondary.pcap"),
            "--config", str(cfg)]
    assert main(args) == 2
    assert "mode is required" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["replay", "run", "bridge"])
def test_every_command_takes_the_policy_flags(command: str) -> None:
    out = subprocess.run([sys.executable, "-m", "colo_proxy.cli", command, "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--flow-rule", "--mask", "--mode", "--checkpoint-burst", "--mc-period",
                 "--encrypted-flows", "--policy"):
        assert flag in out, (command, flag)
