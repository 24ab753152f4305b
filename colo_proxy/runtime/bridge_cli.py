"""`colo-proxy bridge`: flags and TOML to BridgeSettings, then the bridge on (uv)loop.

Same conventions as `colo-proxy run` (shared flags come from run_cli): bridge
settings in a ``[bridge]`` table (or at the top level), core thresholds in
``[core]``; ``--client-if`` is ``client_if``; flags override the file.
"""

from __future__ import annotations

import argparse
from typing import Any

from colo_proxy.config_args import add_config_flags, config_from_args, parse_size
from colo_proxy.drivers.afpacket import RingSpec
from colo_proxy.errors import ConfigError
from colo_proxy.live_obs import HOST_OBS_KEYS
from colo_proxy.runtime.bridge import Bridge, BridgeSettings
from colo_proxy.runtime.run_cli import (
    Keys,
    ProcessOptions,
    add_host_flags,
    check_host_values,
    disk_tls,
    keys_of,
    qmp_tls,
    section_values,
    serve_and_report,
    settings_fields,
)

_RING = RingSpec()

RING_RENAMES = {"ring_block_count": "ring_blocks"}
"""Established spellings of BridgeSettings.ring's keys (``--ring-blocks``)."""

BRIDGE_KEYS: Keys = {
    **keys_of(BridgeSettings, RING_RENAMES), **keys_of(ProcessOptions), **HOST_OBS_KEYS,
}
"""Every `bridge` setting: BridgeSettings' fields (the ring's flattened) and the process's."""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `bridge` subcommand."""
    p = subparsers.add_parser(
        "bridge",
        help="bridge three interfaces (client, primary guest, secondary guest) live",
        description=(
            "Sit between the client side and two guests' taps/veths: client frames go to both "
            "guests (translated for the secondary), the primary's output is released to the "
            "client once the secondary produced the same; checkpoints through QMP. Needs root "
            "or CAP_NET_RAW. TSO/GSO/GRO super-frames and open checksums pass whole "
            "(virtio_net_hdr on the packet sockets; --offloads off: they must be off, "
            "checked at start, and --fix-offloads turns them off)."
        ),
    )
    io = p.add_argument_group("interfaces")
    io.add_argument("--client-if", metavar="IF", help="interface towards the clients")
    io.add_argument("--primary-if", metavar="IF", help="the primary guest's tap or veth")
    io.add_argument("--secondary-if", metavar="IF", help="the secondary guest's tap or veth")
    io.add_argument("--ring-block-size", type=parse_size, default=None, metavar="BYTES",
                    help=f"receive ring block size, a page multiple ({_RING.block_size})")
    io.add_argument("--ring-blocks", type=int, default=None, metavar="N",
                    help=f"receive ring blocks per interface ({_RING.block_count})")
    io.add_argument("--ring-version", type=int, choices=(2, 3), default=None,
                    help="receive ring layout: 2, a slot per frame, woken per frame (default); "
                         "3, blocks handed over when full or after --ring-retire-ms")
    io.add_argument("--ring-retire-ms", type=int, default=None, metavar="MS",
                    help=f"version 3: a partly filled block is read after MS ms "
                         f"({_RING.retire_ms})")
    io.add_argument("--busy-poll-us", type=int, default=None, metavar="US",
                    help="after a frame, look at the rings US microseconds more without "
                         "sleeping: saves a wake-up per hop (100; 0 never)")
    io.add_argument("--offloads", choices=("accept", "off"), default=None,
                    help="accept (default where the kernel can): super-frames and open "
                         "checksums pass whole, compared as byte streams; off: offloads must "
                         "be off on the interfaces and their veth peers (checked at start)")
    io.add_argument("--fix-offloads", action="store_true", default=None,
                    help="turn off what the --offloads mode cannot take (off: GRO/LRO on the "
                         "three interfaces and segmentation offloads on their veth peers; "
                         "accept: only fraglist and UDP GRO) instead of refusing to start")
    io.add_argument("--kernel-forward", action=argparse.BooleanOptionalAction, default=None,
                    help="client frames reach the primary by a tc ingress redirect in the "
                         "kernel (default on; ring version 2 only)")
    io.add_argument("--kernel-mirror", action=argparse.BooleanOptionalAction, default=None,
                    help="with --kernel-forward, ARP and IPv4 other than TCP also reach the "
                         "secondary in the kernel (a tc mirred copy; default on)")
    io.add_argument("--output-buffer", type=parse_size, default=None, metavar="BYTES",
                    help="bound on output waiting for an interface; beyond it output is "
                         "dropped and counted (64 MiB)")
    add_host_flags(p, "the client interface")
    add_config_flags(p)
    p.set_defaults(func=bridge)


def settings_from_values(values: dict[str, Any]) -> BridgeSettings:
    """Validate bridge values into BridgeSettings (ConfigError names the problem)."""
    missing = [k for k in ("client_if", "primary_if", "secondary_if") if not values.get(k)]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise ConfigError(f"bridge: {flags} required (flag or config file)")
    check_host_values(values, "bridge")
    fields = settings_fields(BridgeSettings, values, RING_RENAMES)
    fields["disk_tls_creds"] = disk_tls(values)
    fields["qmp_tls_creds"] = qmp_tls(values)
    settings = BridgeSettings(**fields)
    settings.validate()
    return settings


def bridge(args: argparse.Namespace) -> int:
    """Entry point of `colo-proxy bridge`."""
    values = section_values(args, "bridge", BRIDGE_KEYS)
    config = config_from_args(args, extra_keys=frozenset(BRIDGE_KEYS) | {"bridge"})
    settings = settings_from_values(values)
    return serve_and_report(lambda: Bridge(config, settings), values)
