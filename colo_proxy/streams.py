"""`colo-proxy streams`: every TCP direction of a capture, reassembled, to files.

This exposes the same reassembly the comparison uses (StreamBuffer) so it
can be checked against an independent implementation such as tshark's
`-z follow,tcp,raw` (tools/check_streams.py does).  Semantics: a direction
starts at SYN + 1, or at the first segment seen that carries data (a pure ACK
does not start it); bytes before that are dropped; the first copy of a byte
wins and a later copy that differs is counted in `conflicts`; a hole that is
never filled is recorded in `gaps` and the data after it is written without
filler.  A SYN (without RST or FIN) with a new ISN starts a new stream.  IP
fragments are reassembled and IP-in-IP / 6in4 tunnels unwrapped; a datagram
longer than its captured frame is dropped, as a receiver would.
"""

from __future__ import annotations

import ipaddress
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from colo_proxy.core.fragments import FragmentTable
from colo_proxy.core.packet import (
    PROTO_TCP,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    IpPacket,
    parse_ip,
    parse_tcp,
)
from colo_proxy.core.reassembly import StreamBuffer
from colo_proxy.core.seq import HALF32, MASK32
from colo_proxy.drivers.pcap import read_frames
from colo_proxy.errors import InputError

MAX_FRAGMENTS = 65536 // 8
MAX_TUNNEL_DEPTH = 4
KEEP_WRITTEN = 16 * 1024 * 1024
"""Written bytes kept per direction so later copies are compared (> Linux's 6 MiB rwnd)."""
KEEP_WRITTEN_TOTAL = 256 * 1024 * 1024
"""All directions together; beyond it the least recently active ones forget theirs."""
_TUNNELS = {4: b"\x08\x00", 41: b"\x86\xdd"}  # IP protocol -> ethertype of the inner packet

DirKey = tuple[tuple[int, ...], bytes, bytes, int, int]


class _Files:
    """Output files, at most `limit` of them open at a time.

    A capture can hold more TCP directions than a process may open files
    (the usual soft limit is 1024), so handles are reopened for appending.
    """

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._open: OrderedDict[Path, BinaryIO] = OrderedDict()

    def create(self, path: Path) -> None:
        path.write_bytes(b"")

    def write(self, path: Path, data: bytes | bytearray) -> None:
        f = self._open.pop(path, None)
        if f is None:
            if len(self._open) >= self.limit:
                self._open.popitem(last=False)[1].close()
            f = path.open("ab")
        self._open[path] = f
        f.write(data)

    def close(self, path: Path) -> None:
        f = self._open.pop(path, None)
        if f is not None:
            f.close()


@dataclass
class _Direction:
    index: int
    key: DirKey
    isn: int
    files: _Files
    path: Path
    name: str
    stream: StreamBuffer = field(default_factory=StreamBuffer)
    flushed: int = 0
    """Stream offset up to which bytes were written to the file."""
    written: int = 0
    gaps: list[list[int]] = field(default_factory=list)
    segments: int = 0
    closed: bool = False

    def add(self, seq: int, payload: bytes) -> None:
        # Unwrap next to the next expected byte, as a receiver judges a segment
        # (against RCV.NXT) and Wireshark does: unwrapping next to the previous
        # segment let one segment with a wild sequence number (2**31 away) move
        # the reference, and every later segment then fell below `base`.
        near = self.stream.end
        off = near + ((((seq - self.isn) - near + HALF32) & MASK32) - HALF32)
        self.segments += 1
        self.stream.add(off, payload)
        self._drain()

    def _drain(self) -> None:
        """Write the bytes that became contiguous; keep the last KEEP_WRITTEN of them.

        Written bytes stay in the buffer for a while so that a later copy of
        them (a retransmission, a keep-alive) is still compared and counted
        as a conflict when it differs; consuming them at once would make every
        such copy fall below `base` and be ignored.
        """
        st = self.stream
        if st.end > self.flushed:
            self.files.write(self.path, st.buf[self.flushed - st.base :])
            self.written += st.end - self.flushed
            self.flushed = st.end
        excess = len(st.buf) - KEEP_WRITTEN
        if excess > 0:
            st.consume(excess)

    def close(self) -> None:
        """Write what waits beyond holes, recording each hole."""
        if self.closed:
            return
        self.closed = True
        st = self.stream
        for start, piece in list(st.ooo):
            if start > st.end:
                self.gaps.append([self.written, start - st.end])
                st.reset(start)
                self.flushed = start
            st.add(start, piece)
            self._drain()
        self.files.close(self.path)
        st.reset(st.end)  # free the memory; the counters stay


def _forget_written(active: OrderedDict[DirKey, _Direction], need: int) -> int:
    """Drop kept written bytes, least recently active direction first; return how many."""
    freed = 0
    for d in active.values():
        if freed >= need:
            break
        st = d.stream
        n = min(d.flushed, st.end) - st.base
        if n > 0:
            st.consume(n)
            freed += n
    return freed


def _addr(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def _tcp_datagram(
    frame: bytes, ts: float, frags: FragmentTable[None]
) -> tuple[IpPacket, bytes, int, int] | None:
    """(ip, buffer, TCP start, TCP end) of a frame's TCP segment, or None.

    Fragments are reassembled first; IP-in-IP (4) and IPv6-in-IP (41, 6in4)
    are unwrapped, keeping the outer VLAN tags, like Wireshark does.
    """
    data, vlan = frame, None
    for _ in range(MAX_TUNNEL_DEPTH + 1):
        ip = parse_ip(data, 0)
        if not isinstance(ip, IpPacket):
            return None
        if vlan is None:
            vlan = ip.vlan
        else:
            ip = ip._replace(vlan=vlan)
        buf, l4, end = data, ip.l4, ip.l4_end
        if ip.frag_id >= 0:
            got = frags.add((ip.vlan, ip.version, ip.src, ip.dst, ip.proto, ip.frag_id),
                            ip.frag_off, ip.more_frags, data[ip.l4:ip.l4_end], None, ts)
            if got is None or isinstance(got[0], str):
                return None
            buf, l4, end = got[0], 0, len(got[0])
        if ip.proto == PROTO_TCP:
            return ip, buf, l4, end
        ethertype = _TUNNELS.get(ip.proto)
        if ethertype is None:
            return None
        data = bytes(12) + ethertype + buf[l4:end]
    return None


def write_streams(pcap: str, out: str) -> list[dict[str, Any]]:
    """Reassemble every TCP direction of `pcap` into files under `out`; return the index."""
    outdir = Path(out)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{out}: cannot create: {err.strerror or err}") from err
    active: OrderedDict[DirKey, _Direction] = OrderedDict()  # least recently active first
    held = 0  # bytes buffered by the active directions
    done: list[_Direction] = []
    files = _Files()
    # Offline, only the IP limits apply: a datagram has at most 65535 bytes, so
    # at most 8192 fragments of the minimum 8 bytes (the proxy's per-datagram
    # limit of 64 is a guard for live guests and would drop valid datagrams here).
    frags: FragmentTable[None] = FragmentTable(MAX_FRAGMENTS, 64 * 1024 * 1024, 1e9)
    for ts, frame in read_frames(pcap):
        got = _tcp_datagram(frame, ts, frags)
        if got is None:
            continue
        ip, buf, l4, end = got
        hdr = parse_tcp(buf, l4, end)
        if isinstance(hdr, str):
            continue
        key: DirKey = (ip.vlan, ip.src, ip.dst, hdr.sport, hdr.dport)
        d = active.get(key)
        syn = bool(hdr.flags & TCP_SYN)
        # Only a SYN that could open a connection starts a new stream: a
        # receiver never opens one on SYN+RST or SYN+FIN (RFC 9293 3.10.7,
        # Linux tcp_rcv_state_process drops them), and tshark keeps such a
        # segment in the current stream too.
        opens = syn and not hdr.flags & (TCP_RST | TCP_FIN)
        if d is not None and opens and (hdr.seq + 1) & MASK32 != d.isn:
            held -= d.stream.buffered
            d.close()
            done.append(d)
            del active[key]
            d = None
        payload = buf[hdr.payload:end]
        if d is None:
            if not syn and not payload:
                continue
            n = len(done) + len(active)
            vl = "".join(f"v{v}-" for v in ip.vlan)
            name = f"{n:04d}-{vl}{_addr(ip.src)}_{hdr.sport}-{_addr(ip.dst)}_{hdr.dport}.bin"
            name = name.replace(":", ".")
            isn = (hdr.seq + 1) & MASK32 if syn else hdr.seq
            files.create(outdir / name)
            d = active[key] = _Direction(n, key, isn, files, outdir / name, name)
        seq = (hdr.seq + 1) & MASK32 if syn else hdr.seq
        if payload:
            before = d.stream.buffered
            d.add(seq, payload)
            held += d.stream.buffered - before
            active.move_to_end(key)
            if held > KEEP_WRITTEN_TOTAL:
                held -= _forget_written(active, held - KEEP_WRITTEN_TOTAL)
    done.extend(active.values())
    index = []
    for d in sorted(done, key=lambda x: x.index):
        d.close()
        vlan, src, dst, sport, dport = d.key
        index.append({
            "flow": f"TCP {_addr(src)}:{sport} > {_addr(dst)}:{dport}"
                    + (" vlan " + ".".join(map(str, vlan)) if vlan else ""),
            "src": _addr(src), "sport": sport, "dst": _addr(dst), "dport": dport,
            "vlan": list(vlan), "direction": f"{_addr(src)}:{sport} -> {_addr(dst)}:{dport}",
            "bytes": d.written, "file": d.name, "gaps": d.gaps,
            "conflicts": d.stream.conflicts, "segments": d.segments,
        })
    (outdir / "index.json").write_text(json.dumps(index, indent=1))
    return index
