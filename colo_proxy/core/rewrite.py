"""The secondary's TCP sequence translation: what QEMU's filter-rewriter does, for both opens.

Theory of operation
-------------------
Every client frame is copied to both guests, but the client only ever sees the
primary's output, so its ACK numbers, SACK edges and timestamp echoes (TSecr)
are in the primary's spaces.  The secondary's kernel picked its own ISN and
timestamp clock, so before a client frame reaches it those fields are moved by
(secondary - primary) mod 2**32; otherwise the secondary answers with challenge
ACKs or RSTs and diverges for nothing.  Secondary output is never released, so
it is never rewritten.

A connection is keyed (VLAN tags, guest address, guest port, client address,
client port).  Learning, from what each guest (side X) sends:

    SYN or SYN-ACK with ISN i (active or passive open):
        no entry            -> new entry, X's ISN = i      (table full: counted, not tracked)
        X's ISN unknown     -> X's ISN = i
        X's ISN == i        -> a retransmission: nothing
        X's ISN != i        -> a new connection on the key: fresh entry, X's ISN = i
    both ISNs known         -> offset = sec ISN - pri ISN; if both SYNs carried
                               timestamps, ts_offset = sec TSval - pri TSval

A client frame with ACK set on an entry with both ISNs gets ack, every SACK
edge and a non-zero TSecr shifted; with one ISN known it passes unchanged
(counted `half_known`).  The TCP checksum is updated incrementally (RFC 1624);
a field that holds only the pseudo-header sum (checksum offload, not yet
completed) is left alone, since the device sums the new words itself.

An entry ends on an RST from anyone (a client RST is translated first: a guest
in SYN-SENT only accepts an RST acking its own ISN); on FIN from the client and
both guests once the client has acknowledged the primary's FIN (so that last
ACK is translated too); when idle in `expire` (client frames keep it alive);
and all at once in `checkpoint_done`, when the secondary takes the primary's
TCP state and every offset becomes 0.

Guest and client frames are hostile input: nothing here raises on them.
Frames that cannot be parsed, IP fragments and TCP headers with malformed
options pass unchanged and are counted.
"""

from __future__ import annotations

import struct
from typing import Final

from colo_proxy.core.checksum import tcp_checksum_partial, updated_checksum
from colo_proxy.core.events import Side
from colo_proxy.core.packet import (
    PASS_REASONS,
    PROTO_TCP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    parse_ip,
    parse_tcp,
)
from colo_proxy.core.seq import MASK32, seq_diff

Key = tuple[tuple[int, ...], bytes, int, bytes, int]
"""(VLAN tags, guest address, guest port, client address, client port)."""

COUNTERS: Final = (
    "client_frames",      # to_secondary calls
    "rewritten_frames",   # client frames changed
    "zero_offset",        # tracked, but both offsets are 0: nothing to change
    "half_known",         # only one guest's ISN known yet: passed unchanged
    "untracked",          # TCP client frame with no entry: passed unchanged
    "no_ack",             # TCP client frame without ACK, SYN, FIN or RST: passed unchanged
    "not_tcp",            # ARP, non-IP, UDP, ICMP...: passed unchanged
    "fragments",          # IP fragments: passed unchanged, never learnt from
    "malformed",          # unparseable client frames: passed unchanged
    "guest_malformed",    # unparseable guest frames: nothing learnt from them
    "bad_options",        # client TCP options that cannot be walked: passed unchanged
    "partial_checksums",  # offloaded checksum fields left as they were
    "table_full",         # new connections not tracked because the table is full
    "learnt",             # entries created
    "replaced",           # a guest SYN with a new ISN replaced an entry
    "ended_rst",
    "ended_fin",
    "expired",
    "checkpoint_dropped",  # entries dropped by checkpoint_done
)

_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")

_FIN_CLIENT: Final = 1
_FIN_PRIMARY: Final = 2
_FIN_SECONDARY: Final = 4
_CLIENT_ACKED_FIN: Final = 8
_CLOSED: Final = 15
_CONTROL: Final = TCP_SYN | TCP_FIN | TCP_RST
_CLIENT_INTEREST: Final = TCP_ACK | _CONTROL
_NOT_TCP: Final = -1
_LOOK_CLOSER: Final = -2

OPT_EOL: Final = 0
OPT_NOP: Final = 1
OPT_SACK: Final = 5
OPT_TS: Final = 8


class _Conn:
    """One connection's learnt ISNs, offsets and closing state."""

    __slots__ = ("ack_off", "fins", "isn", "last_seen", "pri_fin_end", "ts_off", "tsval")

    def __init__(self, now: float) -> None:
        self.isn = [-1, -1]
        """Primary, secondary ISN (-1: not seen yet)."""
        self.tsval = [-1, -1]
        """TSval of each guest's SYN/SYN-ACK (-1: no timestamp option)."""
        self.ack_off = -1
        """sec ISN - pri ISN mod 2**32 once both are known, else -1."""
        self.ts_off = -1
        """sec TSval - pri TSval mod 2**32 once both are known, else -1."""
        self.fins = 0
        self.pri_fin_end = 0
        self.last_seen = now


def _quick_flags(frame: bytes) -> int:
    """TCP flags of an untagged IPv4 frame without allocating, for cheap early exits.

    _NOT_TCP for untagged IPv4 that is not TCP; _LOOK_CLOSER when the full
    parser must decide (tagged, IPv6, short or odd frames).
    """
    n = len(frame)
    if n < 54 or frame[12] != 0x08 or frame[13] != 0x00 or frame[14] >> 4 != 4:
        return _LOOK_CLOSER
    if frame[23] != PROTO_TCP:
        return _NOT_TCP
    flags_at = 14 + (frame[14] & 0x0F) * 4 + 13
    return frame[flags_at] if flags_at < n else _LOOK_CLOSER


def _find_options(data: bytes, start: int, end: int) -> tuple[int, int] | None:
    """Offsets of the SACK and timestamp options in data[start:end] (-1: absent).

    None when the options cannot be walked, or a SACK or timestamp option is
    malformed or repeated: real stacks never send that, and a frame that is
    only half translated would be worse than one left alone.
    """
    sack = ts = -1
    i = start
    while i < end:
        kind = data[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            return None
        length = data[i + 1]
        if length < 2 or i + length > end:
            return None
        if kind == OPT_SACK:
            if sack != -1 or length < 10 or (length - 2) % 8:
                return None
            sack = i
        elif kind == OPT_TS:
            if ts != -1 or length != 10:
                return None
            ts = i
        i += length
    return sack, ts


def _tsval(data: bytes, start: int, end: int) -> int:
    """TSval of a SYN's timestamp option, -1 when absent or the options are unreadable."""
    found = _find_options(data, start, end)
    if found is None or found[1] == -1:
        return -1
    return int(_U32.unpack_from(data, found[1] + 2)[0])


def _shift32(buf: bytearray, at: int, off: int) -> int:
    """Add `off` to the 32-bit field at `at`; return the change mod 0xFFFF for the checksum."""
    old = _U32.unpack_from(buf, at)[0]
    new = (old + off) & MASK32
    _U32.pack_into(buf, at, new)
    return int(new - old)


def _shift_options(buf: bytearray, sack: int, ts: int, ack_off: int, ts_off: int) -> int:
    """Shift every SACK edge and a non-zero TSecr; return the checksum change."""
    delta = 0
    if sack != -1:
        for edge in range(sack + 2, sack + buf[sack + 1], 4):
            delta += _shift32(buf, edge, ack_off)
    if ts != -1 and ts_off > 0 and _U32.unpack_from(buf, ts + 6)[0]:
        delta += _shift32(buf, ts + 6, ts_off)
    return delta


class SecondaryRewriter:
    """Translates client frames into the secondary's sequence and timestamp spaces."""

    def __init__(self, max_connections: int = 65536, idle_timeout: float = 300.0) -> None:
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self._conns: dict[Key, _Conn] = {}
        self._counts = dict.fromkeys(COUNTERS, 0)

    def observe_primary(self, frame: bytes, now: float) -> None:
        """A frame the primary guest sent: learn its ISN and timestamp, see FIN/RST."""
        self._observe(frame, now, Side.PRIMARY)

    def observe_secondary(self, frame: bytes, now: float) -> None:
        """A frame the secondary guest sent: learn its ISN and timestamp, see FIN/RST."""
        self._observe(frame, now, Side.SECONDARY)

    def _observe(self, frame: bytes, now: float, side: Side) -> None:
        quick = _quick_flags(frame)
        if quick == _NOT_TCP or (quick >= 0 and not quick & _CONTROL):
            return  # only SYN, FIN and RST teach anything
        ip = parse_ip(frame, 0)
        if isinstance(ip, str):
            if ip not in PASS_REASONS:
                self._counts["guest_malformed"] += 1
            return
        if ip.proto != PROTO_TCP or ip.frag_id != -1:
            return
        tcp = parse_tcp(frame, ip.l4, ip.l4_end)
        if isinstance(tcp, str):
            self._counts["guest_malformed"] += 1
            return
        flags = tcp.flags
        if not flags & _CONTROL:
            return
        key = (ip.vlan, ip.src, tcp.sport, ip.dst, tcp.dport)
        if flags & TCP_RST:
            if self._conns.pop(key, None) is not None:
                self._counts["ended_rst"] += 1
            return
        if flags & TCP_SYN:
            self._learn_isn(key, side, tcp.seq, _tsval(frame, tcp.options, tcp.payload), now)
            return
        conn = self._conns.get(key)
        if conn is None:
            return
        if side == Side.PRIMARY:
            conn.fins |= _FIN_PRIMARY
            conn.pri_fin_end = (tcp.seq + ip.l4_end - tcp.payload + 1) & MASK32
        else:
            conn.fins |= _FIN_SECONDARY
        if conn.fins == _CLOSED:
            self._end_fin(key)

    def _learn_isn(self, key: Key, side: Side, isn: int, tsval: int, now: float) -> None:
        """Record a guest's ISN from its SYN or SYN-ACK (see the table on top)."""
        conn = self._conns.get(key)
        if conn is not None and conn.isn[side] == isn:
            return  # a retransmitted SYN or SYN-ACK
        if conn is None or conn.isn[side] != -1:
            if conn is None and len(self._conns) >= self.max_connections:
                self._counts["table_full"] += 1
                return
            self._counts["replaced" if conn is not None else "learnt"] += 1
            conn = self._conns[key] = _Conn(now)
        conn.isn[side] = isn
        conn.tsval[side] = tsval
        conn.last_seen = now
        pri, sec = conn.isn
        if pri != -1 and sec != -1:
            conn.ack_off = (sec - pri) & MASK32
            pri_ts, sec_ts = conn.tsval
            if pri_ts != -1 and sec_ts != -1:
                conn.ts_off = (sec_ts - pri_ts) & MASK32

    def to_secondary(self, frame: bytes, now: float) -> bytes:
        """Return the client frame moved into the secondary's spaces (or `frame` itself)."""
        counts = self._counts
        counts["client_frames"] += 1
        quick = _quick_flags(frame)
        if quick == _NOT_TCP:
            counts["not_tcp"] += 1
            return frame
        if quick >= 0 and not quick & _CLIENT_INTEREST:
            counts["no_ack"] += 1
            return frame
        ip = parse_ip(frame, 0)
        if isinstance(ip, str):
            counts["not_tcp" if ip in PASS_REASONS else "malformed"] += 1
            return frame
        if ip.proto != PROTO_TCP:
            counts["not_tcp"] += 1
            return frame
        if ip.frag_id != -1:
            counts["fragments"] += 1
            return frame
        tcp = parse_tcp(frame, ip.l4, ip.l4_end)
        if isinstance(tcp, str):
            counts["malformed"] += 1
            return frame
        key = (ip.vlan, ip.dst, tcp.dport, ip.src, tcp.sport)
        conn = self._conns.get(key)
        if conn is None:
            counts["untracked"] += 1
            return frame
        conn.last_seen = now
        flags = tcp.flags
        out = frame
        if flags & TCP_ACK:
            if conn.ack_off == -1:
                counts["half_known"] += 1
            elif conn.ack_off == 0 and conn.ts_off <= 0:
                counts["zero_offset"] += 1
            else:
                out = self._rewrite(frame, ip.src, ip.dst, ip.l4, ip.l4_end, tcp.payload, conn)
            if conn.fins & _FIN_PRIMARY and seq_diff(tcp.ack, conn.pri_fin_end) >= 0:
                conn.fins |= _CLIENT_ACKED_FIN
        if flags & TCP_RST:
            del self._conns[key]
            counts["ended_rst"] += 1
            return out
        if flags & TCP_FIN:
            conn.fins |= _FIN_CLIENT
        if conn.fins == _CLOSED:
            self._end_fin(key)
        return out

    def _rewrite(
        self, frame: bytes, src: bytes, dst: bytes, l4: int, l4_end: int, payload: int,
        conn: _Conn,
    ) -> bytes:
        """Shift ack, SACK edges and TSecr; fix the checksum unless offload will fill it."""
        found = _find_options(frame, l4 + 20, payload)
        if found is None:
            self._counts["bad_options"] += 1
            return frame
        buf = bytearray(frame)
        delta = _shift_options(buf, found[0], found[1], conn.ack_off, conn.ts_off)
        delta += _shift32(buf, l4 + 8, conn.ack_off)
        csum = _U16.unpack_from(frame, l4 + 16)[0]
        if tcp_checksum_partial(frame, src, dst, l4, l4_end, csum):
            self._counts["partial_checksums"] += 1
        else:
            _U16.pack_into(buf, l4 + 16, updated_checksum(csum, delta))
        self._counts["rewritten_frames"] += 1
        return bytes(buf)

    def _end_fin(self, key: Key) -> None:
        del self._conns[key]
        self._counts["ended_fin"] += 1

    def checkpoint_done(self) -> None:
        """The secondary now holds the primary's TCP state: every offset is 0."""
        self._counts["checkpoint_dropped"] += len(self._conns)
        self._conns.clear()

    def expire(self, now: float) -> None:
        """Forget connections no client frame has touched for `idle_timeout` seconds."""
        limit = now - self.idle_timeout
        stale = [key for key, conn in self._conns.items() if conn.last_seen < limit]
        for key in stale:
            del self._conns[key]
        self._counts["expired"] += len(stale)

    def stats(self) -> dict[str, int]:
        """Current connection count and every counter (see COUNTERS)."""
        return {"connections": len(self._conns), **self._counts}
