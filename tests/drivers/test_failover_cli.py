"""`colo-proxy run --failover` flags and TOML keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.errors import ConfigError
from colo_proxy.runtime import run_cli
from colo_proxy.runtime.failover import FailoverSettings
from colo_proxy.runtime.failover_cli import failover_settings
from tests.drivers.test_run_cli import parse

BASE = ["--primary-in", "unix:/tmp/p.sock", "--secondary-in", "unix:/tmp/s.sock,server",
        "--outdev", "unix:/tmp/o.sock"]
QMPS = ["--qmp", "unix:/tmp/p.qmp", "--secondary-qmp", "unix:/tmp/s.qmp"]


def settings(argv: list[str]) -> FailoverSettings | None:
    return failover_settings(run_cli.run_values(parse(argv)))


def test_off_by_default() -> None:
    assert settings(BASE + QMPS) is None


def test_flags_and_toml_agree(tmp_path: Path) -> None:
    flags = settings([*BASE, *QMPS, "--failover", "--heartbeat-period", "0.2",
                      "--heartbeat-misses", "5", "--failover-secondary-objects", "a,b",
                      "--failover-secondary-chardevs", "c", "--failover-mirror-job", "m",
                      "--failover-primary-objects", "x,y"])
    assert flags == FailoverSettings(0.2, 5, ("a", "b"), ("c",), ("x", "y"), "m")
    toml = tmp_path / "run.toml"
    toml.write_text('[run]\nfailover = true\nheartbeat_period = 0.2\nheartbeat_misses = 5\n'
                    'failover_secondary_objects = "a,b"\nfailover_secondary_chardevs = "c"\n'
                    'failover_mirror_job = "m"\nfailover_primary_objects = "x,y"\n')
    assert settings([*BASE, *QMPS, "--config", str(toml)]) == flags


def test_defaults_follow_colo_ft() -> None:
    assert settings([*BASE, *QMPS, "--failover"]) == FailoverSettings(
        0.5, 3, ("f2", "f1"), ("red1", "red0"), ("m0",), None)


def test_promoted_heartbeat_dev() -> None:
    """The new primary's data probes: an endpoint, only with the data-path heartbeat."""
    hb = ["--heartbeat-dev", "unix:/tmp/hb.sock", "--heartbeat-guest-ip", "10.215.15.2"]
    flags = settings([*BASE, *QMPS, "--failover", *hb,
                      "--promoted-heartbeat-dev", "unix:/tmp/hbs.sock"])
    assert flags is not None
    assert flags.promoted_heartbeat_dev == parse_endpoint("unix:/tmp/hbs.sock")
    with pytest.raises(ConfigError, match="needs --heartbeat-dev"):
        settings([*BASE, *QMPS, "--failover", "--promoted-heartbeat-dev", "unix:/tmp/h.sock"])


def test_secondary_nics(tmp_path: Path) -> None:
    """Empty by default (the takeover asks query-rx-filter); named ones from flag or TOML."""
    assert settings([*BASE, *QMPS, "--failover"]).secondary_nics == ()  # type: ignore[union-attr]
    flags = settings([*BASE, *QMPS, "--failover", "--failover-secondary-nics", "net0,net1"])
    assert flags is not None and flags.secondary_nics == ("net0", "net1")
    toml = tmp_path / "run.toml"
    toml.write_text('[run]\nfailover = true\nfailover_secondary_nics = "net0,net1"\n')
    assert settings([*BASE, *QMPS, "--config", str(toml)]) == flags


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--qmp", "unix:/tmp/p.qmp"], "needs --qmp and --secondary-qmp"),
        ([*QMPS, "--heartbeat-period", "0"], "heartbeat_period"),
        ([*QMPS, "--heartbeat-misses", "0"], "heartbeat_misses"),
    ],
)
def test_errors(extra: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings([*BASE, "--failover", *extra])


def test_data_path_and_secondary_outdev(tmp_path: Path) -> None:
    extra = ["--heartbeat-dev", "unix:/tmp/hb.sock", "--heartbeat-guest-ip", "10.215.15.2",
             "--secondary-outdev", "unix:/tmp/so.sock"]
    flags = settings([*BASE, *QMPS, "--failover", *extra])
    assert flags == FailoverSettings(
        0.5, 3, ("f1",), ("red0",), ("m0",), None,
        heartbeat_dev=parse_endpoint("unix:/tmp/hb.sock"), guest_ip=bytes([10, 215, 15, 2]),
        secondary_outdev=parse_endpoint("unix:/tmp/so.sock"))
    toml = tmp_path / "run.toml"
    toml.write_text('[run]\nfailover = true\nheartbeat_dev = "unix:/tmp/hb.sock"\n'
                    'heartbeat_guest_ip = "10.215.15.2"\nsecondary_outdev = "unix:/tmp/so.sock"\n')
    assert settings([*BASE, *QMPS, "--config", str(toml)]) == flags
    # explicit ids still win over the defaults that keep the output path
    assert settings([*BASE, *QMPS, "--failover", *extra, "--failover-secondary-objects",
                     "f2,f1"]).secondary_objects == ("f2", "f1")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--heartbeat-dev", "unix:/tmp/hb.sock"], "go together"),
        (["--heartbeat-guest-ip", "10.0.0.1"], "go together"),
        (["--heartbeat-dev", "unix:/tmp/hb.sock", "--heartbeat-guest-ip", "fe80::1"],
         "heartbeat_guest_ip"),
        (["--secondary-outdev", "tcp:0.0.0.0:4000,server"], "non-loopback"),
    ],
)
def test_data_path_errors(extra: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings([*BASE, *QMPS, "--failover", *extra])
