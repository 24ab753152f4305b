"""`colo-proxy run`: flags and TOML to RunSettings, then the supervisor on (uv)loop.

Every flag has a TOML spelling: run settings in a ``[run]`` table (or at the
top level), core thresholds in ``[core]`` (or at the top level), the key
being the flag's name with ``_`` for ``-`` (``--primary-in`` is
``primary_in``, ``--compare-timeout`` is ``compare_timeout``).  Flags given
on the command line override the file.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import gc
import json
import logging
import signal
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colo_proxy.config_args import (
    add_config_flags,
    config_from_args,
    is_size_key,
    parse_size,
    read_toml,
    size_value,
)
from colo_proxy.disk.tls import client_context
from colo_proxy.drivers.endpoints import Endpoint, parse_endpoint
from colo_proxy.drivers.qmp_follow import FollowPolicy
from colo_proxy.errors import ConfigError
from colo_proxy.live_obs import HOST_OBS_KEYS, attach
from colo_proxy.logfmt import setup_logging
from colo_proxy.runtime.failover_cli import FAILOVER_KEYS, add_failover_flags, failover_settings
from colo_proxy.runtime.host import CoreHost, ShutdownMode, print_report
from colo_proxy.runtime.supervisor import RunSettings, Supervisor

log = logging.getLogger("colo_proxy.run")

_ON_OFF = {"on": True, "off": False, "yes": True, "no": False, "true": True, "false": False}

Keys = dict[str, tuple[type, Any]]
"""key -> (type, default); endpoints are strings parsed by parse_endpoint, enums their values."""


@dataclass(frozen=True)
class ProcessOptions:
    """Settings of the process a live proxy runs in (run, bridge), not of the proxy."""

    loop: str = "uvloop"
    log_level: str = "info"


@dataclass(frozen=True)
class ListenOptions:
    """`run` only: whether ,server endpoints may listen on non-loopback TCP addresses."""

    listen_remote: bool = False


def keys_of(cls: type, renames: Mapping[str, str] | None = None) -> Keys:
    """The TOML/flag keys of a settings dataclass, one per field, declared nowhere else.

    A nested dataclass field (``ring: RingSpec``) gives one key per field of
    its own, prefixed with the field's name (``ring_block_size``); ``renames``
    keeps an established spelling (``ring_block_count`` is ``ring_blocks``).
    """
    renames = renames or {}
    out: Keys = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _unwrap_optional(hints[f.name])
        if kind is not Endpoint and isinstance(kind, type) and dataclasses.is_dataclass(kind):
            for sub, spec in keys_of(kind).items():
                key = f"{f.name}_{sub}"
                out[renames.get(key, key)] = spec
            continue
        default = None if f.default is dataclasses.MISSING else f.default
        if kind is Endpoint or kind is Path:
            out[f.name] = (str, None)
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            out[f.name] = (str, default.value if isinstance(default, enum.Enum) else None)
        else:
            out[f.name] = (kind, default)
    return out


def settings_fields(
    cls: type, values: Mapping[str, Any], renames: Mapping[str, str] | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """Keyword arguments for ``cls`` from key values (the inverse of :func:`keys_of`).

    Endpoint specs are parsed, enum values looked up, nested dataclasses built;
    a bad value is a ConfigError naming the key.
    """
    renames = renames or {}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = _unwrap_optional(hints[f.name])
        key = renames.get(prefix + f.name, prefix + f.name)
        if kind is not Endpoint and isinstance(kind, type) and dataclasses.is_dataclass(kind):
            out[f.name] = kind(**settings_fields(kind, values, renames, f"{key}_"))
            continue
        value = values.get(key)
        if kind is Endpoint:
            value = parse_endpoint(value) if value else None
        elif kind is Path:
            value = Path(value) if value else None
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            try:
                value = kind(value)
            except ValueError as err:
                raise ConfigError(f"{key}: {err}") from None
        elif value is not None:
            value = kind(value)
        out[f.name] = value
    return out


def _unwrap_optional(kind: Any) -> Any:
    """``X | None`` -> ``X``."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if isinstance(kind, types.UnionType) and len(args) == 1 else kind


RUN_KEYS: Keys = {
    **keys_of(RunSettings),
    **keys_of(ListenOptions),
    **keys_of(ProcessOptions),
    **HOST_OBS_KEYS,
    **FAILOVER_KEYS,
}
"""Every `run` setting: RunSettings' fields, the listen and process options, failover's."""


def _on_off(text: str) -> bool:
    try:
        return _ON_OFF[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}") from None


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `run` subcommand."""
    p = subparsers.add_parser(
        "run",
        help="run between QEMU's filter chardevs in place of colo-compare",
        description=(
            "Read primary and secondary frames from QEMU chardev sockets, release matching "
            "primary frames to outdev, request checkpoints through QMP or notify_dev. "
            "Endpoints: unix:PATH or tcp:HOST:PORT, with ,server to listen."
        ),
    )
    io = p.add_argument_group("QEMU endpoints")
    io.add_argument(
        "--primary-in", metavar="SPEC", help="primary guest output (colo-compare primary_in)"
    )
    io.add_argument("--secondary-in", metavar="SPEC", help="secondary guest output")
    io.add_argument("--outdev", metavar="SPEC", help="released primary frames go here")
    io.add_argument("--notify-dev", metavar="SPEC", help="Xen COLO notify_dev text protocol")
    io.add_argument(
        "--vnet-hdr",
        nargs="?",
        const=True,
        default=None,
        type=_on_off,
        metavar="on|off",
        help="records carry a vnet header length (vnet_hdr_support)",
    )
    io.add_argument(
        "--outdev-buffer",
        type=parse_size,
        default=None,
        metavar="BYTES",
        help="bound on output waiting for outdev; beyond it output is dropped and counted (64 MiB)",
    )
    io.add_argument(
        "--listen-remote",
        action="store_true",
        default=None,
        help="allow ,server endpoints on a non-loopback TCP address (other hosts can "
        "connect; without it only 127.0.0.1/::1 and unix sockets, created 0600)",
    )
    add_host_flags(p, "outdev")
    add_failover_flags(p)
    add_config_flags(p)
    p.set_defaults(func=run)


def add_host_flags(p: argparse.ArgumentParser, output: str) -> None:
    """The flags every live proxy shares: QMP, shutdown, stats, loop, logging."""
    io = p.add_argument_group("checkpoints and operation")
    io.add_argument("--qmp", metavar="SPEC", help="primary QEMU's QMP socket")
    io.add_argument("--secondary-qmp", metavar="SPEC", help="secondary QEMU's QMP socket")
    io.add_argument(
        "--disk-qmp",
        metavar="SPEC",
        help="disk replication agent's QMP socket: held output also waits for its epoch ack",
    )
    io.add_argument(
        "--disk-tls-creds",
        metavar="DIR",
        help="TLS to --disk-qmp (the agent's --tls-creds), QEMU tls-creds-x509 client layout: "
        "ca-cert.pem, and client-cert.pem + client-key.pem for a client certificate",
    )
    io.add_argument(
        "--qmp-tls-creds",
        metavar="DIR",
        help="TLS to --qmp and --secondary-qmp (a QEMU QMP chardev with tls-creds), QEMU "
        "tls-creds-x509 client layout: ca-cert.pem, client-cert.pem + client-key.pem",
    )
    io.add_argument(
        "--qmp-follow",
        choices=[f.value for f in FollowPolicy],
        default=None,
        help="which STOP/RESUME pairs count as checkpoints (default colo)",
    )
    io.add_argument(
        "--qmp-request-timeout",
        type=float,
        default=None,
        metavar="S",
        help="re-send a checkpoint request no STOP answered after S seconds (5)",
    )
    io.add_argument(
        "--on-shutdown",
        choices=[m.value for m in ShutdownMode],
        default=None,
        help=f"held frames at exit: report (default) or flush to {output}",
    )
    io.add_argument(
        "--stats-interval",
        type=float,
        default=None,
        metavar="S",
        help="log all counters every S seconds (0: only at exit)",
    )
    io.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default=None,
        help="event loop implementation (uvloop)",
    )
    io.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    io.add_argument("--log-format", choices=["text", "json"], default=None,
                    help="log lines as text (default) or one JSON object each")
    io.add_argument("--metrics", metavar="[HOST:]PORT",
                    help="serve Prometheus metrics on /metrics (host 127.0.0.1 unless given)")
    io.add_argument("--save-divergences", metavar="DIR",
                    help="write the frames around each divergence as a pcap pair in DIR "
                         "(read by explain and replay)")
    io.add_argument("--save-divergences-max-bytes", type=parse_size, default=None,
                    metavar="BYTES", help="bound on what --save-divergences writes (64M)")


def run_values(args: argparse.Namespace) -> dict[str, Any]:
    """Run settings from the TOML file's [run] table/top level, then flags."""
    return section_values(args, "run", RUN_KEYS)


def section_values(args: argparse.Namespace, table: str, keys: Keys) -> dict[str, Any]:
    """A subcommand's settings: defaults, then the TOML file's [table]/top level, then flags."""
    values: dict[str, Any] = {k: default for k, (_, default) in keys.items()}
    if getattr(args, "config", None):
        values.update(_toml_table(args.config, table, keys))
    for key in keys:
        flag = getattr(args, key, None)
        if flag is not None:
            values[key] = flag
    return values


def _toml_table(path: str, name: str, keys: Keys) -> dict[str, Any]:
    data = read_toml(path)
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise ConfigError(f"{path}: unknown [{name}] setting(s): {', '.join(unknown)}")
    out = {k: v for k, v in data.items() if k in keys}
    out.update(table)
    for key, value in out.items():
        kind = keys[key][0]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is bool and isinstance(value, str) and value.lower() in _ON_OFF:
            value = _ON_OFF[value.lower()]
        if kind is int and is_size_key(key) and isinstance(value, str):
            try:
                value = size_value(value)
            except ValueError as err:
                raise ConfigError(f"{path}: {key}: {err}") from None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: {key}: expected {kind.__name__}, got {value!r}")
        out[key] = value
    return out


def settings_from_values(values: dict[str, Any]) -> RunSettings:
    """Validate run values into RunSettings (ConfigError names the problem)."""
    missing = [k for k in ("primary_in", "secondary_in", "outdev") if not values.get(k)]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise ConfigError(f"run: {flags} required (flag or config file)")
    if values["outdev_buffer"] < 65536:
        raise ConfigError("outdev_buffer: must be at least 65536 bytes")
    check_host_values(values, "run")
    fields = settings_fields(RunSettings, values)
    if not values["listen_remote"]:
        for key in ("primary_in", "secondary_in", "outdev", "notify_dev"):
            ep = fields[key]
            if ep is not None and ep.remote_listener():
                raise ConfigError(
                    f"{key}: {ep.describe()} listens on a non-loopback address; "
                    "give --listen-remote (listen_remote = true) to allow other hosts")
    fields["disk_tls_creds"] = disk_tls(values)
    fields["qmp_tls_creds"] = qmp_tls(values)
    return RunSettings(**fields)


def disk_tls(values: Mapping[str, Any]) -> Path | None:
    """--disk-tls-creds, checked now (a bad directory is a one-line error at start)."""
    if not values.get("disk_tls_creds"):
        return None
    if not values.get("disk_qmp"):
        raise ConfigError("disk_tls_creds: needs --disk-qmp")
    path = Path(values["disk_tls_creds"])
    client_context(path)
    return path


def qmp_tls(values: Mapping[str, Any]) -> Path | None:
    """--qmp-tls-creds, checked now like --disk-tls-creds."""
    if not values.get("qmp_tls_creds"):
        return None
    if not values.get("qmp") and not values.get("secondary_qmp"):
        raise ConfigError("qmp_tls_creds: needs --qmp or --secondary-qmp")
    path = Path(values["qmp_tls_creds"])
    client_context(path, "--qmp-tls-creds")
    return path


def check_host_values(values: Mapping[str, Any], command: str) -> None:
    """Check the settings every live proxy shares (ConfigError names the problem)."""
    try:
        FollowPolicy(values["qmp_follow"])
        ShutdownMode(values["on_shutdown"])
    except ValueError as err:
        raise ConfigError(f"{command}: {err}") from None
    if values["qmp_request_timeout"] <= 0 or values["stats_interval"] < 0:
        raise ConfigError("qmp_request_timeout must be positive, stats_interval >= 0")
    if values["loop"] not in ("uvloop", "asyncio"):
        raise ConfigError(f"loop: expected uvloop or asyncio, got {values['loop']!r}")
    level = str(values["log_level"]).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level: unknown level {values['log_level']!r}")


def run(args: argparse.Namespace) -> int:
    """Entry point of `colo-proxy run`."""
    values = run_values(args)
    config = config_from_args(args, extra_keys=frozenset(RUN_KEYS) | {"run"})
    settings = settings_from_values(values)
    failover = failover_settings(values)
    if failover is not None:
        from colo_proxy.runtime.failover import FailoverSupervisor  # only with failover on

        return serve_and_report(lambda: FailoverSupervisor(config, settings, failover), values)
    return serve_and_report(lambda: Supervisor(config, settings), values)


def serve_and_report(make_host: Callable[[], CoreHost], values: dict[str, Any]) -> int:
    """Log set-up, the host on its loop until SIGINT/SIGTERM, the final report on stderr."""
    level = str(values["log_level"]).upper()
    setup_logging(level, str(values.get("log_format") or "text"))
    logging.getLogger("qemu.qmp").setLevel(max(logging.WARNING, logging.getLogger().level))
    report = _run_loop(_serve(make_host, values), values["loop"])
    print_report(report)
    return 0


async def _serve(make_host: Callable[[], CoreHost], values: dict[str, Any],
                 ) -> dict[str, object]:
    host = make_host()
    close_obs = attach(host, values)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stop, host, sig)
    loop.add_signal_handler(signal.SIGUSR1, _log_stats, host)
    loop.add_signal_handler(signal.SIGUSR2, host.enter_passthrough, "SIGUSR2")
    log.info("colo-proxy running (loop %s)", type(loop).__module__.split(".")[0])
    try:
        report = await host.serve()
    except BaseException:
        close_obs({})
        raise
    close_obs(report)
    return report


def _log_stats(host: CoreHost) -> None:
    log.info("stats %s", json.dumps(host.stats(), default=str, sort_keys=True))


def _stop(host: CoreHost, sig: signal.Signals) -> None:
    log.info("%s: shutting down", sig.name)
    host.stop()


def _run_loop(coro: Any, which: str) -> dict[str, object]:
    """uvloop is chosen here, once; all other code is plain asyncio.

    The cyclic garbage collector is tuned here too: every frame allocates a few
    short-lived objects, and collecting the young generation less often (with
    start-up objects frozen out of it) is worth a few percent of frames/s.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    if which == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop not installed; using the asyncio loop")
        else:
            result: dict[str, object] = uvloop.run(coro)
            return result
    return asyncio.run(coro)
