"""`colo-proxy learn`: propose masks and flow rules from recordings of identical instances.

Two instances of the same server fed the same input differ only by noise (as
Diffy learns from two known-good instances), so every difference between their
outputs is a candidate.  Per guest-output TCP flow of each pair, both streams
are compared by offset; each maximal differing run is placed in its context:

* inside a `Name: value` line (HTTP headers, redis INFO) with both values of the
  same length: a mask on that line's value, anchored on the text before it,
  e.g. ``\\r\\nDate: ([^\\r\\n]*)`` on port 80;
* otherwise, a same-length token (digits, hex, a line): a mask anchored on the
  few bytes before it;
* a difference that changes a length, or a flow that differs almost everywhere
  (TLS, SSH: recognised from their first bytes): a ``mode = "mc"`` flow rule for
  its protocol and port.

Each proposal says how often the field occurs and differs and which divergences
it would remove (counted by applying all proposed masks to the streams again).
The result is TOML for the operator to review; nothing is applied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from colo_proxy.flowstream import read_flows
from colo_proxy.tune import Pair

EVERYWHERE = 0.25
"""A flow whose differing bytes exceed this share of its compared bytes is not maskable."""
SPECIAL = set(b".^$*+?{}[]\\|()")
LINE_VALUE = r"([^\r\n]*)"


def esc(raw: bytes) -> str:
    """A regex matching `raw` exactly, readable: only special and unprintable bytes escaped."""
    out = []
    for b in raw:
        if b == 13:
            out.append(r"\r")
        elif b == 10:
            out.append(r"\n")
        elif b in SPECIAL:
            out.append("\\" + chr(b))
        elif 32 <= b < 127:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    return "".join(out)


def runs(a: bytes, b: bytes) -> list[tuple[int, int]]:
    """Maximal [start, end) runs where the two streams differ, over their common length."""
    found = []
    i, n = 0, min(len(a), len(b))
    while i < n:
        if a[i] != b[i]:
            j = i
            while j < n and a[j] != b[j]:
                j += 1
            found.append((i, j))
            i = j
        else:
            i += 1
    return found


def _eol(data: bytes, pos: int) -> int:
    end = data.find(b"\n", pos)
    end = len(data) if end < 0 else end
    return end - 1 if end > 0 and data[end - 1:end] == b"\r" else end


_TOKEN = {"[0-9]": set(b"0123456789"), "[0-9a-f]": set(b"0123456789abcdef"),
          "[0-9A-Za-z]": set(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")}


def field_pattern(a: bytes, b: bytes, start: int, end: int) -> str | None:
    """The mask pattern for a differing run, or None when no same-length field holds it."""
    ls = a.rfind(b"\n", 0, start) + 1
    ea, eb = _eol(a, start), _eol(b, start)
    if ea != eb or end > ea:  # the line's length differs, or the run crosses lines
        return None
    line = a[ls:start]
    colon = line.find(b":")
    if colon > 0 and re.fullmatch(rb"[A-Za-z0-9_.-]+", line[:colon]):
        head = line[:colon + 1]
        head += line[colon + 1:][:len(line[colon + 1:]) - len(line[colon + 1:].lstrip(b" \t"))]
        nl = b"\r\n" if a[max(0, ls - 2):ls] == b"\r\n" else a[max(0, ls - 1):ls]
        return esc(nl + head) + LINE_VALUE
    for cls, chars in _TOKEN.items():
        if all(x in chars for x in a[start:end] + b[start:end]):
            fs, fe = start, end
            while fs > ls and a[fs - 1] in chars and b[fs - 1] in chars:
                fs -= 1
            while fe < ea and a[fe] in chars and b[fe] in chars:
                fe += 1
            prefix = a[max(0, fs - 6):fs]
            if prefix and a[max(0, fs - 6):fs] == b[max(0, fs - 6):fs]:
                return f"{esc(prefix)}({cls}{{{fe - fs}}})"
    return None


@dataclass
class Proposal:
    """A proposed mask or flow rule and the evidence for it."""

    kind: str  # "mask" or "mc"
    key: tuple[str, str, int]  # (pattern or reason, protocol, port)
    flows: set[str] = field(default_factory=set)
    pairs: set[int] = field(default_factory=set)
    differs: int = 0
    """Differing runs (divergences) this proposal explains."""
    removes: int = 0
    matches: int = 0
    """Occurrences of the field in the primary's streams."""
    differing: int = 0
    """Occurrences whose value differs between the two recordings."""
    masked_bytes: int = 0
    diff_bytes: int = 0
    example: tuple[bytes, bytes] = (b"", b"")


@dataclass
class Learned:
    masks: dict[tuple[str, str, int], Proposal] = field(default_factory=dict)
    rules: dict[tuple[str, str, int], Proposal] = field(default_factory=dict)
    flows: int = 0
    differing_flows: int = 0
    divergences: int = 0
    unexplained: list[tuple[str, int]] = field(default_factory=list)


def _proto_port(label: str) -> tuple[str, int, str]:
    """(protocol, source port, source address) of a report label."""
    proto, rest = label.split(" ", 1)
    src = rest.split(" > ", 1)[0]
    addr, _, port = src.rpartition(":")
    return proto.lower(), int(port) if port.isdigit() else 0, addr.strip("[]")


def _masked(data: bytes, patterns: list[re.Pattern[bytes]]) -> tuple[bytes, int, list[int]]:
    """`data` with every pattern's group 1 (else whole match) blanked; bytes and matches."""
    out = bytearray(data)
    blanked, counts = 0, []
    for pat in patterns:
        n = 0
        for m in pat.finditer(data):
            g = 1 if pat.groups else 0
            s, e = m.span(g)
            out[s:e] = bytes(e - s)
            blanked += e - s
            n += 1
        counts.append(n)
    return bytes(out), blanked, counts


def learn(pairs: list[Pair]) -> Learned:
    """Every proposal the pairs support, with how often and what each would save."""
    got = Learned()
    streams: list[tuple[int, str, bytes, bytes]] = []
    for k, pair in enumerate(pairs):
        pf, sf = read_flows(pair.primary), read_flows(pair.secondary)
        for label in sorted(set(pf) & set(sf)):
            proto, port, addr = _proto_port(label)
            if proto != "tcp" or (pair.guest is not None and addr != pair.guest):
                continue
            a, b = bytes(pf[label].stream), bytes(sf[label].stream)
            if not a and not b:
                continue
            got.flows += 1
            streams.append((k, label, a, b))
            found = runs(a, b)
            if not found and len(a) == len(b):
                continue
            got.differing_flows += 1
            got.divergences += len(found) + (len(a) != len(b))
            diff_bytes = sum(e - s for s, e in found)
            tls = a[:1] == b"\x16" and a[1:2] == b"\x03"
            ssh = a.startswith(b"SSH-")
            if tls or ssh or diff_bytes > EVERYWHERE * max(1, min(len(a), len(b))):
                why = "tls" if tls else "ssh" if ssh else "everywhere"
                _add_rule(got, why, proto, port, k, label, len(found) + (len(a) != len(b)),
                          diff_bytes)
                continue
            for s, e in found:
                pattern = field_pattern(a, b, s, e)
                if pattern is None:
                    continue
                prop = got.masks.setdefault((pattern, proto, port),
                                            Proposal("mask", (pattern, proto, port)))
                prop.flows.add(label)
                prop.pairs.add(k)
                prop.differs += 1
                prop.diff_bytes += e - s
                if prop.example == (b"", b""):
                    le = _eol(a, s)
                    ls = a.rfind(b"\n", 0, s) + 1
                    prop.example = (a[ls:le], b[ls:le])
    _verify(got, streams)
    return got


def _add_rule(got: Learned, why: str, proto: str, port: int, pair: int, label: str,
              divs: int, diff_bytes: int) -> None:
    prop = got.rules.setdefault((why, proto, port), Proposal("mc", (why, proto, port)))
    prop.flows.add(label)
    prop.pairs.add(pair)
    prop.differs += divs
    prop.removes += divs
    prop.diff_bytes += diff_bytes


def _verify(got: Learned, streams: list[tuple[int, str, bytes, bytes]]) -> None:
    """Apply the proposed masks: what each removes, and what is left (length changes: mc)."""
    masks = list(got.masks.values())
    ruled = {(p, port) for (_w, p, port) in got.rules}
    for k, label, a, b in streams:
        proto, port, _ = _proto_port(label)
        if (proto, port) in ruled and any(label in r.flows for r in got.rules.values()):
            continue
        mine = [m for m in masks if m.key[2] == port]
        pats = [re.compile(m.key[0].encode()) for m in mine]
        ma, _blanked, counts = _masked(a, pats)
        mb, _, _ = _masked(b, pats)
        before = runs(a, b)
        after = runs(ma, mb)
        left = {s for s, _ in after}
        for m, pat, n in zip(mine, pats, counts, strict=True):
            m.matches += n
            spans = [mt.span(1 if pat.groups else 0) for mt in pat.finditer(a)]
            m.masked_bytes += sum(e - s for s, e in spans)
            m.removes += sum(1 for s, e in before if s not in left
                             and any(x <= s and e <= y for x, y in spans))
            m.differing += sum(1 for x, y in spans if any(x <= s and e <= y for s, e in before))
        if after or len(a) != len(b):
            if len(a) != len(b):
                _add_rule(got, "length", proto, port, k, label,
                          len(after) + 1, sum(e - s for s, e in after))
            else:
                got.unexplained += [(label, s) for s, _ in after]


def to_toml(got: Learned) -> str:
    """The proposals as `[[masks]]` and `[[flow_rules]]` with their evidence as comments."""
    from colo_proxy.tomlw import dumps

    def show(raw: bytes) -> str:
        return raw.decode("latin-1").encode("unicode_escape").decode()[:70]

    masks = []
    for m in sorted(got.masks.values(), key=lambda p: -p.removes):
        note = (f"{m.differing} of {m.matches} occurrences differ ({len(m.flows)} flows, "
                f"{len(m.pairs)} pairs); removes {m.removes} of {got.divergences} divergences, "
                f"blanking {m.masked_bytes} bytes per recording\n"
                f"e.g. primary   {show(m.example[0])}\n     secondary {show(m.example[1])}")
        masks.append({"_comment": note, "pattern": m.key[0], "port": m.key[2],
                      "protocol": m.key[1]})
    rules = []
    for r in sorted(got.rules.values(), key=lambda p: -p.removes):
        why = {"tls": "TLS: differs from the ServerHello random on, in every connection",
               "ssh": "SSH: differs in every connection",
               "everywhere": "differs almost everywhere",
               "length": "its differences change lengths (no mask can line them up)"}[r.key[0]]
        note = (f"{why}; {len(r.flows)} flows, {r.diff_bytes} differing bytes; "
                f"compared, it gives {r.removes} divergences (checkpoints) that mc avoids")
        rules.append({"_comment": note, "mode": "mc", "protocol": r.key[1], "port": r.key[2]})
    doc: dict[str, Any] = {}
    if masks:
        doc["masks"] = masks
    if rules:
        doc["flow_rules"] = rules
    head = (f"# colo-proxy learn: {got.flows} flows compared, {got.differing_flows} differ, "
            f"{got.divergences} divergences.\n"
            "# Review before use: masks trade safety (masked bytes are not compared) for fewer "
            "checkpoints.\n")
    if got.unexplained:
        head += f"# left unexplained: {len(got.unexplained)} differing runs, e.g. " + ", ".join(
            f"{lab} @{off}" for lab, off in got.unexplained[:3]) + "\n"
    if not doc:
        head += "# nothing to propose: the recordings agree.\n"
    return head + (dumps(doc) if doc else "")
