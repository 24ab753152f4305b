#!/usr/bin/env python3
"""Expected verdicts for two independent recordings, from Wireshark's TCP reassembly.

The golden real-stack cases (tools/lab_capture_indep.py) must be judged by something
other than colo-proxy, so their guest output streams are reassembled by tshark
(``-z follow,tcp,raw``: Wireshark's "Follow TCP Stream") and compared with the
contract written down in pcaps/README.md:

* connections are paired by client address and port (the lab pins client ports);
* offset 0 is the first byte after the SYN (or the first byte seen, mid-stream);
* each maximal run of offsets ``i < min(len A, len B)`` with ``A[i] != B[i]`` is one
  ``payload`` divergence at the run's first offset; differing lengths add one
  ``length`` divergence at ``min(len A, len B)``.

What to know about the oracle (Wireshark 4.0): node 0 of a stream is the source of its
first packet; retransmitted and out-of-order bytes are placed by sequence number, the
first copy wins; a hole that is never filled is replaced by the text "[N bytes missing in
capture file]" (found here and refused: a golden stream must be complete).

Usage: ``tshark_follow.py PRIMARY SECONDARY --guest IP`` prints the expected divergences.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MISSING = re.compile(rb"^\[\d+ bytes missing in capture file\]\x00$")
BATCH = 64


@dataclass(frozen=True)
class Conversation:
    """One tshark TCP stream: its two endpoints and the bytes each one sent."""

    stream: int
    node0: tuple[str, int]
    node1: tuple[str, int]
    sent0: bytes  # node0 -> node1
    sent1: bytes  # node1 -> node0


def _tshark(args: list[str]) -> str:
    proc = subprocess.run(["tshark", "-n", *args], capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"tshark failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode("ascii", errors="replace")


def _endpoint(text: str) -> tuple[str, int]:
    host, port = text.strip().rsplit(":", 1)
    return host.strip("[]"), int(port)


def _parse_follow(text: str) -> dict[int, dict[str, Any]]:
    """tshark's raw follow output: per stream the nodes and (from node1?, bytes) records."""
    res: dict[int, dict[str, Any]] = {}
    cur: dict[str, Any] | None = None
    for line in text.split("\n"):
        if line.startswith("Filter: tcp.stream eq "):
            cur = {"records": []}
            res[int(line.rsplit(" ", 1)[1])] = cur
        elif cur is None or not line.strip() or line.startswith(("====", "Follow: ")):
            continue
        elif line.startswith("Node 0: "):
            cur["node0"] = _endpoint(line[8:])
        elif line.startswith("Node 1: "):
            cur["node1"] = _endpoint(line[8:])
        else:
            cur["records"].append((line.startswith("\t"), bytes.fromhex(line.strip())))
    return res


def conversations(pcap: Path) -> list[Conversation]:
    """Every TCP stream of ``pcap`` reassembled by tshark; refuses streams with holes."""
    ids = _tshark(["-r", str(pcap), "-Y", "tcp", "-T", "fields", "-e", "tcp.stream"])
    streams = sorted({int(x) for x in ids.split()})
    out: list[Conversation] = []
    for i in range(0, len(streams), BATCH):
        batch = streams[i : i + BATCH]
        args = ["-r", str(pcap), "-q"]
        for s in batch:
            args += ["-z", f"follow,tcp,raw,{s}"]
        parsed = _parse_follow(_tshark(args))
        for s in batch:
            st = parsed[s]
            sent: dict[bool, bytearray] = {False: bytearray(), True: bytearray()}
            for from1, data in st["records"]:
                if MISSING.match(data):
                    raise ValueError(f"{pcap}: stream {s} has a hole tshark could not fill")
                sent[from1] += data
            out.append(Conversation(s, st["node0"], st["node1"], bytes(sent[False]),
                                    bytes(sent[True])))
    return out


def guest_streams(pcap: Path, guest: str) -> dict[tuple[str, int], bytes]:
    """(client address, client port) -> bytes the guest sent on that connection."""
    out: dict[tuple[str, int], bytes] = {}
    for c in conversations(pcap):
        if c.node0[0] == guest:
            client, data = c.node1, c.sent0
        elif c.node1[0] == guest:
            client, data = c.node0, c.sent1
        else:
            continue
        if client in out:
            raise ValueError(f"{pcap}: client {client} used twice (pin distinct ports)")
        out[client] = data
    return out


def stream_divergences(a: bytes, b: bytes) -> list[dict[str, Any]]:
    """The contract: one payload divergence per maximal differing run, then length."""
    found: list[dict[str, Any]] = []
    n = min(len(a), len(b))
    i = 0
    while i < n:
        if a[i] != b[i]:
            found.append({"kind": "payload", "offset": i})
            while i < n and a[i] != b[i]:
                i += 1
        else:
            i += 1
    if len(a) != len(b):
        found.append({"kind": "length", "offset": n})
    return found


def sort_key(d: dict[str, Any]) -> tuple[str, int]:
    """Order of ``"divergence_order": "any"`` comparisons: (kind, offset), None first."""
    return (d["kind"], -1 if d["offset"] is None else d["offset"])


def expected_divergences(primary: Path, secondary: Path, guest: str,
                         ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sorted expected divergences and a per-connection summary of the two captures."""
    pri, sec = guest_streams(primary, guest), guest_streams(secondary, guest)
    if set(pri) != set(sec):
        raise ValueError(f"connections differ: {sorted(set(pri) ^ set(sec))}")
    found: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for client in sorted(pri):
        divs = stream_divergences(pri[client], sec[client])
        found += divs
        summary[f"{client[0]}:{client[1]}"] = {
            "primary_bytes": len(pri[client]), "secondary_bytes": len(sec[client]),
            "divergences": divs}
    return sorted(found, key=sort_key), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("primary", type=Path)
    parser.add_argument("secondary", type=Path)
    parser.add_argument("--guest", required=True, help="the guest's IP address")
    args = parser.parse_args(argv)
    divs, summary = expected_divergences(args.primary, args.secondary, args.guest)
    print(json.dumps({"divergences": divs, "connections": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
