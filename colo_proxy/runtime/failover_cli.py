"""Flags and TOML keys of `colo-proxy run --failover` (kept apart from run_cli's own)."""

from __future__ import annotations

import argparse
import ipaddress
from typing import TYPE_CHECKING, Any

from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.errors import ConfigError

if TYPE_CHECKING:  # imported when failover is on: plain `run` never loads the failover host
    from colo_proxy.runtime.failover import FailoverSettings

FAILOVER_KEYS: dict[str, tuple[type, Any]] = {
    "failover": (bool, False),
    "heartbeat_period": (float, 0.5),
    "heartbeat_misses": (int, 3),
    "failover_secondary_objects": (str, None),
    "failover_secondary_chardevs": (str, None),
    "failover_primary_objects": (str, "m0"),
    "failover_mirror_job": (str, None),
    "heartbeat_dev": (str, None),
    "heartbeat_guest_ip": (str, None),
    "heartbeat_disk_nbd": (str, None),
    "secondary_outdev": (str, None),
    "failover_secondary_output_filters": (str, "f2,f3"),
    "failover_secondary_nics": (str, ""),
    "promoted_heartbeat_dev": (str, None),
}
"""key -> (type, default), merged into `run`'s keys ([run] table in TOML)."""


def add_failover_flags(p: argparse.ArgumentParser) -> None:
    """The `--failover` group of `colo-proxy run`."""
    g = p.add_argument_group(
        "failover",
        "heartbeats to the primary, the secondary and the disk agent (QMP query-status, "
        "and with --heartbeat-dev an ARP probe through both guests' data path); on loss of "
        "the primary run the secondary's takeover, on loss of the secondary let the "
        "primary go on alone",
    )
    g.add_argument("--failover", action="store_true", default=None,
                   help="watch the peers and fail over (needs --qmp and --secondary-qmp)")
    g.add_argument("--heartbeat-period", type=float, default=None, metavar="S",
                   help="probe every S seconds; no answer within S is a miss (0.5)")
    g.add_argument("--heartbeat-misses", type=int, default=None, metavar="N",
                   help="consecutive misses that make a peer lost (3)")
    g.add_argument("--heartbeat-dev", default=None, metavar="ENDPOINT",
                   help="chardev of a filter-redirector (queue=tx, indev) on the primary's "
                        "netdev, ahead of its filter-mirror: data-path probes go in there")
    g.add_argument("--heartbeat-guest-ip", default=None, metavar="IPV4",
                   help="the guest's address the data-path ARP probes ask for")
    g.add_argument("--heartbeat-disk-nbd", default=None, metavar="ENDPOINT",
                   help="the disk agent's NBD endpoint: its data path is probed too (an NBD "
                        "greeting, then NBD_OPT_ABORT), besides its QMP (needs --disk-qmp)")
    g.add_argument("--secondary-outdev", default=None, metavar="ENDPOINT",
                   help="chardev of a filter-redirector (queue=rx, indev) at the head of the "
                        "secondary's filters: after a takeover its output goes out there, "
                        "through colo-proxy")
    g.add_argument("--promoted-heartbeat-dev", default=None, metavar="ENDPOINT",
                   help="with --heartbeat-dev: chardev of a filter-redirector (queue=tx, indev) "
                        "on the secondary's netdev; after a takeover the new primary's "
                        "data-path probes go in there")
    g.add_argument("--failover-secondary-output-filters", default=None, metavar="IDS",
                   help="with --secondary-outdev: the secondary's filters on that path, turned "
                        "back on after QEMU's failover turned them off (f2,f3)")
    g.add_argument("--failover-secondary-nics", default=None, metavar="IDS",
                   help="the secondary's NICs whose link is put up at takeover (a checkpoint "
                        "taken while the primary's link was down copies that state); default: "
                        "every NIC its query-rx-filter lists")
    g.add_argument("--failover-secondary-objects", default=None, metavar="IDS",
                   help="the secondary's redirectors to object-del at takeover "
                        "(f1 with --secondary-outdev, else f2,f1)")
    g.add_argument("--failover-secondary-chardevs", default=None, metavar="IDS",
                   help="their chardevs to chardev-remove at takeover "
                        "(red0 with --secondary-outdev, else red1,red0)")
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

    # with --secondary-outdev the output path (f2 -> colo-proxy -> its outdev) stays
    out = values.get("secondary_outdev") or None
    defaults = {"failover_secondary_objects": "f1" if out else "f2,f1",
                "failover_secondary_chardevs": "red0" if out else "red1,red0"}

    def ids(key: str) -> tuple[str, ...]:
        value = values.get(key)
        if value is None:  # the two above depend on --secondary-outdev; the rest are fixed
            value = defaults.get(key, FAILOVER_KEYS[key][1])
        return tuple(x for x in str(value or "").split(",") if x)

    hb_dev, guest = values.get("heartbeat_dev") or None, values.get("heartbeat_guest_ip") or None
    if (hb_dev is None) != (guest is None):
        raise ConfigError("run: --heartbeat-dev and --heartbeat-guest-ip go together")
    if values.get("promoted_heartbeat_dev") and hb_dev is None:
        raise ConfigError("run: --promoted-heartbeat-dev needs --heartbeat-dev")
    guest_ip = None
    if guest is not None:
        try:
            guest_ip = ipaddress.IPv4Address(guest).packed
        except ValueError as err:
            raise ConfigError(f"heartbeat_guest_ip: {err}") from None
    endpoints = {k: parse_endpoint(v) for k in ("heartbeat_dev", "secondary_outdev",
                                                "heartbeat_disk_nbd", "promoted_heartbeat_dev")
                 if (v := values.get(k))}
    for key, ep in endpoints.items():
        if ep.remote_listener() and not values.get("listen_remote"):
            raise ConfigError(f"{key}: {ep.describe()} listens on a non-loopback address; "
                              "give --listen-remote (listen_remote = true) to allow other hosts")
    from colo_proxy.runtime.failover import FailoverSettings

    return FailoverSettings(
        period=float(period),
        misses=int(misses),
        secondary_objects=ids("failover_secondary_objects"),
        secondary_chardevs=ids("failover_secondary_chardevs"),
        primary_objects=ids("failover_primary_objects"),
        mirror_job=values.get("failover_mirror_job") or None,
        heartbeat_dev=endpoints.get("heartbeat_dev"),
        disk_nbd=endpoints.get("heartbeat_disk_nbd"),
        guest_ip=guest_ip,
        secondary_outdev=endpoints.get("secondary_outdev"),
        secondary_output_filters=ids("failover_secondary_output_filters"),
        secondary_nics=ids("failover_secondary_nics"),
        promoted_heartbeat_dev=endpoints.get("promoted_heartbeat_dev"),
    )
