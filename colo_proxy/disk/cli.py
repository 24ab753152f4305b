"""``colo-proxy disk-agent``: command line to a running agent."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from colo_proxy.config_args import parse_size
from colo_proxy.disk.address import check_local, parse_address
from colo_proxy.disk.agent import AgentConfig, DiskAgent
from colo_proxy.disk.engine import DEFAULT_MEMORY_CAP, DiskEngine
from colo_proxy.disk.nbd import DEFAULT_MAX_CONNECTIONS
from colo_proxy.disk.tls import server_context
from colo_proxy.errors import ColoProxyError, ConfigError
from colo_proxy.logfmt import setup_logging

__all__ = ["add_parser", "configure", "main", "parse_size", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "disk-agent", help="disk replication target (NBD exports + QMP control)",
        description="Hold the primary's mirrored writes per checkpoint epoch and apply "
                    "committed epochs to the secondary's disk image.")
    configure(p)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, type=Path, help="secondary's raw disk image")
    p.add_argument("--nbd", action="append", required=True, metavar="ADDR",
                   help="NBD listen address: unix:PATH or tcp:HOST:PORT (repeatable)")
    p.add_argument("--qmp", action="append", required=True, metavar="ADDR",
                   help="QMP listen address: unix:PATH or tcp:HOST:PORT (repeatable)")
    p.add_argument("--listen-remote", action="store_true",
                   help="allow NBD/QMP on non-loopback TCP addresses (default: unix "
                        "sockets, created 0600, and 127.0.0.1/::1 only)")
    p.add_argument("--qmp-remote-control", action="store_true",
                   help="allow quit and colo-disk-failover on TCP QMP connections "
                        "(default: only on unix sockets)")
    p.add_argument("--tls-creds", type=Path, metavar="DIR",
                   help="TLS on TCP listeners (NBD by STARTTLS, QMP from connect), QEMU "
                        "tls-creds-x509 layout: ca-cert.pem, server-cert.pem, server-key.pem")
    p.add_argument("--tls-verify-peer", choices=("on", "off"), default="on",
                   help="require a client certificate signed by the CA (default on)")
    p.add_argument("--state-dir", type=Path,
                   help="journals and spill files (default: IMAGE.colo-state)")
    p.add_argument("--memory-cap", type=parse_size, default=DEFAULT_MEMORY_CAP,
                   metavar="SIZE", help="buffer bytes kept in memory before spilling "
                                        "to files (default 256M)")
    p.add_argument("--max-epoch-bytes", type=parse_size, default=None, metavar="SIZE",
                   help="bytes one epoch may log (memory plus spill files); beyond it "
                        "writes fail with ENOSPC until the next checkpoint "
                        "(default: twice the image plus 64M)")
    p.add_argument("--nbd-max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   metavar="N", help="NBD clients served at once; more are refused "
                                     f"(default {DEFAULT_MAX_CONNECTIONS}; incomplete "
                                     "writes of all of them are bounded to 64M plus one)")
    p.add_argument("--export-name", default="replication",
                   help="NBD export the primary mirrors into (also the default export)")
    p.add_argument("--secondary-export", default="secondary", metavar="NAME",
                   help="NBD export for the running secondary VM (COLO mode)")
    p.add_argument("--no-secondary-export", action="store_true",
                   help="offer only the replication export")
    p.add_argument("--ack", choices=("journaled", "sealed"), default="journaled",
                   help="acknowledge a checkpoint once its journal is fsynced (default; "
                        "survives kill -9) or as soon as it is sealed in memory (Remus-fast; "
                        "a crash may lose the last epochs)")
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="event loop implementation (auto: uvloop when installed)")
    p.add_argument("--log-level", type=str.lower, default="info",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log lines as text (default) or one JSON object each")
    p.add_argument("--metrics", metavar="[HOST:]PORT",
                   help="serve Prometheus metrics on /metrics (host 127.0.0.1 unless given)")
    p.set_defaults(func=run)


async def _serve(args: argparse.Namespace) -> int:
    image: Path = args.image
    state_dir: Path = args.state_dir or image.with_name(image.name + ".colo-state")
    config = AgentConfig(
        nbd=tuple(parse_address(a) for a in args.nbd),
        qmp=tuple(parse_address(a) for a in args.qmp),
        export_name=args.export_name,
        secondary_name=None if args.no_secondary_export else args.secondary_export,
        default_export=args.export_name,
        ack_sealed=args.ack == "sealed",
        qmp_remote_control=args.qmp_remote_control,
        nbd_max_connections=args.nbd_max_connections,
        tls=(server_context(args.tls_creds, args.tls_verify_peer == "on")
             if args.tls_creds else None),
    )
    if args.nbd_max_connections < 1:
        raise ConfigError("--nbd-max-connections must be at least 1")
    check_local(config.nbd + config.qmp, args.listen_remote)
    if config.secondary_name == config.export_name:
        raise ConfigError("--secondary-export must differ from --export-name")
    engine = DiskEngine(image, state_dir, args.memory_cap, args.max_epoch_bytes)
    agent = DiskAgent(engine, config)
    # Serving before the agent listens: whoever sees the agent up can scrape it.
    stop_metrics = _serve_metrics(args.metrics, engine) if args.metrics else None
    try:
        await agent.start()
    except BaseException:
        if stop_metrics is not None:
            stop_metrics()
        await agent.close()
        raise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop)
    logging.getLogger(__name__).info(
        "disk-agent ready: image %s (%d bytes) at epoch %d (%d journals replayed), "
        "NBD %s, QMP %s", image, engine.size, engine.replica.applied_epoch,
        engine.state.replayed,
        ", ".join(map(str, config.nbd)), ", ".join(map(str, config.qmp)))
    try:
        await agent.wait_stopped()
    finally:
        if stop_metrics is not None:
            stop_metrics()
    await agent.close()
    return 0


def _serve_metrics(addr: str, engine: DiskEngine) -> Callable[[], None]:
    """The agent's epochs and buffered bytes, read on the loop at scrape time."""
    from colo_proxy.metrics import disk_agent_registry, loop_snapshot, serve

    def stats() -> dict[str, object]:
        st = engine.status()
        return {"disk_agent": {"sealed": st.sealed_epoch, "committed": st.committed_epoch,
                               "applied": st.applied_epoch,
                               "speculation": st.speculation_bytes,
                               "overlay": st.overlay_bytes}}

    return serve(addr, disk_agent_registry(loop_snapshot(asyncio.get_running_loop(), stats)))


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format,
                  "%(asctime)s %(name)s %(levelname)s %(message)s")
    use_uvloop = args.loop == "uvloop" or (
        args.loop == "auto" and importlib.util.find_spec("uvloop") is not None)
    try:
        if use_uvloop:
            import uvloop
            return uvloop.run(_serve(args))
        return asyncio.run(_serve(args))
    except ColoProxyError as err:
        print(f"colo-proxy disk-agent: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="colo-proxy disk-agent")
    configure(parser)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result
