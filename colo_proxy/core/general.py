"""The general path: any frame parsed in full, dispatched to its flow's comparison.

Proxy.feed_many handles the common untagged IPv4 TCP/UDP frames inline;
everything else comes here: VLAN tags, IPv6, IP options and fragments, ICMP,
other protocols, new connections, and frames the fast path declined.

Frames that cannot be compared (not IP, malformed, ARP, NDP/MLD, IGMP, IP
datagrams whose fragments never complete) follow one rule: the primary's
are passed through at once, uncompared, and counted by reason; the
secondary's are dropped and counted.  That is QEMU's rule too; it loses
nothing the client would have received from an unprotected VM.
"""

from __future__ import annotations

from collections import Counter
from typing import final

from colo_proxy.core.config import Config
from colo_proxy.core.datagram import DatagramFlow
from colo_proxy.core.events import CheckpointReason, DivergenceKind
from colo_proxy.core.flows import FlowHost, FlowKey, Rel
from colo_proxy.core.flowtable import FlowTable
from colo_proxy.core.fragments import FragKey, FragmentTable
from colo_proxy.core.ledger import HoldLedger
from colo_proxy.core.packet import (
    ICMPV6_UNCOMPARED,
    IGMP,
    NDP_MLD,
    PASS_REASONS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_IGMP,
    PROTO_TCP,
    PROTO_UDP,
    IpPacket,
    TcpHeader,
    parse_ip,
    parse_tcp,
    parse_udp,
)
from colo_proxy.core.tcp import TcpFlow


@final
class GeneralPath:
    """Full parse, IP reassembly and dispatch; the uncompared-frame rule and its counters."""

    __slots__ = ("_frags", "_window", "counters", "host", "ledger", "malformed", "table",
                 "uncompared")

    def __init__(
        self, host: FlowHost, cfg: Config, table: FlowTable, ledger: HoldLedger,
        counters: Counter[str],
    ) -> None:
        self.host = host
        self.table = table
        self.ledger = ledger
        self.counters = counters
        self.malformed: Counter[str] = Counter()
        self.uncompared: Counter[str] = Counter()
        self._window = cfg.datagram_reorder_window
        self._frags: tuple[FragmentTable[tuple[bytes, int]], FragmentTable[tuple[bytes, int]]] = (
            FragmentTable(cfg.max_fragments, cfg.max_fragment_bytes, cfg.fragment_timeout),
            FragmentTable(cfg.max_fragments, cfg.max_fragment_bytes, cfg.fragment_timeout),
        )

    def fragment_frames_held(self) -> int:
        """The primary's frames waiting in incomplete datagrams (they count as held)."""
        return self._frags[0].held_rels

    def fragments_waiting(self) -> bool:
        return any(len(t) for t in self._frags)

    def oldest_fragment(self) -> float | None:
        """Arrival of the oldest incomplete datagram of either side, if any."""
        times = [t for t in (table.oldest() for table in self._frags) if t is not None]
        return min(times) if times else None

    def expire_fragments(self, now: float) -> None:
        """Give up datagrams whose fragments timed out: the primary's pass, uncompared."""
        for rel in self._frags[0].expire(now):
            self._pass(rel, "ip_fragments_timed_out")
        self.counters["secondary_fragments_dropped"] += len(self._frags[1].expire(now))

    def clear_fragments(self) -> None:
        """A checkpoint: incomplete datagrams are given up (the primary's pass)."""
        for rel in self._frags[0].clear():
            self._pass(rel, "ip_fragment_incomplete_at_checkpoint")
        self.counters["secondary_fragments_dropped"] += len(self._frags[1].clear())

    def tcp4_syn(
        self, primary: bool, data: bytes, raw: bytes, tflow: TcpFlow | None, seq: int, ack: int,
        flags: int, offset: int, start: int, stop: int, frame: tuple[bytes, int], flen: int,
        now: float,
    ) -> None:
        """An untagged IPv4 SYN or SYN-ACK that feed_many already validated.

        The same as the general path (feed -> _dispatch), minus parsing the
        frame a second time: every new connection starts here.
        """
        if tflow is None:
            key: FlowKey = (PROTO_TCP, (), raw[:4], raw[4:8], raw[8] << 8 | raw[9],
                            raw[10] << 8 | raw[11])
            if not self._make_room(now):
                self._refused(primary, frame)
                return
            tflow = self._new_tcp(key, now, raw)
        tflow.last_seen = now
        key = tflow.key
        hdr = TcpHeader(key[4], key[5], seq, ack, flags, offset + 54, start)
        if primary:
            tflow.on_primary(self.host, hdr, data, stop, frame, flen, now)
        else:
            tflow.on_secondary(self.host, hdr, data, stop, now)

    def feed(
        self, primary: bool, data: bytes, offset: int, frame: tuple[bytes, int], flen: int,
        now: float,
    ) -> None:
        """One frame: parse it, reassemble fragments, find its flow, compare."""
        ip = parse_ip(data, offset)
        if isinstance(ip, str):
            self._uncompared(primary, frame, flen, ip)
            return
        if ip.frag_id >= 0:
            self._fragment(primary, ip, data, offset, flen, now)
            return
        self._dispatch(primary, ip, data, ip.l4, ip.l4_end, frame, flen, now)

    def _pass(self, rel: tuple[bytes, int], reason: str) -> None:
        self.uncompared[reason] += 1
        self.ledger.release_unheld(rel)

    def _uncompared(self, primary: bool, rel: tuple[bytes, int], flen: int, reason: str) -> None:
        if reason not in PASS_REASONS:
            self.malformed[reason] += 1
        if primary:
            self._pass(rel, reason)
        else:
            self.counters["secondary_frames_dropped_uncompared"] += 1
            if reason in PASS_REASONS:
                self.uncompared[reason] += 1

    def _fragment(
        self, primary: bool, ip: IpPacket, data: bytes, offset: int, flen: int, now: float
    ) -> None:
        key: FragKey = (ip.vlan, ip.version, ip.src, ip.dst, ip.proto, ip.frag_id)
        table = self._frags[0 if primary else 1]
        result = table.add(key, ip.frag_off, ip.more_frags, data[ip.l4 : ip.l4_end],
                           (data, offset), now)
        if result is None:
            return
        what, rels = result
        if isinstance(what, str):
            if what != "ip_fragment_of_given_up_datagram":
                self.malformed[what] += 1
            for rel in rels:
                self._uncompared(primary, rel, len(rel[0]) - rel[1], "ip_fragments_given_up")
            return
        self.counters["ip_datagrams_reassembled"] += 1
        total = sum(len(d) - o for d, o in rels)
        self.ledger.unit_extra = len(rels) - 1 if primary else 0
        try:
            self._dispatch(primary, ip, what, 0, len(what), rels, total, now)
        finally:
            self.ledger.unit_extra = 0

    def _dispatch(
        self, primary: bool, ip: IpPacket, buf: bytes, l4: int, end: int, rel: Rel, flen: int,
        now: float,
    ) -> None:
        proto = ip.proto
        if proto == PROTO_TCP:
            hdr = parse_tcp(buf, l4, end)
            if isinstance(hdr, str):
                self._bad_l4(primary, rel, hdr)
                return
            key: FlowKey = (proto, ip.vlan, ip.src, ip.dst, hdr.sport, hdr.dport)
            tflow = self.table.flows.get(key)
            if not isinstance(tflow, TcpFlow):
                if not self._make_room(now):
                    self._refused(primary, rel)
                    return
                tflow = self._new_tcp(key, now)
            tflow.last_seen = now
            if primary:
                tflow.on_primary(self.host, hdr, buf, end, rel, flen, now)
            else:
                tflow.on_secondary(self.host, hdr, buf, end, now)
            return
        if proto == PROTO_UDP:
            udp = parse_udp(buf, l4, end)
            if isinstance(udp, str):
                self._bad_l4(primary, rel, udp)
                return
            sport, dport, start, stop = udp
            key = (proto, ip.vlan, ip.src, ip.dst, sport, dport)
            content = buf[start:stop]
            kind = DivergenceKind.UDP
        elif proto in (PROTO_ICMP, PROTO_ICMPV6):
            if end - l4 < 4:
                self._bad_l4(primary, rel, "icmp_truncated")
                return
            if proto == PROTO_ICMPV6 and buf[l4] in ICMPV6_UNCOMPARED:
                self._bad_l4(primary, rel, NDP_MLD)
                return
            key = (proto, ip.vlan, ip.src, ip.dst, 0, 0)
            content = buf[l4 : l4 + 2] + buf[l4 + 4 : end]
            kind = DivergenceKind.ICMP
        elif proto == PROTO_IGMP:
            self._bad_l4(primary, rel, IGMP)
            return
        else:
            key = (proto, ip.vlan, ip.src, ip.dst, 0, 0)
            content = buf[l4:end]
            kind = DivergenceKind.OTHER
        gflow = self.table.flows.get(key)
        if not isinstance(gflow, DatagramFlow):
            if not self._make_room(now):
                self._refused(primary, rel)
                return
            gflow = self.table.new_datagram(key, now, kind)
            self.host.classify(gflow, now)
        gflow.last_seen = now
        if primary:
            gflow.on_primary(self.host, content, rel, flen, now, self._window)
        else:
            gflow.on_secondary(self.host, content, now, self._window)

    def _bad_l4(self, primary: bool, rel: Rel, reason: str) -> None:
        rels = rel if isinstance(rel, list) else [rel]
        for one in rels:
            self._uncompared(primary, one, len(one[0]) - one[1], reason)

    def _new_tcp(self, key: FlowKey, now: float, raw: bytes | None = None) -> TcpFlow:
        """A new TCP flow, classified (a flow no rule decided is watched for TLS/SSH).

        raw: its fast-path key when the caller has it (see FlowTable.new_tcp)."""
        flow = self.table.new_tcp(key, now, raw)
        flow.sniff = not self.host.classify(flow, now)
        return flow

    def _make_room(self, now: float) -> bool:
        """Before a new flow: evict idle ones if the table is full, else ask for a checkpoint;
        False past the hard cap (flowtable.py says why its frames are dropped)."""
        table, held = self.table, self.ledger.held_bytes
        if not table.full() and held < table.hard_held_bytes:
            return True
        admitted = table.admit(held)
        if table.full() or not admitted:
            self.host.want_checkpoint(CheckpointReason.FLOW_TABLE, now)
        return admitted

    def _refused(self, primary: bool, rel: Rel) -> None:
        """A new flow's frame(s) past the hard cap: dropped, counted, never released."""
        frames = len(rel) if isinstance(rel, list) else 1
        size = sum(len(d) - o for d, o in rel) if isinstance(rel, list) else len(rel[0]) - rel[1]
        side = "primary" if primary else "secondary"
        self.counters[f"admission_refused_{side}_frames"] += frames
        self.counters[f"admission_refused_{side}_bytes"] += size
