"""How `tune` shows its rows: a rich table, a progress bar, and the trade-off plot."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from colo_proxy.errors import ConfigError


def setting_text(setting: Mapping[str, Any]) -> str:
    parts = []
    for k, v in setting.items():
        text = repr(v) if isinstance(v, list | dict) else str(v)
        parts.append(f"{k}={text if len(text) <= 40 else text[:37] + '...'}")
    return " ".join(parts) or "(base)"


def table(rows: list[dict[str, Any]], front: list[int], chosen: int) -> Table:
    t = Table(title="colo-proxy tune: * Pareto front (checkpoints/s vs p99), > chosen")
    for name, just in (("", "left"), ("#", "right"), ("setting", "left"),
                       ("ckpt/s", "right"), ("by reason /s", "left"), ("p50 ms", "right"),
                       ("p99 ms", "right"), ("max ms", "right"), ("bytes held", "right"),
                       ("MC s", "right"), ("div", "right")):
        t.add_column(name, justify=just)  # type: ignore[arg-type]
    for i, r in enumerate(rows):
        mark = (">" if i == chosen else " ") + ("*" if i in front else " ")
        lat = r["added_latency"]
        t.add_row(
            mark, str(i + 1), setting_text(r["setting"]),
            f"{r['checkpoints_per_second']:.3f}",
            " ".join(f"{k}:{v:.3f}" for k, v in r["checkpoints_per_second_by_reason"].items())
            or "-",
            f"{lat['p50'] * 1e3:.2f}", f"{lat['p99'] * 1e3:.2f}", f"{lat['max'] * 1e3:.2f}",
            str(r["bytes_held"]), f"{r['mc_time']:.3f}", str(r["divergences"]),
            style="bold" if i == chosen else None,
        )
    return t


@contextmanager
def progress_bar(total: int, console: Console) -> Iterator[Callable[[], None]]:
    with Progress("replays", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("replays", total=total)
        yield lambda: bar.advance(task)


def plot(rows: list[dict[str, Any]], front: list[int], chosen: int, path: str) -> None:
    """Checkpoint rate against p99 added latency, the front joined, the chosen ringed."""
    try:
        import matplotlib
    except ImportError as err:
        raise ConfigError("--plot needs matplotlib: pip install 'colo-proxy[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["checkpoints_per_second"] for r in rows]
    ys = [r["added_latency"]["p99"] * 1e3 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    ax.scatter(xs, ys, color="tab:gray", label="settings")
    pts = sorted((xs[i], ys[i]) for i in front)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue",
            label="Pareto front")
    ax.scatter([xs[chosen]], [ys[chosen]], s=200, facecolors="none", edgecolors="tab:red",
               linewidths=2, label="chosen")
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("checkpoints per second")
    ax.set_ylabel("added release latency p99 (ms)")
    ax.set_title("colo-proxy tune: checkpoint rate vs added latency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
