"""TCP comparison of one flow: primary versus secondary byte streams.

Theory of operation
-------------------
Each side's stream is rebuilt by offset (sequence number minus that side's
ISN), so segmentation, ISNs and options never matter.  `pri.stream` and
`sec.stream` always share the same `base`: the offset up to which both sides
agreed.  Whenever both have contiguous bytes past it, they are compared and
consumed together.

Primary frames wait in `queue` (in arrival order) and leave it once (a) its
payload lies below the agreed offset, (b) its ACK, as an offset from the
client's ISN, is not ahead of the highest ACK the secondary sent (otherwise
a failover could lose client data the client believes delivered), and (c) a
SYN waits for the secondary's SYN with equal options, a FIN or RST for the
secondary's at the same offset.  Release follows stream offsets, not arrival
order: a retransmission that fills a gap goes out as soon as its bytes match,
even when later segments wait in the queue before it (a sender whose
congestion window fell to one would otherwise never send the next segment).

Divergence (different bytes, close or handshake) freezes the flow: nothing
more is released or compared until a checkpoint; both sides' bytes are still
buffered.  What the checkpoint did to the secondary is decided per flow
(`after_checkpoint`):

    reset      the secondary is now a copy of the primary (a real COLO pair):
               it continues from the primary's offsets, in its sequence space;
    continues  it goes on as before (independent recordings, or a checkpoint
               that failed): comparison goes on at both sides' own offsets,
               the differing region that was reported is skipped up to its
               first agreeing byte, and a close divergence ends comparison;
    auto       undecided until the secondary's next segment: whichever of the
               two positions its sequence number fits decides (_decide_space).
               Until then nothing of the flow is compared or released.

Mid-stream pick-up (no SYN seen): a side whose first segment fits the other
side's sequence space near its position shares it (a real pair behind a
rewriter); otherwise its offsets count from its own first byte seen, so both
sides are compared from the first offset both have, never at a negative one.
"""

from __future__ import annotations

from typing import Final, TypeVar

from colo_proxy.core import tcp_resync as resync
from colo_proxy.core import tcp_uncompared as uncompared
from colo_proxy.core.events import CheckpointReason, DivergenceKind
from colo_proxy.core.flows import (
    MODE_COMPARE,
    MODE_MC,
    MODE_PASS,
    MODE_UNDECIDED,
    FlowHost,
    FlowKey,
    HeldCounts,
    Rel,
)
from colo_proxy.core.held import NEED_FIN, NEED_HANDSHAKE, NEED_NONE, NEED_RST, HeldFrame
from colo_proxy.core.masks import MASK_CONTEXT, masked_agree
from colo_proxy.core.packet import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, TcpHeader, tcp_syn_options
from colo_proxy.core.policy import encrypted_kind
from colo_proxy.core.seq import HALF32, MASK32, unwrap
from colo_proxy.core.tcpside import MIDSTREAM_FIT, NO_STASH, NO_TIMES, Stash, TcpSide

# fast_primary / fast_secondary results.
FAST_NO: Final = 0
FAST_DONE: Final = 1
FAST_PROGRESS: Final = 2


_FAST_FLAGS: Final = TCP_ACK | TCP_SYN | TCP_RST
"""Segments with ACK and neither SYN nor RST take the fast path (FIN is handled there)."""


_PAST_CLOSE: Final = "data past the other side's close"

COMPACT_AT: Final = 64
"""Entries behind a list's head index before it may be compacted."""


_T = TypeVar("_T")


def _advance(entries: list[_T], k: int) -> int:
    """Move a list's head to k; compact when most of it is behind. Returns the new head."""
    if k > COMPACT_AT and 2 * k > len(entries):
        del entries[:k]
        return 0
    return k



class TcpFlow(HeldCounts):
    """Comparison state of one TCP flow (one direction of guest output)."""

    __slots__ = (
        "ck_ack", "ck_fin", "ck_pos", "close_div", "closed", "hs_ok", "mask_ctx", "mc_gap",
        "midstream", "pri", "q_ooo", "q_scanned", "qh", "queue", "sec", "sec_times", "skipping",
        "sniff", "space_ok", "stash", "stash_bytes", "th",
    )

    def __init__(self, key: FlowKey, now: float) -> None:
        super().__init__(key, now)
        self.pri = TcpSide()
        self.sec = TcpSide()
        # Plain lists with a head index, not deques: an empty deque costs 760 bytes,
        # and two per flow were half of a flow's memory.  Entries before the head
        # are gone; a list is reset when its head reaches the end and compacted
        # when more than half of it is behind the head (amortised O(1) per entry).
        self.queue: list[HeldFrame] = []
        self.qh = 0
        self.sec_times: list[tuple[int, float]] = NO_TIMES
        self.th = 0
        self.hs_ok = False
        self.closed = False
        self.space_ok = False
        """Whether the secondary's sequence space is settled (see _decide_space)."""
        self.stash: Stash = NO_STASH
        """Secondary segments waiting for the primary's ISN to settle the space."""
        self.stash_bytes = 0
        self.q_ooo = False
        """Whether the queue may hold an entry ending before an earlier one's end."""
        self.q_scanned: tuple[object, ...] = ()
        """What an out-of-order scan depends on, as of the last one: rescan only on news
        (reset by every entry queued while the queue is out of order)."""
        self.skipping = False
        """A reported differing region: skip it up to the first agreeing byte (continues)."""
        self.close_div = False
        """The divergence was about closes (length/close): nothing more to compare."""
        self.midstream = False
        self.ck_pos = 0
        """The primary's position at the last checkpoint (where a reset secondary resumes)."""
        self.ck_ack = -1
        self.ck_fin = False
        """Whether the primary had sent its FIN by the last checkpoint."""
        self.sniff = False
        """Whether the primary's first payload is still to be checked for TLS/SSH."""
        self.mask_ctx = b""
        """The last agreed bytes (mask flows): patterns anchor on text before a field."""
        self.mc_gap = False
        """Output went by uncompared (mc, passthrough, a resync due): the streams have a
        gap that the next checkpoint closes."""

    # -- input ---------------------------------------------------------------

    def learn(self, me: TcpSide, other: TcpSide, hdr: TcpHeader, data: bytes) -> int:
        """Update ISNs from this segment; return the offset of its first payload byte."""
        seq = hdr.seq
        if hdr.flags & TCP_SYN:
            me.isn = seq
            me.syn_opts = tcp_syn_options(data, hdr.options, hdr.payload)
            if hdr.flags & TCP_ACK:
                me.peer_isn = (hdr.ack - 1) & MASK32
            seq = (seq + 1) & MASK32
        elif me.isn < 0:
            me.isn = self._pickup(other.isn, seq, max(other.high, other.stream.end))
        if me.peer_isn < 0 and hdr.flags & TCP_ACK:
            me.peer_isn = self._pickup(other.peer_isn, hdr.ack, max(other.ack_max, 0))
        return unwrap(seq - me.isn - 1, me.stream.base + len(me.stream.buf))

    def _pickup(self, other_isn: int, number: int, other_pos: int) -> int:
        """The ISN for a side first seen mid-stream, given the other side's.

        Shared when `number` lies near the other side's position in its space
        (one sequence space, as behind QEMU's rewriter); else the side's own
        first byte seen is offset 0.
        """
        self.midstream = True  # reported with every divergence of this flow (Proxy.diverge)
        if other_isn >= 0:
            off = unwrap(number - other_isn - 1, other_pos)
            if abs(off - other_pos) <= MIDSTREAM_FIT and off >= 0:
                return other_isn
        return (number - 1) & MASK32

    def ack_offset(self, me: TcpSide, hdr: TcpHeader) -> int:
        """The segment's ACK as an offset from the client's ISN (-1 without ACK)."""
        if not hdr.flags & TCP_ACK:
            return -1
        a = unwrap(hdr.ack - me.peer_isn - 1, me.ack_max if me.ack_max > 0 else 0)
        if a > me.ack_max:
            me.ack_max = a
        return a

    def _add(self, host: FlowHost, me: TcpSide, off: int, data: bytes, start: int, end: int,
             side: str, now: float) -> None:
        stream = me.stream
        if off == stream.base + len(stream.buf) and not stream.ooo:
            stream.buf += data[start:end]
            return
        stream.add(off, data[start:end])
        if stream.conflicts != me.conflicts:
            self._report_conflict(host, me, side, now)

    def fast_primary(
        self, host: FlowHost, data: bytes, seq: int, ack: int, start: int, end: int, rel: Rel,
        flen: int, now: float, fin: int = 0,
    ) -> int:
        """An ACK-bearing segment without SYN/RST (FIN allowed).

        Returns FAST_NO when the general path must run, FAST_DONE when the
        segment was taken, FAST_PROGRESS when it was taken and `progress` must
        run before the caller's batch ends (the caller runs it once per flow
        per batch, so a burst of segments is compared and released together).
        seq.unwrap and the in-order case of _add are inlined: this runs per frame.
        Both numbers are unwrapped next to stable references, the contiguous end
        and the highest ACK, so one wild segment from a guest cannot shift the
        window for the segments after it.  fast_secondary repeats the unwrapping
        on purpose: a shared helper would cost a call per frame.
        """
        me = self.pri
        if self.diverged or self.mode or me.isn < 0 or me.peer_isn < 0:
            return FAST_NO
        if self.sniff and end > start:  # once per flow: its first payload, TLS/SSH or not
            if encrypted_kind(data[start : start + 8]) is not None:
                return FAST_NO  # on_primary switches the flow's mode
            self.sniff = False
        stream = me.stream
        near = stream.base + len(stream.buf)
        off = near + ((((seq - me.isn - 1) - near + HALF32) & MASK32) - HALF32)
        top = me.ack_max
        near_ack = top if top > 0 else 0
        a = near_ack + ((((ack - me.peer_isn - 1) - near_ack + HALF32) & MASK32) - HALF32)
        if a > top:
            me.ack_max = a
        plen = end - start
        stop = off + plen
        if plen:
            if stop > me.high:
                me.high = stop
            if off == near and not stream.ooo:
                stream.buf += data[start:end]
            else:
                self.q_ooo = True
                self._add(host, me, off, data, start, end, "primary", now)
        need = NEED_NONE
        if fin:
            need = NEED_FIN
            if me.fin is None:
                me.fin = stop
        self.queue.append(HeldFrame(stop, a, need, rel, now, off, plen, flen))
        if self.q_ooo:
            self.q_scanned = ()  # a new entry is news to the out-of-order scan
        # The caller accounts the held frame (host.hold, or inline in Proxy.feed_many).
        sec = self.sec
        if (
            sec.stream.buf or stop <= stream.base or sec.fin is not None or sec.rst is not None
            or fin
        ):
            return FAST_PROGRESS
        return FAST_DONE  # nothing can compare or go out yet

    def fast_secondary(
        self, host: FlowHost, data: bytes, seq: int, ack: int, start: int, end: int, now: float,
        fin: int = 0,
    ) -> int:
        """The secondary's counterpart of fast_primary (same return values)."""
        me = self.sec
        pri = self.pri
        if self.diverged or self.mode or me.isn < 0 or me.peer_isn < 0:
            return FAST_NO
        if not self.space_ok:
            if pri.isn < 0:
                return FAST_NO  # the general path keeps it until the primary's ISN is known
            self._decide_space(host, seq)
        stream = me.stream
        near = stream.base + len(stream.buf)
        off = near + ((((seq - me.isn - 1) - near + HALF32) & MASK32) - HALF32)
        top = me.ack_max
        near_ack = top if top > 0 else 0
        a = near_ack + ((((ack - me.peer_isn - 1) - near_ack + HALF32) & MASK32) - HALF32)
        if a > top:
            me.ack_max = a
        stop = off + end - start
        if end > start:
            if off == near and not stream.ooo:  # in order: _secondary_data inlined
                if stop > me.high:
                    me.high = stop
                stream.buf += data[start:end]
                pst = pri.stream
                if stop > pst.base + len(pst.buf):  # else this batch's progress matches it
                    self._sec_time(host, stop, now)
                if len(stream.buf) > host.max_sec_buffer:
                    self._sec_buffer_full(host, now)
            else:
                self._secondary_data(host, off, data, start, end, now)
        if fin and me.fin is None:
            me.fin = stop
        if self.queue or pri.stream.buf or pri.fin is not None or pri.rst is not None or fin:
            return FAST_PROGRESS
        return FAST_DONE  # nothing can compare or go out yet

    def _secondary_data(
        self, host: FlowHost, off: int, data: bytes, start: int, end: int, now: float
    ) -> None:
        """Buffer secondary bytes for comparison; too much unmatched forces a checkpoint."""
        me = self.sec
        stop = off + end - start
        if stop > me.high:
            me.high = stop
        if stop > me.stream.base:
            self._add(host, me, off, data, start, end, "secondary", now)
            self._sec_time(host, stop, now)
            if len(me.stream.buf) + me.stream.ooo_bytes > host.max_sec_buffer:
                self._sec_buffer_full(host, now)

    def _sec_time(self, host: FlowHost, stop: int, now: float) -> None:
        """Secondary bytes up to `stop` wait unmatched since `now` (timeouts)."""
        times = self.sec_times
        if not times:
            host.watch(self)
            if times is NO_TIMES:
                self.sec_times = times = []
        times.append((stop, now))

    @staticmethod
    def _sec_buffer_full(host: FlowHost, now: float) -> None:
        host.count("secondary_buffer_limit_hits")
        host.want_checkpoint(CheckpointReason.HOLD_LIMIT, now)

    def on_primary(
        self, host: FlowHost, hdr: TcpHeader, data: bytes, end: int, rel: Rel, flen: int,
        now: float,
    ) -> None:
        """A segment from the primary: hold it, then release whatever became safe."""
        if self.sniff and end > hdr.payload:
            uncompared.sniff(self, host, data[hdr.payload : hdr.payload + 8], now)
        if self.mode >= MODE_MC or (host.hold_all and self.mode != MODE_PASS):
            uncompared.primary_uncompared(self, host, hdr, data, end, rel, flen, now)
            return
        flags = hdr.flags
        if flags & _FAST_FLAGS == TCP_ACK and host.fast_path:
            taken = self.fast_primary(
                host, data, hdr.seq, hdr.ack, hdr.payload, end, rel, flen, now, flags & TCP_FIN
            )
            if taken:
                host.hold(self, flen)
                if taken == FAST_PROGRESS:
                    self.progress(host, now)
                return
        me = self.side_of(host, hdr, True)
        off = self.learn(me, self.sec, hdr, data)
        plen = end - hdr.payload
        stop = off + plen
        need = NEED_NONE
        if flags & TCP_SYN:
            need = NEED_HANDSHAKE
        if self.mode == MODE_PASS:
            self._pass_primary(host, rel)
            return
        if plen:
            if stop > me.high:
                me.high = stop
            if off != me.stream.end or me.stream.ooo:
                self.q_ooo = True
            me.stream.add(off, data[hdr.payload:end])
            if me.stream.conflicts != me.conflicts:
                self._report_conflict(host, me, "primary", now)
        if flags & TCP_FIN:
            need = NEED_FIN
            if me.fin is None:
                me.fin = stop
        if flags & TCP_RST:
            need = NEED_RST
            if me.rst is None:
                me.rst = stop
        ack = self.ack_offset(me, hdr)
        self.queue.append(HeldFrame(stop, ack, need, rel, now, off, plen, flen))
        if self.q_ooo:
            self.q_scanned = ()
        host.hold(self, flen)
        if self.diverged:
            return
        if self.stash:
            self._replay_stash(host)
        if (
            need == NEED_HANDSHAKE and not self.hs_ok and self.sec.syn_opts is not None
            and not self._check_handshake(host, now)
        ):
            return
        self.progress(host, now)

    def on_secondary(
        self, host: FlowHost, hdr: TcpHeader, data: bytes, end: int, now: float
    ) -> None:
        """A segment from the secondary: it is never released, only compared.

        While the flow is diverged its bytes are still buffered: if the secondary
        goes on after the checkpoint (continues), comparison resumes from them.
        """
        flags = hdr.flags
        if self.mode >= MODE_MC or (host.hold_all and self.mode != MODE_PASS):
            uncompared.secondary_uncompared(self, host, hdr, data, end)
            return
        if self.mode == MODE_PASS:
            host.count("secondary_frames_dropped_after_close_divergence")
            return
        if flags & _FAST_FLAGS == TCP_ACK and host.fast_path:
            taken = self.fast_secondary(
                host, data, hdr.seq, hdr.ack, hdr.payload, end, now, flags & TCP_FIN
            )
            if taken:
                if taken == FAST_PROGRESS:
                    self.progress(host, now)
                return
        if self.mode == MODE_UNDECIDED:
            resync.decide_after_checkpoint(self, host, hdr, now)
        me = self.side_of(host, hdr, False)
        if not flags & TCP_SYN and not self.space_ok:
            if me.isn >= 0 and self.pri.isn < 0 and self.stash_bytes <= host.max_sec_buffer:
                if not self.stash:
                    host.watch(self)
                    if self.stash is NO_STASH:
                        self.stash = []
                self.stash.append((hdr, data, end, now))
                self.stash_bytes += end - hdr.payload + 1
                return
            self._decide_space(host, hdr.seq)
        off = self.learn(me, self.pri, hdr, data)
        self.ack_offset(me, hdr)
        stop = off + end - hdr.payload
        if stop > off:
            self._secondary_data(host, off, data, hdr.payload, end, now)
        if flags & TCP_FIN and me.fin is None:
            me.fin = stop
        if flags & TCP_RST and me.rst is None:
            me.rst = stop
        if self.diverged:
            return
        if (
            flags & TCP_SYN and not self.hs_ok and self.pri.syn_opts is not None
            and not self._check_handshake(host, now)
        ):
            return
        self.progress(host, now)

    def _decide_space(self, host: FlowHost, seq: int) -> None:
        """Settle which ISN the secondary's data is numbered from.

        QEMU's filter-rewriter leaves the secondary's SYN-ACK alone but
        renumbers every later segment into the primary's sequence space.  So
        the first segment after the handshake decides: whichever ISN puts it
        nearer the expected offset is the secondary's from now on.
        """
        self.space_ok = True
        s, p = self.sec, self.pri
        if s.isn < 0 or p.isn < 0 or s.isn == p.isn:
            return
        near = s.stream.base + len(s.stream.buf)
        own = unwrap(seq - s.isn - 1, near)
        alt = unwrap(seq - p.isn - 1, near)
        if abs(alt - near) < abs(own - near):
            s.isn = p.isn
            host.count("tcp_secondary_in_primary_sequence_space")

    def _replay_stash(self, host: FlowHost) -> None:
        """The primary's ISN is known: process the secondary segments kept back."""
        stash, self.stash, self.stash_bytes = self.stash, NO_STASH, 0
        for hdr, data, end, when in stash:
            self.on_secondary(host, hdr, data, end, when)

    def _report_conflict(self, host: FlowHost, me: TcpSide, side: str, now: float) -> None:
        """One side sent different bytes for the same offset; the first copy stays."""
        me.conflicts = me.stream.conflicts
        host.overlap_conflict(self, side, me.stream.last_conflict, now)

    def side_of(self, host: FlowHost, hdr: TcpHeader, primary: bool) -> TcpSide:
        """The side a segment is from; a SYN with a new ISN first starts a new connection
        on the 4-tuple (so the side returned is the fresh one)."""
        me = self.pri if primary else self.sec
        if hdr.flags & TCP_SYN and me.isn >= 0 and hdr.seq != me.isn:
            self._new_incarnation(host)
            me = self.pri if primary else self.sec
        return me

    def _new_incarnation(self, host: FlowHost) -> None:
        """A SYN with a new ISN: the 4-tuple is reused for a new connection."""
        if self.held_frames:
            host.count("tcp_syn_reuse_while_holding")
            return
        host.count("tcp_connections_reused")
        self.pri = TcpSide()
        self.sec = TcpSide()
        self.sec_times, self.th = NO_TIMES, 0
        self.hs_ok = False
        self.closed = False
        self.space_ok = False
        self.stash, self.stash_bytes = NO_STASH, 0
        if self.mode < MODE_MC:  # mc and passthrough belong to the 4-tuple, not the connection
            self.mode = MODE_COMPARE
        self.skipping = self.close_div = self.midstream = False

    # -- comparison ----------------------------------------------------------

    def _check_handshake(self, host: FlowHost, now: float) -> bool:
        p, s = self.pri.syn_opts, self.sec.syn_opts
        if p is None or s is None:
            return True
        if p != s:
            names = ("mss", "wscale", "sack_perm", "timestamps")
            what = ", ".join(
                f"{n} {a} vs {b}" for n, a, b in zip(names, p, s, strict=True) if a != b
            )
            host.diverge(self, DivergenceKind.HANDSHAKE, 0, b"", b"", now, what)
            return False
        self.hs_ok = True
        return True

    def progress(self, host: FlowHost, now: float) -> None:
        """Compare what both sides have, check closes, release what is safe.

        _consume is inlined: this runs once per flow per batch.
        """
        if self.mode and not resync.continued_evidently(self, host, now):
            return  # undecided: nothing is compared until the secondary shows its state
        pri, sec = self.pri, self.sec
        pst, sst = pri.stream, sec.stream
        pb, sb = pst.buf, sst.buf
        lp, ls = len(pb), len(sb)
        n = lp if lp < ls else ls
        if n and self.skipping:
            n = self._skip_region(host, n)
            lp, ls = len(pb), len(sb)
        if n and self.masks:
            if not self._compare_masked(host, now, n):
                return
            n = 0
        if n:
            if not (pb == sb if lp == ls else pb[:n] == sb[:n]):
                self._payload_divergence(host, now, n)
                return
            del pb[:n]
            del sb[:n]
            pst.base += n
            sst.base += n
            times = self.sec_times
            if times and times[self.th][0] <= pst.base:
                self._trim_times(pst.base)
        if (
            pri.fin is not None or pri.rst is not None or sec.fin is not None
            or sec.rst is not None
        ) and not self._check_close(host, now):
            return
        if self.queue:
            self._release_ready(host)

    def _compare_masked(self, host: FlowHost, now: float, n: int) -> bool:
        """Compare n bytes with the noise fields blanked; False on a divergence.

        Agreeing bytes are consumed (a field still growing waits for more).
        """
        pb = self.pri.stream.buf
        agree, masked, wait = masked_agree(self.mask_ctx, pb, self.sec.stream.buf, n,
                                           self.masks)
        if masked:
            host.count("masked_bytes", masked)
        if agree:
            self.mask_ctx = (self.mask_ctx + bytes(pb[:agree]))[-MASK_CONTEXT:]
            self._consume(agree)
        if agree < n and not wait:
            self._payload_divergence(host, now, n - agree)
            return False
        return True

    def _skip_region(self, host: FlowHost, n: int) -> int:
        """Pass over the rest of a reported differing region (up to n bytes).

        Returns how many of the n comparable bytes are left after it.  Its
        primary bytes were covered by the checkpoint of its divergence.
        """
        pb, sb = self.pri.stream.buf, self.sec.stream.buf
        i = 0
        while i < n and pb[i] != sb[i]:
            i += 1
        if i < n:
            self.skipping = False
        if i:
            host.count("tcp_bytes_skipped_in_reported_region", i)
            self._consume(i)
        return n - i

    def _consume(self, n: int) -> None:
        """Both sides agreed on the next n bytes."""
        self.pri.stream.consume(n)
        self.sec.stream.consume(n)
        self._trim_times(self.pri.stream.base)

    def _trim_times(self, base: int) -> None:
        """Forget the arrival times of secondary bytes now matched (from the head)."""
        times = self.sec_times
        h = k = self.th
        n = len(times)
        while k < n and times[k][0] <= base:
            k += 1
        if k == n:
            self.sec_times, self.th = NO_TIMES, 0
        elif k > h:
            self.th = _advance(times, k)

    def _release_ready(self, host: FlowHost) -> None:
        """Release queued primary frames, in order, while each is safe to send."""
        q = self.queue
        h = self.qh
        base = self.pri.stream.base
        fin = self.pri.fin
        if fin is not None and fin == self.sec.fin and base >= fin:
            base = fin + 1  # both FINs agreed; the FIN takes one sequence number
        sec_ack = self.sec.ack_max
        k, n = h, len(q)
        while k < n:
            e = q[k]
            if e.end > base or e.ack > sec_ack:
                break
            need = e.need
            if need and not self._need_met(need, base):
                break
            k += 1
        if k < n and self.q_ooo:
            news = (base, sec_ack, self.hs_ok, self.sec.fin, self.sec.rst, self.pri.rst)
            if self.q_scanned != news or k > h:
                self.q_scanned = news
                self._release_out_of_order(host, k, base, sec_ack)
            return
        if k == h:
            return
        if k == n:  # the common case: everything queued goes
            self.q_ooo = False
            if not h:
                host.release_run(self, q)
                q.clear()  # kept for the next segments: no new list per release
                return
            run = q[h:]
            self.queue, self.qh = [], 0
        else:
            run = q[h:k]
            self.qh = _advance(q, k)
        host.release_run(self, run)

    def _release_out_of_order(self, host: FlowHost, k: int, base: int, sec_ack: int) -> None:
        """Release every safe entry, also those queued behind one that must wait.

        A retransmission that fills a gap arrives behind the segments past the
        gap; it does not depend on them.  A SYN or RST still waiting is a
        barrier: nothing queued after it may overtake it.
        """
        q = self.queue
        head = self.qh
        run = q[head:k]
        keep: list[HeldFrame] = []
        last = -1
        ordered = True
        barrier = False
        for e in q[k:]:
            need = e.need
            if (
                not barrier and e.end <= base and e.ack <= sec_ack
                and (not need or self._need_met(need, base))
            ):
                run.append(e)
                continue
            if need in (NEED_HANDSHAKE, NEED_RST):
                barrier = True
            end = e.end
            if end < last:
                ordered = False
            last = end
            keep.append(e)
        self.queue, self.qh = keep, 0
        self.q_ooo = not ordered
        if run:
            host.count("tcp_frames_released_out_of_order", len(run) - (k - head))
            host.release_run(self, run)

    def _need_met(self, need: int, base: int) -> bool:
        if need == NEED_HANDSHAKE:
            return self.hs_ok
        p, s = self.pri, self.sec
        if need == NEED_FIN:
            return p.fin is not None and p.fin == s.fin and base >= p.fin
        return p.rst is not None and p.rst == s.rst

    def _payload_divergence(self, host: FlowHost, now: float, n: int) -> None:
        pb, sb = self.pri.stream.buf, self.sec.stream.buf
        lo, hi = 0, n  # invariant: pb[:lo] == sb[:lo], pb[:hi] != sb[:hi]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if pb[lo:mid] == sb[lo:mid]:
                lo = mid
            else:
                hi = mid
        at = self.pri.stream.base + lo
        primary, secondary = bytes(pb[lo : lo + 16]), bytes(sb[lo : lo + 16])
        if lo:
            self._consume(lo)  # the agreeing prefix may still go out
            self._release_ready(host)
        self.skipping = True  # if the secondary goes on, this region is reported once
        host.diverge(self, DivergenceKind.PAYLOAD, at, primary, secondary, now)

    def _check_close(self, host: FlowHost, now: float) -> bool:
        """False (and a divergence) when the two sides close differently.

        Straight-line tests, no tuples to loop over: this runs on every batch of a
        closing flow (a short connection's FIN and last ACK on both sides)."""
        p, s = self.pri, self.sec
        pfin, prst, sfin, srst = p.fin, p.rst, s.fin, s.rst
        if pfin is not None and s.high > pfin:
            return self._close_div(host, now, DivergenceKind.LENGTH, pfin, _PAST_CLOSE)
        if prst is not None and s.high > prst:
            return self._close_div(host, now, DivergenceKind.LENGTH, prst, _PAST_CLOSE)
        if sfin is not None and p.high > sfin:
            return self._close_div(host, now, DivergenceKind.LENGTH, sfin, _PAST_CLOSE)
        if srst is not None and p.high > srst:
            return self._close_div(host, now, DivergenceKind.LENGTH, srst, _PAST_CLOSE)
        if pfin is not None and sfin is not None and pfin != sfin:
            return self._close_div(host, now, DivergenceKind.CLOSE, pfin, "FIN offsets differ")
        if prst is not None and srst is not None and prst != srst:
            return self._close_div(host, now, DivergenceKind.CLOSE, prst, "RST offsets differ")
        if srst is not None and prst is None and p.syn_opts is not None and s.syn_opts is None:
            return self._close_div(  # refused at once: no need to wait for a timeout
                host, now, DivergenceKind.CLOSE, 0, "secondary answered the SYN with RST"
            )
        if prst is not None and srst is None and s.syn_opts is not None and p.syn_opts is None:
            return self._close_div(
                host, now, DivergenceKind.CLOSE, 0, "primary answered the SYN with RST"
            )
        if pfin is not None and srst is not None and sfin is None:
            return self._close_div(
                host, now, DivergenceKind.CLOSE, pfin, "primary FIN, secondary RST"
            )
        if sfin is not None and prst is not None and pfin is None:
            return self._close_div(
                host, now, DivergenceKind.CLOSE, prst, "primary RST, secondary FIN"
            )
        if (pfin is not None and pfin == sfin) or (prst is not None and prst == srst):
            self.closed = True
        return True

    def _close_div(
        self, host: FlowHost, now: float, kind: DivergenceKind, at: int, detail: str
    ) -> bool:
        self.close_div = True
        host.diverge(self, kind, max(at, 0), b"", b"", now, detail)
        return False

    # -- timers and checkpoints ---------------------------------------------

    def after_checkpoint(self, host: FlowHost, now: float, grace: float, mode: str) -> None:
        """After a checkpoint: release everything held, then reset, continue or decide later
        (tcp_resync.py)."""
        resync.after_checkpoint(self, host, now, grace, mode)

    def adopt_vote(self, host: FlowHost, now: float) -> None:
        """Undecided with no evidence of its own: take the answer other flows found."""
        resync.adopt_vote(self, host, now)

    def pending(self) -> bool:
        """Whether anything waits here: held primary frames or unmatched secondary bytes."""
        return bool(self.queue or self.sec_times or self.stash)

    def oldest_pending(self) -> float | None:
        """Arrival time of the oldest held or unmatched output, if any."""
        times: list[float] = []
        if self.queue:
            times.append(self.queue[self.qh].time)
        if self.sec_times:
            times.append(self.sec_times[self.th][1])
        if self.stash:
            times.append(self.stash[0][3])
        return min(times) if times else None

    def due(self, timeout: float) -> float | None:
        """When expired() next has something to report, if anything waits."""
        if self.mode == MODE_UNDECIDED or self.mode == MODE_MC:
            # undecided: the secondary's bytes may be stale, not yet owed; mc: only held
            # output waits (the caller passes mc_period as the timeout)
            return self.queue[self.qh].time + timeout if self.queue else None
        oldest = self.oldest_pending()
        return None if oldest is None else oldest + timeout

    def expired(self, host: FlowHost, now: float, timeout: float) -> bool:
        """Report a timeout divergence if output waited too long; True if so.

        mc output is not compared: past mc_period it asks for the checkpoint that
        releases it.  While a resync is due nothing times out (it is coming).
        """
        if self.mode == MODE_MC:
            if self.queue and self.queue[self.qh].time + host.mc_period <= now:
                host.want_checkpoint(CheckpointReason.MC_PERIOD, now)
            return False
        if host.hold_all:
            return False
        if self.mode == MODE_UNDECIDED:
            resync.adopt_vote(self, host, now)
        if self.diverged:
            return False
        if self.queue:
            head = self.queue[self.qh]
            if head.time + timeout <= now:  # due: see earliest_timer
                base = self.pri.stream.base
                need = head.need
                gated = (
                    self.sec.isn >= 0 and head.end <= base
                    and (not need or self._need_met(need, base))
                )
                kind = DivergenceKind.ACK if gated else DivergenceKind.TIMEOUT
                at = max(0, head.start)
                host.diverge(self, kind, at, b"", b"", now, "primary output unmatched")
                return True
        if self.mode == MODE_UNDECIDED:
            return False
        if (self.sec_times and self.sec_times[self.th][1] + timeout <= now) or (
            self.stash and self.stash[0][3] + timeout <= now
        ):
            at = self.pri.stream.base
            host.diverge(self, DivergenceKind.TIMEOUT, at, b"", b"", now,
                         "secondary output unmatched")
            return True
        return False

    def _pass_primary(self, host: FlowHost, rel: Rel) -> None:
        """Release a primary frame of a flow whose comparison ended (MODE_PASS)."""
        host.count("tcp_frames_passed_after_close_divergence")
        host.release_unheld(rel)
