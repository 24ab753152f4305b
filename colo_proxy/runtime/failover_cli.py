"""Flags and TOML keys of `colo-proxy run --failover` (kept apart from run_cli's own)."""

from __future__ import annotations

import argparse
from typing import Any

from colo_proxy.errors import ConfigError
from colo_proxy.runtime.failover import FailoverSettings

FAILOVER_KEYS: dict[str, tuple[type, Any]] = {
    "failover": (bool, False),
    "heartbeat_period": (float, 0.5),
    "heartbeat_misses": (int, 3),
    "failover_secondary_objects": (str, "f2,f1"),
    "failover_secondary_chardevs": (str, "red1,red0"),
    "failover_primary_objects": (str, "m0"),
    "failover_mirror_job": (str, None),
}
"""key -> (type, default), merged into `run`'s keys ([run] table in TOML)."""


def add_failover_flags(p: argparse.ArgumentParser) -> None:
    """The `--failover` group of `colo-proxy run`."""
    g = p.add_argument_group(
        "failover",
        "heartbeats to the primary, the secondary and the disk agent (QMP query-status); "
        "on loss of the primary run the secondary's takeover, on loss of the secondary "
        "let the primary go on alone",
    )
    g.add_argument("--failover", action="store_true", default=None,
                   help="watch the peers and fail over (needs --qmp and --secondary-qmp)")
    g.add_argument("--heartbeat-period", type=float, default=None, metavar="S",
                   help="probe every S seconds; no answer within S is a miss (0.5)")
    g.add_argument("--heartbeat-misses", type=int, default=None, metavar="N",
                   help="consecutive misses that make a peer lost (3)")
    g.add_argument("--failover-secondary-objects", default=None, metavar="IDS",
                   help="the secondary's redirectors to object-del at takeover (f2,f1)")
    g.add_argument("--failover-secondary-chardevs", default=None, metavar="IDS",
                   help="their chardevs to chardev-remove at takeover (red1,red0)")
    g.add_argument("--failover-primary-objects", default=None, metavar="IDS",
                   help="the primary's filter-mirror to object-del when the secondary is lost (m0)")
    g.add_argument("--failover-mirror-job", default=None, metavar="JOB",
                   help="the primary's mirror into the disk agent, cancelled when the "
                        "secondary is lost")


def failover_settings(values: dict[str, Any]) -> FailoverSettings | None:
    """FailoverSettings when `failover` is on, else None (ConfigError names a problem)."""
    if not values.get("failover"):
        return None
    if not values.get("qmp") or not values.get("secondary_qmp"):
        raise ConfigError("run: --failover needs --qmp and --secondary-qmp")
    period, misses = values["heartbeat_period"], values["heartbeat_misses"]
    if period <= 0 or misses < 1:
        raise ConfigError("heartbeat_period must be positive and heartbeat_misses at least 1")

    def ids(key: str) -> tuple[str, ...]:
        return tuple(x for x in str(values[key]).split(",") if x)

    return FailoverSettings(
        period=float(period),
        misses=int(misses),
        secondary_objects=ids("failover_secondary_objects"),
        secondary_chardevs=ids("failover_secondary_chardevs"),
        primary_objects=ids("failover_primary_objects"),
        mirror_job=values.get("failover_mirror_job") or None,
    )
