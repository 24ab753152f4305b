"""`colo-proxy run` flags and their TOML equivalents."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from colo_proxy.config_args import config_from_args
from colo_proxy.drivers.endpoints import Transport
from colo_proxy.drivers.qmp import FollowPolicy
from colo_proxy.errors import ConfigError
from colo_proxy.runtime import run_cli
from colo_proxy.runtime.supervisor import ShutdownMode


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    run_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["run", *argv])


def settings_and_config(argv: list[str]) -> tuple[object, object]:
    args = parse(argv)
    settings = run_cli.settings_from_values(run_cli.run_values(args))
    config = config_from_args(args, extra_keys=frozenset(run_cli.RUN_KEYS) | {"run"})
    return settings, config


FLAGS = [
    "--primary-in", "unix:/tmp/p.sock,server",
    "--secondary-in", "tcp:127.0.0.1:9001,server=on,wait=off",
    "--outdev", "unix:/tmp/o.sock",
    "--notify-dev", "unix:/tmp/n.sock,server",
    "--vnet-hdr", "on",
    "--qmp", "unix:/tmp/qmp.sock",
    "--qmp-follow", "always",
    "--on-shutdown", "flush",
    "--compare-timeout", "2.5",
    "--max-hold-flows", "100",
]  # fmt: skip

TOML = """
[run]
primary_in = "unix:/tmp/p.sock,server"
secondary_in = "tcp:127.0.0.1:9001,server=on,wait=off"
outdev = "unix:/tmp/o.sock"
notify_dev = "unix:/tmp/n.sock,server"
vnet_hdr = true
qmp = "unix:/tmp/qmp.sock"
qmp_follow = "always"
on_shutdown = "flush"

[core]
compare_timeout = 2.5
max_hold_flows = 100
"""


def test_flags_and_toml_are_equivalent(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(TOML)
    from_flags = settings_and_config(FLAGS)
    from_file = settings_and_config(["--config", str(cfg)])
    assert from_flags == from_file
    settings, config = from_flags
    assert settings.secondary_in.transport is Transport.TCP  # type: ignore[attr-defined]
    assert settings.vnet_hdr and settings.qmp_follow is FollowPolicy.ALWAYS  # type: ignore[attr-defined]
    assert settings.on_shutdown is ShutdownMode.FLUSH  # type: ignore[attr-defined]
    assert config.compare_timeout == 2.5  # type: ignore[attr-defined]


def test_flags_override_file_and_top_level_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'primary_in = "unix:/a,server"\nsecondary_in = "unix:/b,server"\n'
        'outdev = "unix:/c,server"\ncompare_timeout = 1\n'
    )
    settings, config = settings_and_config(["--config", str(cfg), "--outdev", "unix:/d"])
    assert settings.outdev.address == "/d" and not settings.outdev.server  # type: ignore[attr-defined]
    assert config.compare_timeout == 1.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "toml",
    [
        '[run]\nprimary_inn = "unix:/a"\n',
        '[run]\nvnet_hdr = "maybe"\n',
        '[run]\noutdev_buffer = "big"\n',
        "[run\n",
    ],
)
def test_bad_files_are_config_errors(tmp_path: Path, toml: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError):
        run_cli.run_values(parse(["--config", str(cfg)]))


def test_missing_endpoints_named() -> None:
    with pytest.raises(ConfigError, match="--secondary-in, --outdev"):
        run_cli.settings_from_values(run_cli.run_values(parse(["--primary-in", "unix:/a"])))


@pytest.mark.parametrize("command", ["run", "bridge"])
def test_every_setting_is_a_field_a_key_and_a_flag(command: str) -> None:
    """Keys come from the settings dataclasses; each has exactly one flag, and no flag is extra."""
    from dataclasses import fields

    from colo_proxy.config_args import add_config_flags
    from colo_proxy.runtime import bridge_cli
    from colo_proxy.runtime.bridge import BridgeSettings
    from colo_proxy.runtime.supervisor import RunSettings

    module, settings, keys = (
        (run_cli, RunSettings, run_cli.RUN_KEYS) if command == "run"
        else (bridge_cli, BridgeSettings, bridge_cli.BRIDGE_KEYS)
    )
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers(dest="command"))
    core = argparse.ArgumentParser()
    add_config_flags(core)
    flags = set(vars(parser.parse_args([command]))) - set(vars(core.parse_args([])))
    assert flags - {"command", "func"} == set(keys)
    flattened = {k.split("_")[0] for k in keys if k.startswith("ring_")}
    assert {f.name for f in fields(settings)} - flattened <= set(keys)
    assert all(k in keys for k in ("loop", "log_level"))
