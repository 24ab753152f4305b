"""Replay reports: the JSON contract and the human summary.

The JSON keys are a contract that scripts rely on; add keys, never rename.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from array import array
from collections import Counter
from typing import Any

from colo_proxy.core.events import Divergence
from colo_proxy.runtime.replay import ReplayResult


def _guest_text(guest: bytes | None) -> str | None:
    if guest is None:
        return None
    if len(guest) == 6:
        return ":".join(f"{b:02x}" for b in guest)
    return str(ipaddress.ip_address(guest))


def _div_json(div: Divergence, start: float) -> dict[str, Any]:
    return {
        "time": round(div.time - start, 6),
        "flow": div.flow,
        "kind": div.kind.value,
        "offset": div.offset,
        "detail": div.detail,
        "primary_bytes": div.primary.hex(),
        "secondary_bytes": div.secondary.hex(),
    }


def _alignment_json(res: ReplayResult) -> dict[str, Any]:
    """clock_offset applied to the secondary capture, how it was estimated, warnings."""
    al = res.alignment
    if al is None:
        return {"clock_offset": 0.0, "clock_offset_estimate": None, "warnings": []}
    est = al.estimate
    return {
        "clock_offset": round(al.applied, 6),
        "clock_offset_estimate": {
            "offset": None if est.offset is None else round(est.offset, 6),
            "method": est.method, "matches": est.matches, "spread": round(est.spread, 6),
        },
        "warnings": list(al.warnings),
    }


def _plain(value: Any) -> Any:
    """A JSON-safe copy (config values may be tuples, bytes patterns or enums)."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return str(getattr(value, "value", value))


def _config_json(res: ReplayResult) -> dict[str, Any] | None:
    """Every threshold the replay ran with (explain and tune read them back)."""
    if res.config is None:
        return None
    return {f.name: _plain(getattr(res.config, f.name)) for f in dataclasses.fields(res.config)}


def latency_json(samples: array[float] | list[float]) -> dict[str, float | int]:
    """p50, p99 and max of added release latencies (seconds), and how many."""
    if not samples:
        return {"frames": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(samples)
    n = len(ordered)
    return {
        "frames": n,
        "p50": round(ordered[(n - 1) // 2], 6),
        "p99": round(ordered[min(n - 1, (n * 99) // 100)], 6),
        "max": round(ordered[-1], 6),
    }


def _policy_json(res: ReplayResult, stats: dict[str, Any]) -> dict[str, Any]:
    """The hybrid policy's figures: checkpoint rate by reason, added latency, modes."""
    policy = dict(stats.pop("policy", {}) or {})
    duration = max(res.duration, 1e-9)
    reasons = Counter(r for _, r in res.checkpoints)
    everything = array("d")
    for samples in res.latency.values():
        everything.extend(samples)
    policy.update({
        "checkpoints_per_second": round(len(res.checkpoints) / duration, 3),
        "checkpoints_by_reason": dict(sorted(reasons.items())),
        "checkpoints_per_second_by_reason": {
            r: round(n / duration, 3) for r, n in sorted(reasons.items())
        },
        "added_latency": latency_json(everything),
        "added_latency_by_vm_mode": {m: latency_json(v) for m, v in sorted(res.latency.items())},
        "bytes_held_peak": res.peak_held_bytes,
        "bytes_held": res.peak_held_bytes,
        "duration": round(res.duration, 6),
        "switches": [
            {"time": round(sw.time - res.start_time, 6), "scope": sw.scope, "from": sw.old,
             "to": sw.new, "reason": sw.reason} for sw in res.switches
        ],
    })
    return policy


def policy_warnings(policy: dict[str, Any]) -> list[str]:
    """What the operator traded for fewer checkpoints, said in every report."""
    out = []
    if policy.get("masked_bytes"):
        out.append(f"masks blanked {policy['masked_bytes']} differing bytes: masks trade "
                   "safety (those bytes are not compared) for fewer checkpoints")
    if policy.get("frames_passthrough"):
        out.append(f"{policy['frames_passthrough']} primary frames passed through unprotected "
                   "(passthrough flow rules)")
    return out


def report_dict(res: ReplayResult, primary: str, secondary: str) -> dict[str, Any]:
    """The replay report as a JSON-ready dict (times in seconds from the first frame)."""
    stats = dict(res.stats)
    policy = _policy_json(res, stats)
    alignment = _alignment_json(res)
    alignment["warnings"] = alignment["warnings"] + policy_warnings(policy)
    return {
        "primary": primary,
        "secondary": secondary,
        "guest": _guest_text(res.guest),
        "primary_frames": res.primary_frames,
        "secondary_frames": res.secondary_frames,
        "primary_guest_frames": res.primary_guest_frames,
        "secondary_guest_frames": res.secondary_guest_frames,
        "client_frames": res.client_frames,
        "primary_bytes": res.primary_bytes,
        "secondary_bytes": res.secondary_bytes,
        "released_frames": res.released_frames,
        "released_payload_bytes": stats.pop("released_payload_bytes"),
        "held_frames": res.held_frames,
        "final_flush": bool(res.flushed_frames),
        "flushed_frames": res.flushed_frames,
        "checkpoints": [
            {"time": round(t - res.start_time, 6), "reason": r} for t, r in res.checkpoints
        ],
        "divergences": [_div_json(d, res.start_time) for d in res.divergences],
        "overlap_conflicts": [
            {"time": round(c.time - res.start_time, 6), "flow": c.flow, "side": c.side,
             "offset": c.offset} for c in res.overlap_conflicts
        ],
        "malformed": stats.pop("malformed"),
        "uncompared": stats.pop("uncompared"),
        "flows": stats.pop("flows_created", 0),
        **alignment,
        "policy": policy,
        "epoch": res.epoch,
        "config": _config_json(res),
        "checkpoint_latency": res.checkpoint_latency,
        "duration": round(res.duration, 6),
        "counters": {k: v for k, v in sorted(stats.items()) if k not in ("released_frames",)},
    }


def hexdump(data: bytes, width: int = 16) -> str:
    """One line of hex and printable ASCII."""
    hexpart = " ".join(f"{b:02x}" for b in data[:width])
    text = "".join(chr(b) if 32 <= b < 127 else "." for b in data[:width])
    return f"{hexpart:<{width * 3}} |{text}|"


def summary_text(report: dict[str, Any]) -> str:
    """A readable summary of a report dict."""
    lines = [
        f"primary   {report['primary']}: {report['primary_frames']} frames "
        f"({report['primary_guest_frames']} from the guest), {report['primary_bytes']} bytes",
        f"secondary {report['secondary']}: {report['secondary_frames']} frames "
        f"({report['secondary_guest_frames']} from the guest), {report['secondary_bytes']} bytes",
    ]
    if report["guest"] is not None:
        lines.append(f"guest {report['guest']}; client frames (input, not compared): "
                     f"{report['client_frames']}")
    lines.append(f"flows: {report['flows']}")
    est = report["clock_offset_estimate"]
    how = f" (estimated from {est['method']})" if est and est["offset"] is not None else ""
    lines.append(f"secondary clock offset applied: {report['clock_offset']:+.6f} s{how}")
    lines.append(
        f"released: {report['released_frames']} frames "
        f"({report['released_payload_bytes']} TCP payload bytes); "
        f"held at end of input: {report['held_frames']}"
    )
    if report["final_flush"]:
        lines.append(f"final flush checkpoint released {report['flushed_frames']} held frames")
    reasons: dict[str, int] = {}
    for ck in report["checkpoints"]:
        reasons[ck["reason"]] = reasons.get(ck["reason"], 0) + 1
    text = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) or "none"
    lines.append(f"checkpoints: {len(report['checkpoints'])} ({text})")
    lines.append(f"divergences: {len(report['divergences'])}")
    for d in report["divergences"][:20]:
        where = "" if d["offset"] is None else f" at offset {d['offset']}"
        detail = f" ({d['detail']})" if d["detail"] else ""
        lines.append(f"  {d['time']:.6f}s {d['kind']}{where}{detail}: {d['flow']}")
        if d["primary_bytes"] or d["secondary_bytes"]:
            lines.append("    primary   " + hexdump(bytes.fromhex(d["primary_bytes"])))
            lines.append("    secondary " + hexdump(bytes.fromhex(d["secondary_bytes"])))
    if len(report["divergences"]) > 20:
        lines.append(f"  ... {len(report['divergences']) - 20} more (see --json)")
    if report["overlap_conflicts"]:
        lines.append(f"overlap conflicts (same side, same offset, different bytes; first copy "
                     f"kept): {len(report['overlap_conflicts'])}")
        for c in report["overlap_conflicts"][:5]:
            lines.append(f"  {c['time']:.6f}s {c['side']} at offset {c['offset']}: {c['flow']}")
    policy = report.get("policy")
    if policy:
        lat = policy["added_latency"]
        lines.append(
            f"policy: VM mode {policy['vm_mode']} (forced: {policy['forced']}); "
            f"{policy['checkpoints_per_second']} checkpoints/s; added latency "
            f"p50 {lat['p50'] * 1000:.3g} ms, p99 {lat['p99'] * 1000:.3g} ms, "
            f"max {lat['max'] * 1000:.3g} ms"
        )
        times = ", ".join(f"{m} {t:.3g} s" for m, t in policy["mode_time"].items())
        classes = ", ".join(f"{k} {v}" for k, v in policy["flows_by_class"].items() if v)
        lines.append(f"  time in mode: {times}; flows by class: {classes or 'none'}; "
                     f"switches: {len(policy['switches'])}")
        for sw in policy["switches"][:10]:
            lines.append(f"  {sw['time']:.6f}s {sw['scope']}: {sw['from']} -> {sw['to']} "
                         f"({sw['reason']})")
    for warning in report.get("warnings", []):
        lines.append(f"warning: {warning}")
    for name in ("malformed", "uncompared"):
        if report[name]:
            parts = ", ".join(f"{k} {v}" for k, v in sorted(report[name].items()))
            lines.append(f"{name}: {parts}")
    return "\n".join(lines)


def to_json(report: dict[str, Any]) -> str:
    """The report as indented JSON text."""
    return json.dumps(report, indent=2, sort_keys=False)
