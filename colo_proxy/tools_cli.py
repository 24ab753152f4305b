"""Subcommands for operators tuning and watching the proxy: explain, tune, learn.

Each command's work lives in its own module, imported only when it runs, so
`colo-proxy replay` does not pay for rich or matplotlib.
"""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register explain (and, where present, tune and learn)."""
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


def _explain(args: argparse.Namespace) -> int:
    from colo_proxy.explain import run_explain

    result: int = run_explain(args.source, args.divergence, max(0, args.context), args.color)
    return result
