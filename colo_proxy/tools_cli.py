"""Subcommands for operators tuning and watching the proxy: explain, tune, learn.

Each command's work lives in its own module, imported only when it runs, so
`colo-proxy replay` does not pay for rich or matplotlib.
"""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register explain, tune and learn."""
    p = sub.add_parser(
        "explain", help="show why a divergence happened (bytes side by side, frames, rule)",
        description="Explain divergences of a replay report (replay --json > r.json) or of a "
                    "directory written by run/bridge --save-divergences.",
    )
    p.add_argument("source", metavar="REPORT.json|DIR")
    p.add_argument("--divergence", type=int, metavar="N",
                   help="the Nth divergence of the report, from 1 (default: every one)")
    p.add_argument("--context", type=int, default=48, metavar="BYTES",
                   help="bytes shown before and after the difference (default 48)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="highlight differing bytes (default: when stdout is a terminal)")
    p.set_defaults(func=_explain)
    _add_tune(sub)
    _add_learn(sub)


def _add_learn(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "learn", help="propose masks and flow rules from recordings of identical instances",
        description="Compare pairs recorded on two identical instances (every difference is "
                    "noise), propose [[masks]] for same-length fields and [[flow_rules]] "
                    "mode=mc for flows whose differences change length or are everywhere, "
                    "with how often each occurs and what it would save; write them as TOML "
                    "for review (nothing is applied).",
    )
    p.add_argument("pairs", nargs="+", metavar="PAIR",
                   help="PRIMARY SECONDARY captures (two by two) or directories holding "
                        "primary.pcap and secondary.pcap")
    p.add_argument("--guest", metavar="ADDR",
                   help="only the output of this address (two-way captures)")
    p.add_argument("--out", default="learned.toml", metavar="FILE.toml",
                   help="where the proposals are written (default learned.toml)")
    p.set_defaults(func=_learn)


def _learn(args: argparse.Namespace) -> int:
    from colo_proxy import learn, tune

    pairs = tune.parse_pairs(args.pairs, args.guest)
    text = learn.to_toml(learn.learn(pairs))
    with open(args.out, "w") as fh:
        fh.write(text)
    print(text, end="")
    print(f"(written to {args.out}; review it, then use it with --config)")
    return 0


def _add_tune(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tune", help="replay capture pairs over a grid of settings; show the trade-off",
        description="Replay each pair under every setting of a grid (in parallel), print a row "
                    "per setting (checkpoints/s by reason, added latency p50/p99/max, bytes "
                    "held, time in MC, divergences), mark the Pareto front of checkpoint rate "
                    "against p99 latency and write the chosen setting as a --config TOML.",
    )
    p.add_argument("pairs", nargs="+", metavar="PAIR",
                   help="PRIMARY SECONDARY captures (two by two) or directories holding "
                        "primary.pcap and secondary.pcap (a golden case's expected.json "
                        "args are used)")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                   help="values of one setting (repeatable; the grid is their product)")
    p.add_argument("--grid-file", metavar="FILE.toml",
                   help="grid as TOML: FIELD = [values...] at the top level or in [tune]")
    p.add_argument("--config", metavar="FILE.toml", help="base settings the grid varies")
    p.add_argument("--guest", metavar="ADDR", help="guest address for two-way captures")
    p.add_argument("--checkpoint-latency", type=float, default=0.0, metavar="S",
                   help="simulated checkpoint duration (default 0)")
    p.add_argument("--jobs", type=int, default=0, metavar="N",
                   help="worker processes (default: the machine's cores)")
    p.add_argument("--max-latency", type=float, metavar="S",
                   help="choose the front's fewest checkpoints/s with p99 latency within S "
                        "(default: the front's knee)")
    p.add_argument("--out", default="tune-best.toml", metavar="FILE.toml",
                   help="where the chosen setting is written (default tune-best.toml)")
    p.add_argument("--json", metavar="FILE", help="also write every row as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="save the trade-off plot (needs matplotlib: colo-proxy[plot])")
    p.set_defaults(func=_tune)


def _tune(args: argparse.Namespace) -> int:
    import json
    import os
    import sys

    from rich.console import Console

    from colo_proxy import tune, tune_view
    from colo_proxy.config_args import load_toml

    pairs = tune.parse_pairs(args.pairs, args.guest)
    grid = tune.parse_grid(args.grid, args.grid_file)
    settings = tune.settings_of(grid)
    base = load_toml(args.config) if args.config else {}
    err = Console(stderr=True)
    jobs = args.jobs or os.cpu_count() or 1
    with tune_view.progress_bar(len(settings) * len(pairs), err) as step:
        rows = tune.run_grid(pairs, settings, base, args.checkpoint_latency, jobs, step)
    front = tune.pareto(rows)
    chosen = tune.choose(rows, front, args.max_latency)
    Console(width=200).print(tune_view.table(rows, front, chosen))
    note = f"row {chosen + 1} of {len(rows)}, " + tune_view.setting_text(rows[chosen]["setting"])
    with open(args.out, "w") as fh:
        fh.write(tune.setting_toml(base, rows[chosen]["setting"], note))
    print(f"chosen: row {chosen + 1}; written to {args.out}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "pareto": [i + 1 for i in front], "chosen": chosen + 1},
                      fh, indent=2)
    if args.plot:
        tune_view.plot(rows, front, chosen, args.plot)
    return 0


def _explain(args: argparse.Namespace) -> int:
    from colo_proxy.explain import run_explain

    result: int = run_explain(args.source, args.divergence, max(0, args.context), args.color)
    return result
