"""`colo-proxy` command line: replay, streams, run, bridge, disk-agent, explain, tune, learn.

Errors the operator can fix (bad files, bad values) print one line and exit
with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import sys
from collections.abc import Sequence

from colo_proxy.errors import ColoProxyError

EXIT_USAGE = 2

# Subcommands that live in their own packages: (names, module, attribute adding the parsers).
_PLUGGED: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("run",), "colo_proxy.runtime.run_cli", "add_parser"),
    (("bridge",), "colo_proxy.runtime.bridge_cli", "add_parser"),
    (("disk-agent",), "colo_proxy.disk.cli", "add_parser"),
    (("explain", "tune", "learn"), "colo_proxy.tools_cli", "add_parsers"),
)


def _add_replay(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "replay", help="compare a primary and a secondary capture offline",
        description="Replay two captures through the comparison core in virtual time.",
    )
    p.add_argument("primary", help="pcap/pcapng of what the primary guest sent")
    p.add_argument("secondary", help="pcap/pcapng of what the secondary guest sent")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    p.add_argument("--released", metavar="FILE.pcap",
                   help="write released primary frames, stamped with their release time")
    p.add_argument("--guest", metavar="ADDR",
                   help="guest IP or MAC, for captures holding both directions")
    p.add_argument("--checkpoint-latency", type=float, default=0.0, metavar="S",
                   help="simulated checkpoint duration in virtual seconds (default 0)")
    p.add_argument("--align", default="auto", metavar="auto|none|SECONDS",
                   help="line the secondary capture's clock up with the primary's: auto "
                        "estimates the offset from client requests seen in both captures "
                        "(else the first guest frame of each), none trusts the timestamps, "
                        "SECONDS is the secondary's offset (its clock minus the primary's)")
    p.add_argument("--batch-window", type=float, default=0.0, metavar="S",
                   help="feed each side's frames that arrived within S seconds as one batch, "
                        "as live reads would (faster; times move by up to S; keep S below "
                        "the capture's checkpoint round trip; default 0: frame by frame)")
    from colo_proxy.config_args import add_config_flags

    add_config_flags(p)
    p.set_defaults(func=_replay)


def _replay(args: argparse.Namespace) -> int:
    from colo_proxy.config_args import config_from_args
    from colo_proxy.drivers.align import parse_align
    from colo_proxy.drivers.guest import parse_guest
    from colo_proxy.drivers.output import atomic_output
    from colo_proxy.drivers.pcap import PcapWriter
    from colo_proxy.report import report_dict, summary_text, to_json
    from colo_proxy.runtime.replay import Replay

    config = config_from_args(args)
    if args.checkpoint_latency < 0:
        raise ColoProxyError("--checkpoint-latency: must not be negative")
    if not args.batch_window >= 0:
        raise ColoProxyError("--batch-window: must not be negative")
    try:
        align_setting = parse_align(args.align)
    except ValueError as err:
        raise ColoProxyError(str(err)) from err
    guest = parse_guest(args.guest) if args.guest else None
    with contextlib.ExitStack() as stack:
        writer = None
        if args.released:
            tmp = stack.enter_context(
                atomic_output(args.released, inputs=(args.primary, args.secondary))
            )
            writer = PcapWriter(tmp)
            stack.callback(writer.close)
        replay = Replay(config, args.checkpoint_latency,
                        writer.write if writer is not None else None, args.batch_window,
                        align_setting)
        result = replay.run(args.primary, args.secondary, guest)
    report = report_dict(result, args.primary, args.secondary)
    print(to_json(report) if args.json else summary_text(report))
    for warning in report["warnings"]:
        print(f"colo-proxy: warning: {warning}", file=sys.stderr)
    return 0


def _add_streams(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "streams", help="write every reassembled TCP direction of a capture to files",
        description="Reassemble each TCP direction and write it with an index.json.",
    )
    p.add_argument("pcap")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=_streams)


def _streams(args: argparse.Namespace) -> int:
    from colo_proxy.drivers.output import atomic_output_dir
    from colo_proxy.streams import write_streams

    with atomic_output_dir(args.out, inputs=(args.pcap,)) as tmp:
        index = write_streams(args.pcap, str(tmp))
    print(f"{len(index)} TCP directions written to {args.out} (index.json)")
    return 0


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser, with every available subcommand.

    When ``argv`` names a plugged subcommand, only that one's parser is built
    and only its module imported (a live proxy's start-up CPU is mostly
    imports; ``run`` needs neither the bridge's packet sockets, the disk agent,
    nor replay's parser of every core flag).
    """
    parser = argparse.ArgumentParser(
        prog="colo-proxy",
        description="COLO-style packet comparison proxy for VM fault tolerance.",
    )
    parser.add_argument("--version", action=_VersionAction, nargs=0,
                        help="show the version and which core (compiled or pure) is in use")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in (sys.argv[1:] if argv is None else argv)
                   if not a.startswith("-")), None)
    only = chosen if any(chosen in names for names, _, _ in _PLUGGED) else None
    if only is None:  # replay's parser carries every core flag: not built for `run`
        _add_replay(sub)
        _add_streams(sub)
    collecting = gc.isenabled()
    gc.disable()  # imports make tens of thousands of objects and no garbage: without this,
    # collections walking them were a seventh of `run`'s start-up instructions
    try:
        for names, module, attr in _PLUGGED:
            if only is not None and only not in names:
                continue
            try:
                mod = importlib.import_module(module)
            except ImportError:
                continue
            getattr(mod, attr)(sub)
    finally:
        if collecting:
            gc.enable()
    return parser


class _VersionAction(argparse.Action):
    """--version, worked out only when asked (it imports every core module)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(_version())
        parser.exit()


def _version() -> str:
    """The version and which core is in use (compiled by mypyc, or pure Python)."""
    from colo_proxy import __version__
    from colo_proxy.core import build_kind

    return f"colo-proxy {__version__} ({build_kind()} core)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `colo-proxy` command."""
    collecting = gc.isenabled()
    gc.disable()  # the imports and parsers of start-up make tens of thousands of objects and
    # no garbage: collections walking them cost `run` more than its own set-up
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
    finally:
        if collecting:
            gc.enable()
    try:
        result: int = args.func(args)
    except ColoProxyError as err:
        print(f"colo-proxy: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
