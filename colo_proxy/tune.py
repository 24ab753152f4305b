"""`colo-proxy tune`: replay capture pairs over a grid of settings and show the trade-off.

Each setting is a set of Config fields (any field: timeouts, hold limits, the
checkpoint rate limit and burst, policy thresholds, mode, masks) over a base
config; each (setting, pair) is one replay in a worker process.  Per setting it
reports checkpoints per second by reason, the release latency the proxy added
(p50/p99/max), bytes held, time in MC and divergences, marks the settings on the
Pareto front of checkpoint rate against p99 latency, and writes the chosen one
as a TOML file `replay/run/bridge --config` read.

Figures come from the report's `policy` object when the core provides it (issue
11) and are computed from the replay otherwise: checkpoints from the report's
list, latency from each released primary frame's release stamp minus its
capture time, bytes held = bytes of the frames released later than they came.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from colo_proxy.config_args import load_toml, read_toml
from colo_proxy.core.config import Config
from colo_proxy.drivers.pcap import read_frames
from colo_proxy.errors import ConfigError, InputError
from colo_proxy.tomlw import dumps

Released = list[tuple[float, bytes]]


@dataclass(frozen=True, slots=True)
class Pair:
    """One capture pair and the replay options it needs."""

    primary: str
    secondary: str
    guest: str | None = None
    base: tuple[tuple[str, Any], ...] = ()
    """Config fields the pair's own expected.json asks for (golden directories)."""


@dataclass(frozen=True, slots=True)
class Job:
    setting: int
    pair: int
    primary: str
    secondary: str
    guest: str | None
    toml: str
    checkpoint_latency: float


# --------------------------------------------------------------------------- inputs


def parse_pairs(items: Sequence[str], guest: str | None) -> list[Pair]:
    """Directories (primary.pcap + secondary.pcap [+ expected.json]) or captures two by two."""
    pairs: list[Pair] = []
    loose: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            pairs.append(_dir_pair(path, guest))
        else:
            loose.append(item)
    if len(loose) % 2:
        raise ConfigError("tune: captures come in pairs (PRIMARY SECONDARY), or give directories")
    pairs += [Pair(a, b, guest) for a, b in zip(loose[::2], loose[1::2], strict=True)]
    if not pairs:
        raise ConfigError("tune: no capture pair given")
    return pairs


def _dir_pair(path: Path, guest: str | None) -> Pair:
    p, s = path / "primary.pcap", path / "secondary.pcap"
    if not (p.exists() and s.exists()):
        raise InputError(f"{path}: needs primary.pcap and secondary.pcap")
    base: list[tuple[str, Any]] = []
    exp = path / "expected.json"
    if exp.exists():  # a golden case: its --guest and core flags
        args = list(json.loads(exp.read_text()).get("args", []))
        names = {f.name for f in fields(Config)}
        for flag, val in zip(args[::2], args[1::2], strict=False):
            name = flag.lstrip("-").replace("-", "_")
            if name == "guest" and guest is None:
                guest = val
            elif name in names:
                base.append((name, val))
    return Pair(str(p), str(s), guest, tuple(base))


def _typed(name: str, text: str) -> Any:
    """A grid value from a flag, typed like the Config field's default."""
    default = {f.name: f.default for f in fields(Config)}.get(name)
    try:
        if isinstance(default, bool):
            return text.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"--grid {name}: bad value {text!r}") from None
    return text


def parse_grid(flags: Sequence[str], grid_file: str | None) -> dict[str, list[Any]]:
    """FIELD=v1,v2 flags and a TOML file's [tune] table (or top level): field -> values."""
    names = {f.name for f in fields(Config)}
    grid: dict[str, list[Any]] = {}
    if grid_file:
        doc = read_toml(grid_file)
        table = doc.get("tune", doc)
        for name, values in table.items():
            grid[name] = list(values) if isinstance(values, list) else [values]
    for flag in flags:
        name, sep, values = flag.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values:
            raise ConfigError(f"--grid {flag!r}: expected FIELD=V1,V2,...")
        grid[name] = [_typed(name, v.strip()) for v in values.split(",")]
    unknown = sorted(set(grid) - names)
    if unknown:
        raise ConfigError(f"tune: not a setting: {', '.join(unknown)}")
    return grid


def settings_of(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of the grid, in the order given."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(
        *(grid[k] for k in keys))] or [{}]


# --------------------------------------------------------------------------- one replay


def arrivals_of(primary: str) -> dict[bytes, deque[float]]:
    """Capture time of every primary frame, by its bytes (copies in order)."""
    out: dict[bytes, deque[float]] = defaultdict(deque)
    for ts, frame in read_frames(primary):
        out[bytes(frame)].append(ts)
    return out


def latencies(primary: str, released: Iterable[tuple[float, bytes]]) -> tuple[list[float], int]:
    """Added latency of each released frame (release stamp - capture time), bytes held."""
    arrivals = arrivals_of(primary)
    lat: list[float] = []
    held = 0
    for stamp, data in released:
        q = arrivals.get(bytes(data))
        if not q:
            continue
        d = max(0.0, stamp - q.popleft())
        lat.append(d)
        if d > 1e-9:
            held += len(data)
    return lat, held


def pair_figures(report: Mapping[str, Any], lat: list[float], held: int) -> dict[str, Any]:
    """What one pair's replay contributes to its setting's row."""
    policy = report.get("policy") or {}
    by_reason: dict[str, int] = defaultdict(int)
    if isinstance(policy.get("checkpoints_by_reason"), Mapping):
        for reason, n in policy["checkpoints_by_reason"].items():
            by_reason[str(reason)] += int(n)
    else:
        for ck in report.get("checkpoints", []):
            by_reason[ck["reason"]] += 1
    mode_time: Mapping[str, Any] = policy.get("mode_time") or {}
    return {
        "duration": float(report.get("duration") or 0.0),
        "checkpoints_by_reason": dict(by_reason),
        "latencies": lat,
        "policy_latency": policy.get("added_latency"),
        "bytes_held": int(policy.get("bytes_held", held)),
        "mc_time": float(mode_time.get("mc", 0.0)),
        "divergences": len(report.get("divergences", [])),
    }


def evaluate(job: Job) -> tuple[int, int, dict[str, Any]]:
    """Worker: one replay of one pair under one setting."""
    from colo_proxy.drivers.guest import parse_guest
    from colo_proxy.report import report_dict
    from colo_proxy.runtime.replay import Replay

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
        fh.write(job.toml)
    try:
        config = Config.from_mapping(load_toml(fh.name))
    finally:
        os.unlink(fh.name)
    released: Released = []
    replay = Replay(config, job.checkpoint_latency, lambda t, d: released.append((t, d)))
    res = replay.run(job.primary, job.secondary,
                     parse_guest(job.guest) if job.guest else None)
    report = report_dict(res, job.primary, job.secondary)
    lat, held = latencies(job.primary, released)
    return job.setting, job.pair, pair_figures(report, lat, held)


# --------------------------------------------------------------------------- rows


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def row_of(setting: Mapping[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine a setting's pairs: rates over the summed duration, latency over all frames."""
    duration = sum(p["duration"] for p in parts) or 1e-9
    by_reason: dict[str, int] = defaultdict(int)
    for p in parts:
        for reason, n in p["checkpoints_by_reason"].items():
            by_reason[reason] += n
    lat = [x for p in parts for x in p["latencies"]]
    given = [p["policy_latency"] for p in parts if isinstance(p["policy_latency"], Mapping)]
    if given and len(given) == len(parts):  # the core's own figures: the worst pair's
        latency = {k: max(float(g[k]) for g in given) for k in ("p50", "p99", "max")}
    else:
        latency = {"p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99), "max": max(lat, default=0.0)}
    return {
        "setting": dict(setting),
        "checkpoints_per_second": sum(by_reason.values()) / duration,
        "checkpoints_per_second_by_reason": {r: n / duration
                                             for r, n in sorted(by_reason.items())},
        "added_latency": latency,
        "bytes_held": sum(p["bytes_held"] for p in parts),
        "mc_time": sum(p["mc_time"] for p in parts),
        "divergences": sum(p["divergences"] for p in parts),
        "duration": duration,
    }


def pareto(rows: list[dict[str, Any]]) -> list[int]:
    """Indices of the rows no other row beats on checkpoint rate and p99 latency both."""
    pts = [(r["checkpoints_per_second"], r["added_latency"]["p99"]) for r in rows]
    front = []
    for i, (a, b) in enumerate(pts):
        if not any((c <= a and d <= b) and (c < a or d < b) for c, d in pts):
            front.append(i)
    return front


def choose(rows: list[dict[str, Any]], front: list[int], max_latency: float | None) -> int:
    """On the front: the fewest checkpoints within `max_latency` (p99), else the knee."""
    if max_latency is not None:
        ok = [i for i in front if rows[i]["added_latency"]["p99"] <= max_latency]
        if ok:
            return min(ok, key=lambda i: rows[i]["checkpoints_per_second"])
    top_c = max((rows[i]["checkpoints_per_second"] for i in front), default=0.0) or 1.0
    top_l = max((rows[i]["added_latency"]["p99"] for i in front), default=0.0) or 1.0
    return min(front, key=lambda i: rows[i]["checkpoints_per_second"] / top_c
               + rows[i]["added_latency"]["p99"] / top_l)


def setting_toml(base: Mapping[str, Any], setting: Mapping[str, Any],
                 note: str = "") -> str:
    """A --config file: the base settings with the setting's fields over them."""
    doc = {**base, **setting}
    head = f"# written by colo-proxy tune{': ' + note if note else ''}\n" if note else ""
    return head + dumps(doc)


def run_grid(pairs: list[Pair], settings: list[dict[str, Any]], base: Mapping[str, Any],
             checkpoint_latency: float, jobs: int, progress: Any = None,
             ) -> list[dict[str, Any]]:
    """Every (setting, pair) replay in worker processes; one row per setting."""
    work = [Job(i, k, p.primary, p.secondary, p.guest,
                setting_toml({**base, **dict(p.base)}, s), checkpoint_latency)
            for i, s in enumerate(settings) for k, p in enumerate(pairs)]
    parts: dict[int, list[dict[str, Any]]] = defaultdict(list)
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(evaluate, j) for j in work]
        for fut in as_completed(futures):
            setting, _pair, figures = fut.result()
            parts[setting].append(figures)
            if progress is not None:
                progress()
    return [row_of(s, parts[i]) for i, s in enumerate(settings)]
