"""SACK each guest's own holes, so frames a ring dropped come back by fast retransmit.

Why: the client only ever acknowledges what the proxy released, and nothing
past a hole in either guest's stream is released until the hole is filled
(both sides' bytes must agree first).  So when a receive ring drops a guest's
frame, the client's ACK stops at the hole and no duplicate ACK or SACK ever
tells the guest what is missing: it resends one segment per retransmission
timeout (0.2, 0.4, 0.8 s...), past ``compare_timeout``, and the flow stalls.
A real receiver would SACK what arrived past the hole; :class:`HoleSacker`
does that for the client, toward one guest (the bridge has one per guest).

Per flow it follows the data the proxy received from its guest: ``contig``,
where contiguous data ends, and the ranges received past a hole.  For each
batch in which a flow has a hole, and after each client ACK on such a flow
(a resend lost again leaves the guest silent), it sends the guest one ACK
built from the client's latest frame of that flow as that guest gets it (for
the secondary: as the rewriter translated it) with SACK blocks for the ranges
received past the hole.  The guest marks the hole lost and resends it (RACK,
or three segments SACKed).  The client's own ACKs move ``contig`` on: what
the client acknowledged the guest sent, or it would still be held.

Three more repairs of the same situation, for the secondary's sacker:

* a probe: when the secondary resends data the proxy already had, the
  client's ACK was lost on its way (the client ring dropped it) and the
  idle client sends no other: the latest released frame is sent to the
  client again, which answers at once with its current ACK;
* monotonic TSvals: a frame released late (after its hole was filled) may
  carry an older TSval than frames released before it, and the client's
  PAWS check would drop it: its TSval is raised (see :meth:`released`);
* the secondary's own timestamp echoed: the client's frames echo the
  primary's TSvals, older than a resend of the secondary's, which makes
  Linux undo its loss recovery; their TSecr is raised to the secondary's
  TS.recent (``echo_recent``, see :meth:`client_frames`).

All this costs per-frame work, and holes come from drops only: the sacker
is idle (each call returns at once) until the bridge tells it that a ring
dropped frames (:meth:`HoleSacker.activate`), and goes idle again
``ACTIVE_FOR`` seconds after the last drop once no flow has a hole.  Tracking
starts at the client's latest ACK of each flow (the client batches of the
last moments are kept by reference for that), so the hole the drop made is
seen: data between that ACK and the first frame after the drop counts as
missing, and a guest may resend some of it needlessly.

Only untagged IPv4 without IP options is followed (the bridge lab and
QEMU's taps); other flows recover as before, by timeout.  Both tables are
caches, bounded and simply cleared when full: losing an entry costs at most
a late nudge.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from typing import Final

from colo_proxy.core.checksum import (
    complete_checksum,
    ones_sum,
    tcp_checksum_partial,
    updated_checksum,
)
from colo_proxy.core.framing import Frame
from colo_proxy.core.seq import HALF32, MASK32, seq_diff

_HEAD: Final = struct.Struct("!12xHBxHxxHxB2x12sIIBB")
"""etype, version/IHL, IP total length, fragment field, protocol, addresses and
ports (the flow key), seq, ack, TCP data offset, flags of an untagged IPv4 frame."""
_RELEASED: Final = struct.Struct("!12xHB8xB2x12s9xB6x4sI")
"""etype, version/IHL, protocol, flow key, TCP flags, the first 4 option bytes and
the 4 after them (the TSval when the options start NOP NOP timestamp)."""
_BLOCK: Final = struct.Struct("!II")
_IPV4: Final = 0x0800
_TCP: Final = 6
_FIN: Final = 0x01
_SYN: Final = 0x02
_RST: Final = 0x04
_ACK: Final = 0x10
_OPT_NOP: Final = 1
_OPT_SACK: Final = 5
_OPT_TS: Final = 8
_TS_AT_54: Final = b"\x01\x01\x08\x0a"
"""NOP, NOP, timestamp: where Linux puts it, first in the options."""
ACTIVE_FOR: Final = 10.0
"""Seconds the sacker keeps following flows after a ring dropped frames."""
RECENT_BATCHES: Final = 64
"""Client batches kept (by reference) while idle, to find each flow's latest ACK."""
MAX_BLOCKS: Final = 3
"""SACK blocks that fit beside a timestamp option in 40 bytes of options."""


class _Stream:
    """The secondary's data on one flow as the proxy received it (unwrapped offsets)."""

    __slots__ = ("contig", "ranges", "recent")

    def __init__(self, contig: int) -> None:
        self.contig = contig
        """End of the data received without a gap (a 64-bit sequence number)."""
        self.ranges: list[list[int]] = []
        """Received [start, end) past ``contig``, sorted and disjoint: non-empty means a hole."""
        self.recent = -1
        """TS.recent as a receiver keeps it (RFC 7323 4.3): the newest TSval of a segment
        that started at or below ``contig``; -1 while unknown."""

    def saw_tsval(self, start: int, tsval: int) -> None:
        """A segment from ``start`` carried ``tsval``: keep it if it reached the left edge."""
        if start <= self.contig and (
            self.recent == -1 or ((tsval - self.recent + HALF32) & MASK32) - HALF32 > 0
        ):
            self.recent = tsval

    def add(self, start: int, end: int) -> None:
        """Data [start, end) arrived; merge it and move ``contig`` over what is now whole."""
        if not self.ranges:
            if start <= self.contig:
                if end > self.contig:
                    self.contig = end
                return
            self.ranges.append([start, end])
            return
        ranges = self.ranges
        merged: list[list[int]] = []
        placed = False
        for r in ranges:
            if r[1] < start:
                merged.append(r)
            elif end < r[0]:
                if not placed:
                    merged.append([start, end])
                    placed = True
                merged.append(r)
            else:
                start, end = min(start, r[0]), max(end, r[1])
        if not placed:
            merged.append([start, end])
        merged.sort()
        while merged and merged[0][0] <= self.contig:
            self.contig = max(self.contig, merged.pop(0)[1])
        self.ranges = merged

    def acked(self, upto: int) -> None:
        """The client acknowledged up to ``upto``: the secondary's data below it is whole."""
        if upto > self.contig:
            self.contig = upto
            ranges = self.ranges
            while ranges and ranges[0][0] <= upto:
                self.contig = max(self.contig, ranges.pop(0)[1])


def _unwrap(seq: int, near: int) -> int:
    return near + seq_diff(seq, near & MASK32)


class HoleSacker:
    """Finds holes in the secondary's streams and builds the ACKs that SACK past them."""

    def __init__(self, max_flows: int = 65536, echo_recent: bool = False) -> None:
        self.max_flows = max_flows
        self.echo_recent = echo_recent
        """Raise the TSecr of the client's frames to the guest's TS.recent (see
        :meth:`client_frames`): only for a guest whose client frames pass through here."""
        self._streams: dict[bytes, _Stream] = {}
        self._templates: dict[bytes, bytes] = {}
        self._released: dict[bytes, bytes] = {}
        self._tsval: dict[bytes, int] = {}
        self._recent: deque[list[Frame]] = deque(maxlen=RECENT_BATCHES)
        self.active = False
        self._until = 0.0
        self.counters = {"activations": 0, "sack_holes_seen": 0, "sack_nudges_sent": 0,
                         "sack_no_template": 0, "client_probes_sent": 0, "tsval_raised": 0,
                         "tsecr_raised": 0}

    def activate(self, now: float) -> None:
        """A ring dropped frames: follow every flow from now on (see the module's doc)."""
        self._until = now + ACTIVE_FOR
        if not self.active:
            self.active = True
            self.counters["activations"] += 1
            for batch in self._recent:
                self.client_frames(batch)
            self._recent.clear()

    def _idle(self, now: float) -> bool:
        """Whether to do nothing: not active, or active long enough with no hole left."""
        if not self.active:
            return True
        if now > self._until and not any(s.ranges for s in self._streams.values()):
            self.forget()
            self.active = False
            return True
        return False

    def client_frames(self, frames: list[Frame]) -> list[Frame]:
        """Remember the client's latest frame per flow (as this guest gets it); SACKs to add.

        Each client ACK on a flow whose guest stream has a hole is followed by
        our SACK of what arrived past it: when the guest's resend of the hole
        is lost again, no data of its own arrives to make us SACK, and its
        timer backs off past ``compare_timeout`` (seen: 2 s) unless told again.

        With ``echo_recent``, a frame whose TSecr is older than the guest's
        TS.recent is replaced in ``frames`` by one echoing TS.recent.  Why: the
        client echoes the primary's TSval, translated.  When the proxy released
        data only once the guest resent it, that echo predates the guest's
        resend, and Linux takes it for proof that the timeout was spurious
        (Eifel, RFC 3522: ``tcp_packet_delayed``): it undoes the loss state,
        keeps the rest of the hole in flight and resends one segment per
        timeout, past ``compare_timeout`` (seen in captures of the ring-overflow
        test).  A real receiver would have echoed the resend's TSval.
        """
        if not self.active:
            self._recent.append(frames)
            return []
        templates, streams = self._templates, self._streams
        holed: dict[bytes, _Stream] | None = None
        for i, (data, _) in enumerate(frames):
            if (len(data) >= 54 and data[23] == _TCP and data[14] == 0x45
                    and data[12:14] == b"\x08\x00"):
                key = data[26:38]
                guest_key = key[4:8] + key[0:4] + key[10:12] + key[8:10]
                stream = streams.get(guest_key)
                if stream is not None and self.echo_recent and stream.recent != -1:
                    raised = self._echo_recent(data, stream.recent)
                    if raised is not data:
                        frames[i] = (raised, 0)
                        data = raised
                if len(templates) >= self.max_flows:
                    templates.clear()
                templates[key] = data
                if stream is not None and stream.ranges:
                    if holed is None:
                        holed = {}
                    holed[guest_key] = stream
        return self._nudges(holed) if holed else []

    def _echo_recent(self, data: bytes, recent: int) -> bytes:
        """``data`` with its TSecr raised to ``recent`` when older (else ``data`` itself)."""
        if len(data) < 66 or data[46] < 0x80 or data[54:58] != _TS_AT_54 or not data[47] & _ACK:
            return data
        tsecr = int.from_bytes(data[62:66], "big")
        if not tsecr or ((recent - tsecr + HALF32) & MASK32) - HALF32 <= 0:
            return data
        self.counters["tsecr_raised"] += 1
        return _with_u32(data, 62, tsecr, recent)

    def released(self, frames: list[Frame], now: float) -> list[Frame]:
        """Frames the core released, their timestamps made monotonic per flow; remembered.

        Why: a frame released after a hole filled may carry an older TSval
        than frames released before it (the guest resent the hole's segments
        later than it first sent what came after).  The client's PAWS check
        drops such a frame, and the guest then has to resend it again.  So a
        TSval below the flow's highest released one is raised to it (checksum
        updated): that only shortens one RTT sample of the guest's.  The
        latest data frame per flow is kept for the client probes (see
        :meth:`guest_frames`).
        """
        if self._idle(now):
            return frames
        store, highest, unpack = self._released, self._tsval, _RELEASED.unpack_from
        out = frames
        for i, (data, offset) in enumerate(frames):
            if offset or len(data) < 62:
                continue
            etype, vihl, proto, key, flags, opts, tsval = unpack(data)
            if etype != _IPV4 or vihl != 0x45 or proto != _TCP:
                continue
            if opts == _TS_AT_54:
                top = highest.get(key)
                if top is None or ((tsval - top + HALF32) & MASK32) - HALF32 > 0:
                    if top is None and len(highest) >= self.max_flows:
                        highest.clear()
                    highest[key] = tsval
                elif tsval != top:
                    data = _with_u32(data, 58, tsval, top)
                    if out is frames:
                        out = list(frames)
                    out[i] = (data, 0)
                    self.counters["tsval_raised"] += 1
            if len(data) > 66 and not flags & (_SYN | _RST | _FIN):
                if len(store) >= self.max_flows:
                    store.clear()
                store[key] = data
        return out

    def guest_frames(
        self, frames: Sequence[Frame], now: float
    ) -> tuple[list[Frame], list[Frame]]:
        """Follow the guest's data: (SACK ACKs for the guest, probes for the client).

        A probe answers a segment the proxy already had: the guest resends
        because the client's ACK never reached it (the client ring dropped
        it), and the client, idle, sends no other.  Re-sending the client the
        latest data frame it was released makes it answer at once with its
        current ACK (a duplicate ACK), which reaches the guest as usual.
        """
        if self._idle(now):
            return [], []
        streams, unpack = self._streams, _HEAD.unpack_from
        holed: dict[bytes, _Stream] | None = None
        probes: dict[bytes, bytes] | None = None
        for data, _ in frames:
            if len(data) < 54:
                continue
            etype, vihl, total, frag, proto, key, seq, _ack, doff, flags = unpack(data)
            if etype != _IPV4 or vihl != 0x45 or proto != _TCP or frag & 0x3FFF:
                continue
            if flags & (_SYN | _RST):
                if flags & _RST:
                    streams.pop(key, None)
                else:
                    if len(streams) >= self.max_flows:
                        streams.clear()
                    streams[key] = _Stream(seq + 1)
                continue
            size = total - 20 - (doff >> 4) * 4 + (flags & _FIN)
            if size <= 0:
                continue
            stream = streams.get(key)
            if stream is None:
                if len(streams) >= self.max_flows:
                    streams.clear()
                stream = streams[key] = self._start(key, seq, size)
            contig = stream.contig
            start = contig + (((seq - contig + HALF32) & MASK32) - HALF32)  # unwrapped
            end = start + size
            if doff >= 0x80 and data[54:58] == _TS_AT_54:
                stream.saw_tsval(start, int.from_bytes(data[58:62], "big"))
            if not stream.ranges and start <= contig < end:
                stream.contig = end  # the common case: in order
                continue
            if end <= contig:  # all of it seen before: a lost client ACK?
                if key in self._released:
                    if probes is None:
                        probes = {}
                    probes[key] = _probe(self._released[key])
                if not stream.ranges:
                    continue
            if not stream.ranges:
                self.counters["sack_holes_seen"] += 1
            stream.add(start, end)
            if stream.ranges:
                if holed is None:
                    holed = {}
                holed[key] = stream
        out = self._nudges(holed) if holed else []
        if probes is None:
            return out, []
        self.counters["client_probes_sent"] += len(probes)
        return out, [(frame, 0) for frame in probes.values()]

    def _nudges(self, holed: dict[bytes, _Stream]) -> list[Frame]:
        out: list[Frame] = []
        for key, stream in holed.items():
            nudge = self._nudge(key, stream)
            if nudge is not None:
                out.append((nudge, 0))
        return out

    def _start(self, key: bytes, seq: int, size: int) -> _Stream:
        """A flow first seen now: from the client's latest ACK if known, else from here."""
        template = self._templates.get(key[4:8] + key[0:4] + key[10:12] + key[8:10])
        if template is None or not template[47] & _ACK:
            return _Stream(seq)
        return _Stream(seq + seq_diff(int.from_bytes(template[42:46], "big"), seq))

    def _nudge(self, key: bytes, stream: _Stream) -> bytes | None:
        """An ACK from the client's latest frame with SACK blocks past the hole (or None)."""
        client_key = key[4:8] + key[0:4] + key[10:12] + key[8:10]
        template = self._templates.get(client_key)
        if template is None:
            self.counters["sack_no_template"] += 1
            return None
        _e, _v, total, _f, _p, _k, seq, ack, doff, flags = _HEAD.unpack_from(template)
        if not flags & _ACK or flags & (_SYN | _RST | _FIN):
            return None
        stream.acked(_unwrap(ack, stream.contig))
        ranges = stream.ranges
        if not ranges:
            return None
        if len(ranges) > MAX_BLOCKS:
            ranges = ranges[: MAX_BLOCKS - 1] + ranges[-1:]
        hdr = (doff >> 4) * 4
        ts = _timestamp(template, 54, 34 + hdr)
        options = (b"\x01\x01" + ts if ts else b"") + bytes(
            (_OPT_NOP, _OPT_NOP, _OPT_SACK, 2 + 8 * len(ranges))
        ) + b"".join(_BLOCK.pack(s & MASK32, e & MASK32) for s, e in ranges)
        seq = (seq + total - 20 - hdr) & MASK32  # after the template's data: the next byte
        tcp = (template[34:38] + seq.to_bytes(4, "big") + template[42:46]
               + bytes((((20 + len(options)) // 4) << 4, _ACK)) + template[48:50]
               + b"\0\0\0\0" + options)
        frame = _framed(template, tcp)
        if not isinstance(frame, bytes):
            return None
        self.counters["sack_nudges_sent"] += 1
        return frame

    def forget(self) -> None:
        """A checkpoint: the secondary now has the primary's TCP state; start again."""
        self._streams.clear()
        self._templates.clear()
        self._released.clear()
        self._tsval.clear()

    def stats(self) -> dict[str, int]:
        return {"flows": len(self._streams), **self.counters}


def _timestamp(frame: bytes, start: int, end: int) -> bytes:
    """The timestamp option (10 bytes) in frame[start:end], or b"" when absent or unreadable."""
    i = start
    while i < end:
        kind = frame[i]
        if kind == 0:
            break
        if kind == _OPT_NOP:
            i += 1
            continue
        if i + 1 >= end or frame[i + 1] < 2:
            break
        if kind == _OPT_TS and frame[i + 1] == 10 and i + 10 <= end:
            return frame[i : i + 10]
        i += frame[i + 1]
    return b""


def _probe(frame: bytes) -> bytes:
    """A released data frame cut to its first payload byte, checksums recomputed.

    The client answers any duplicate with its current ACK, one byte is enough,
    and a cut frame fits every MTU: a released super-frame (offloads on) sent
    again bare would be refused as oversize.
    """
    end = 34 + (frame[46] >> 4) * 4 + 1
    if len(frame) <= end:
        return frame
    cut = _framed(frame, frame[34:end])
    return cut if isinstance(cut, bytes) else frame


def _framed(like: bytes, tcp: bytes) -> bytes | str:
    """``tcp`` behind the Ethernet and IPv4 headers of ``like`` (untagged, no IP options),
    the IP length and both checksums made right for it (a reason string when they cannot be)."""
    ip = bytearray(like[14:34])
    ip[2:4] = (20 + len(tcp)).to_bytes(2, "big")
    ip[10:12] = b"\0\0"
    ip[10:12] = (0xFFFF - ones_sum(ip)).to_bytes(2, "big")
    return complete_checksum(like[:14] + bytes(ip) + tcp)


def _with_u32(frame: bytes, at: int, old: int, new: int) -> bytes:
    """``frame`` with the 32-bit field at ``at`` set to ``new`` and its TCP checksum updated.

    A checksum left to offload (only the pseudo-header sum) is left alone: the
    device sums the new field itself.
    """
    buf = bytearray(frame)
    buf[at : at + 4] = new.to_bytes(4, "big")
    csum = int.from_bytes(frame[50:52], "big")
    l4_end = 14 + int.from_bytes(frame[16:18], "big")
    if not tcp_checksum_partial(frame, frame[26:30], frame[30:34], 34, l4_end, csum):
        buf[50:52] = updated_checksum(csum, new - old).to_bytes(2, "big")
    return bytes(buf)
