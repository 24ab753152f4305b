"""`colo-proxy explain`: why one divergence happened, from a report or a saved pair.

A report names a divergence by flow, kind and offset; an operator wants to see
the bytes.  This reads both captures again (only the diverging flow), lines the
two streams up by offset around the divergence (text where printable, hex
otherwise, differing bytes highlighted), lists the frames that carried those
bytes with their capture times, and names the rule or threshold that fired and
the checkpoint that followed.  The input is a replay report (`replay --json`)
or a directory written by `--save-divergences` (meta.json + a pcap pair).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from colo_proxy.errors import InputError
from colo_proxy.flowstream import FlowData, Segment, read_flows

ROW = 16
KNOWN_KEYS = {"time", "flow", "kind", "offset", "detail", "primary_bytes", "secondary_bytes"}
WHY = {
    "payload": "compare: the same stream offset carries different bytes on the two sides",
    "length": "compare: one side sent data past the other's FIN/RST",
    "close": "compare: FIN against RST, or a close at different offsets",
    "handshake": "compare: SYN/SYN-ACK options differ (MSS, window scale, SACK, timestamps)",
    "udp": "compare: a UDP datagram has no equal partner on the other side",
    "icmp": "compare: an ICMP message has no equal partner on the other side",
    "other": "compare: an IP datagram has no equal partner on the other side",
    "timeout": "threshold compare_timeout = {compare_timeout} s: primary output stayed "
               "unmatched that long",
    "ack": "threshold compare_timeout = {compare_timeout} s: the bytes matched but the "
           "primary's ACK stayed ahead of the secondary's (ACK gate)",
}


@dataclass(frozen=True, slots=True)
class Case:
    """What explain needs about one divergence (from a report or a saved pair)."""

    divergence: dict[str, Any]
    number: int
    total: int
    primary: str
    secondary: str
    report: dict[str, Any]


def load_cases(source: str) -> list[Case]:
    """Every divergence of a report file, or the one of a saved-divergence directory."""
    path = Path(source)
    if path.is_dir():
        meta_path = path / "meta.json"
        if not meta_path.exists():
            raise InputError(f"{source}: no meta.json (not a --save-divergences directory)")
        meta = _read_json(meta_path)
        return [Case(meta["divergence"], 1, 1, str(path / "primary.pcap"),
                     str(path / "secondary.pcap"), meta)]
    report = _read_json(path)
    if "divergences" not in report:
        raise InputError(f"{source}: not a replay report (no divergences)")
    divs = report["divergences"]
    return [Case(d, n, len(divs), _locate(report["primary"], path),
                 _locate(report["secondary"], path), report)
            for n, d in enumerate(divs, 1)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from err
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not JSON: {err}") from err
    return data


def _locate(capture: str, report: Path) -> str:
    """A capture path as written in the report: as given, else next to the report."""
    p = Path(capture)
    if p.exists() or p.is_absolute():
        return capture
    near = report.parent / p.name
    return str(near) if near.exists() else capture


# --------------------------------------------------------------------------- rendering


def _printable(b: int) -> bool:
    return 32 <= b < 127 or b in (9, 10, 13)


def _cells(chunk: bytes, as_text: bool) -> list[str]:
    if as_text:
        return [chr(b) if 32 <= b < 127 else "." for b in chunk]
    return [f"{b:02x}" for b in chunk]


def side_by_side(a: bytes, b: bytes, start: int, end: int, color: bool) -> list[Text]:
    """Rows of ROW bytes from `start` to `end`: primary | secondary, differences marked."""
    rows: list[Text] = []
    for lo in range(start - start % ROW, end, ROW):
        pa, pb = a[lo:lo + ROW], b[lo:lo + ROW]
        if not pa and not pb:
            break
        as_text = all(_printable(x) for x in pa + pb)
        diff = [i >= len(pa) or i >= len(pb) or pa[i] != pb[i]
                for i in range(max(len(pa), len(pb)))]
        width = ROW if as_text else ROW * 3 - 1
        line = Text(f"{lo:>10}  ")
        marks = " " * 12
        for chunk, sep in ((pa, " | "), (pb, "")):
            cells = _cells(chunk, as_text)
            used = 0
            for i, cell in enumerate(cells):
                if not as_text and i:
                    line.append(" ")
                    marks += " "
                    used += 1
                line.append(cell, style="bold white on red" if color and diff[i] else None)
                marks += ("^" if diff[i] else " ") * len(cell)
                used += len(cell)
            line.append(" " * (width - used) + sep)
            marks += " " * (width - used) + " " * len(sep)
        rows.append(line)
        if not color and any(diff):
            rows.append(Text(marks.rstrip()))
    return rows


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _frame_line(side: str, seg: Segment, rel: float) -> str:
    where = (f"offset {seg.offset}..{seg.offset + seg.length}" if seg.offset is not None
             else f"{seg.length} bytes")
    return f"  {side:<9} frame #{seg.index:<6} {_stamp(seg.time)} UTC  (t={rel:+.6f} s)  {where}"


def _frames(case: Case, pri: FlowData | None, sec: FlowData | None, span: int) -> list[str]:
    """The frames that carried the differing bytes (or the nearest datagrams) on each side."""
    rep, div = case.report, case.divergence
    epoch = float(rep.get("epoch") or 0.0)
    shift = float(rep.get("clock_offset") or 0.0)
    off = div.get("offset")
    lines: list[str] = []
    for side, flow, delta in (("primary", pri, 0.0), ("secondary", sec, shift)):
        if flow is None:
            lines.append(f"  {side:<9} (no frame of this flow in the capture)")
            continue
        if off is not None:
            segs = [s for s in flow.segments if s.offset is not None
                    and s.offset < off + max(span, 1) and off < s.offset + s.length]
            if not segs:  # a close or a handshake: the frames without payload near it
                segs = [s for s in flow.segments if s.length == 0][:2]
        else:
            when = float(div.get("time", 0.0)) + epoch + delta
            segs = sorted(flow.segments, key=lambda s: abs(s.time - when))[:3]
            segs.sort(key=lambda s: s.index)
        lines += [_frame_line(side, s, s.time - delta - epoch) for s in segs[:6]]
        if len(segs) > 6:
            lines.append(f"  {side:<9} ... {len(segs) - 6} more frames")
    return lines


def _rule(case: Case) -> list[str]:
    """The rule or threshold that fired, and the checkpoint that followed."""
    rep, div = case.report, case.divergence
    config = rep.get("config") or {}
    kind = str(div.get("kind"))
    why = WHY.get(kind, f"kind {kind}")
    try:
        why = why.format(**config)
    except KeyError:
        why = why.replace("{compare_timeout}", "?")
    lines = [f"rule:      {why}"]
    extra = {k: v for k, v in div.items() if k not in KNOWN_KEYS}
    if extra:  # what later cores add (flow mode, mask, policy rule): shown as given
        lines.append("           " + ", ".join(f"{k}={v}" for k, v in sorted(extra.items())))
    t = float(div.get("time", 0.0))
    after = [c for c in rep.get("checkpoints", []) if c["time"] >= t - 1e-9]
    if after:
        ck = after[0]
        wait = ck["time"] - t
        note = ""
        if wait > 1e-6 and "min_checkpoint_interval" in config:
            note = (f" (rate limit: min_checkpoint_interval = "
                    f"{config['min_checkpoint_interval']} s after the previous one)")
        lines.append(f"then:      checkpoint '{ck['reason']}' at t={ck['time']:.6f} s, "
                     f"{wait:.6f} s later{note}")
    else:
        lines.append("then:      no checkpoint followed in this report")
    return lines


def explain_case(case: Case, context: int, color: bool) -> list[Text]:
    """The whole explanation of one divergence as printable lines."""
    div = case.divergence
    label = str(div.get("flow", ""))
    flows_p = read_flows(case.primary, [label])
    flows_s = read_flows(case.secondary, [label])
    pri, sec = flows_p.get(label), flows_s.get(label)
    off = div.get("offset")
    out = [Text(f"divergence {case.number} of {case.total}: {div.get('kind')}"
                + ("" if off is None else f" at offset {off}")
                + f", t={float(div.get('time', 0.0)):.6f} s", style="bold"),
           Text(f"flow:      {label}")]
    if div.get("detail"):
        out.append(Text(f"detail:    {div['detail']}"))
    out += [Text(x) for x in _rule(case)]
    span = max(len(div.get("primary_bytes", "")), len(div.get("secondary_bytes", ""))) // 2
    if off is not None and pri is not None and sec is not None:
        lo, hi = max(0, off - context), off + max(span, 1) + context
        out.append(Text(f"bytes {lo}..{hi} (primary | secondary; "
                        + ("differences highlighted)" if color else "^ marks differences)")))
        out += side_by_side(bytes(pri.stream), bytes(sec.stream), lo, hi, color)
    elif div.get("primary_bytes") or div.get("secondary_bytes"):
        a, b = bytes.fromhex(div["primary_bytes"]), bytes.fromhex(div["secondary_bytes"])
        out.append(Text("datagram bytes from the first difference (primary | secondary)"))
        out += side_by_side(a, b, 0, max(len(a), len(b)), color)
    out.append(Text("frames (times relative to the report's first frame; the secondary's "
                    "shifted by the clock offset):"))
    out += [Text(x) for x in _frames(case, pri, sec, span)]
    return out


def run_explain(source: str, number: int | None, context: int, color_mode: str) -> int:
    """Print the explanation of divergence `number` (from 1), or of every one."""
    cases = load_cases(source)
    if not cases:
        print("no divergence in this report")
        return 0
    if number is not None:
        if not 1 <= number <= len(cases):
            raise InputError(f"--divergence: the report has divergences 1..{len(cases)}")
        cases = [cases[number - 1]]
    color = sys.stdout.isatty() if color_mode == "auto" else color_mode == "always"
    console = Console(force_terminal=color, no_color=not color, highlight=False,
                      soft_wrap=True, width=200)
    for k, case in enumerate(cases):
        if k:
            console.print()
        for line in explain_case(case, context, color):
            console.print(line)
    return 0
