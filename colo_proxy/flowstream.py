"""One flow's frames and bytes out of a capture, named by its report label.

`explain` and `learn` need to look at the bytes a divergence is about, which the
report only names (`TCP 10.0.0.1:80 > 10.0.0.2:40000`, an offset).  This reads a
capture once and keeps, per flow label, every frame with its capture time and
stream offset (from the SYN + 1, or the first data byte seen) and the stream
rebuilt by offset, first copy winning, as the core compares it.  Not on any hot
path: a tool reads a capture or two.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from colo_proxy.core.flows import flow_label
from colo_proxy.core.packet import PROTO_TCP, PROTO_UDP, TCP_SYN, IpPacket, parse_ip, parse_tcp
from colo_proxy.drivers.pcap import read_frames

WRAP = 1 << 32
MAX_STREAM = 64 << 20
"""Bytes kept per flow (a tool reading a huge bulk capture stays bounded)."""


@dataclass(slots=True)
class Segment:
    """One frame of a flow: where it sits in the capture and in the stream."""

    index: int
    """Frame number in the capture, from 1 as Wireshark counts."""
    time: float
    """Capture timestamp."""
    offset: int | None
    """Stream offset of its first payload byte (None for a datagram or a SYN)."""
    length: int
    flags: int = 0
    payload: bytes = b""
    """A datagram's payload (TCP bytes are in FlowData.stream)."""


@dataclass(slots=True)
class FlowData:
    """A flow as one capture saw it."""

    label: str
    segments: list[Segment] = field(default_factory=list)
    stream: bytearray = field(default_factory=bytearray)
    have: bytearray = field(default_factory=bytearray)
    """1 where `stream` holds a byte seen in the capture (0 in a hole)."""
    base: int | None = None

    def put(self, off: int, data: bytes) -> None:
        """Store bytes at a stream offset; the first copy of a byte wins."""
        end = min(off + len(data), MAX_STREAM)
        if end <= off:
            return
        if end > len(self.stream):
            grow = end - len(self.stream)
            self.stream += bytes(grow)
            self.have += bytes(grow)
        for i in range(off, end):
            if not self.have[i]:
                self.stream[i] = data[i - off]
                self.have[i] = 1

    def carriers(self, offset: int) -> list[Segment]:
        """The frames whose payload covers `offset`."""
        return [s for s in self.segments
                if s.offset is not None and s.offset <= offset < s.offset + s.length]


def _key_of(ip: IpPacket, data: bytes) -> tuple[str, int, int, int, int] | None:
    """(label, sport, seq, flags, payload start) of a TCP/UDP frame; None otherwise."""
    if ip.proto == PROTO_TCP:
        tcp = parse_tcp(data, ip.l4, ip.l4_end)
        if isinstance(tcp, str):
            return None
        key = (PROTO_TCP, ip.vlan, ip.src, ip.dst, tcp.sport, tcp.dport)
        return flow_label(key), tcp.seq, tcp.flags, tcp.payload, 0
    if ip.proto == PROTO_UDP and ip.l4_end - ip.l4 >= 8:
        sport = int.from_bytes(data[ip.l4:ip.l4 + 2], "big")
        dport = int.from_bytes(data[ip.l4 + 2:ip.l4 + 4], "big")
        key = (PROTO_UDP, ip.vlan, ip.src, ip.dst, sport, dport)
        return flow_label(key), 0, 0, ip.l4 + 8, 1
    key = (ip.proto, ip.vlan, ip.src, ip.dst, 0, 0)
    return flow_label(key), 0, 0, ip.l4, 1


def frame_label(frame: bytes) -> tuple[str, int] | None:
    """(flow label, TCP flags or 0) of an IP frame; None when it is not IP or a fragment."""
    ip = parse_ip(frame, 0)
    if not isinstance(ip, IpPacket) or ip.frag_id >= 0:
        return None
    got = _key_of(ip, frame)
    return None if got is None else (got[0], got[2])


def read_flows(path: str, labels: Iterable[str] | None = None) -> dict[str, FlowData]:
    """Every flow (or only those in `labels`) of a capture, by report label."""
    wanted = set(labels) if labels is not None else None
    flows: dict[str, FlowData] = {}
    for n, (ts, frame) in enumerate(read_frames(path), 1):
        ip = parse_ip(frame, 0)
        if not isinstance(ip, IpPacket) or ip.frag_id >= 0:
            continue
        got = _key_of(ip, frame)
        if got is None:
            continue
        label, seq, flags, start, datagram = got
        if wanted is not None and label not in wanted:
            continue
        flow = flows.get(label)
        if flow is None:
            flow = flows[label] = FlowData(label)
        payload = frame[start:ip.l4_end]
        if datagram:
            flow.segments.append(Segment(n, ts, None, len(payload), 0, bytes(payload)))
            continue
        if flags & TCP_SYN:
            flow.base = (seq + 1) % WRAP
            flow.segments.append(Segment(n, ts, None, 0, flags))
            continue
        if flow.base is None and payload:
            flow.base = seq
        off = None if flow.base is None else (seq - flow.base) % WRAP
        if off is not None and off >= WRAP // 2:  # before the start seen: ignore those bytes
            off = None
        flow.segments.append(Segment(n, ts, off, len(payload), flags))
        if off is not None and payload:
            flow.put(off, bytes(payload))
    return flows
