"""Comparison of datagram flows: UDP, ICMP/ICMPv6 and other IP protocols.

Theory of operation
-------------------
Each datagram is reduced to its content (what the application chose: UDP
payload, ICMP type/code/body without the checksum, or the whole IP payload
for other protocols); header noise never enters it.  A primary datagram is
released the moment the secondary produced the same content, in whatever
order they arrive.  Datagrams are numbered per side; when a datagram is
still unmatched after the other side sent `window` more, its partner is
not coming: that is a divergence.  So is an unmatched pair, one on each
side, when a later datagram of each side has matched (the flow moved on past
both) and the pair is still unmatched a tenth of the compare timeout later
(reordering resolves in far less): a `udp`/`icmp`/`other` divergence with
both contents from their first differing byte, not a timeout.  Other
unmatched output older than the compare timeout is a timeout divergence.
"""

from __future__ import annotations

from collections import deque

from colo_proxy.core.events import CheckpointReason, DivergenceKind
from colo_proxy.core.flows import MODE_MC, MODE_PASSTHROUGH, FlowHost, FlowKey, HeldCounts, Rel
from colo_proxy.core.held import HeldDatagram
from colo_proxy.core.masks import mask_datagram


class DatagramFlow(HeldCounts):
    """Comparison state of one UDP, ICMP or other-protocol flow."""

    __slots__ = (
        "carried", "ghost_until", "ghosts", "kind", "pri_matched", "pri_n", "pri_order",
        "pri_wait", "reported", "sec_bytes", "sec_matched", "sec_n", "sec_order", "sec_wait",
    )

    def __init__(self, key: FlowKey, now: float, kind: DivergenceKind) -> None:
        super().__init__(key, now)
        self.kind = kind
        self.pri_wait: dict[bytes, deque[HeldDatagram]] = {}
        self.sec_wait: dict[bytes, deque[HeldDatagram]] = {}
        self.pri_order: deque[HeldDatagram] = deque()
        self.sec_order: deque[HeldDatagram] = deque()
        self.pri_n = 0
        self.sec_n = 0
        self.sec_bytes = 0
        """Bytes of secondary datagrams waiting for a partner (bounded by max_sec_buffer)."""
        self.ghosts: dict[bytes, int] = {}
        """Contents the primary sent before the last checkpoint with no partner yet:
        the secondary's copies may still be in flight and are absorbed, not compared."""
        self.ghost_until = 0.0
        self.pri_matched = 0
        self.sec_matched = 0
        """Index of the latest matched datagram of each side."""
        self.carried: dict[bytes, int] = {}
        """Secondary contents unmatched at the last checkpoint, when the secondary goes on
        in its own state: a primary datagram arriving soon after may still match them."""
        self.reported: bytes | None = None
        """The secondary content of the last divergence (never carried)."""

    def on_primary(
        self, host: FlowHost, content: bytes, rel: Rel, flen: int, now: float, window: int
    ) -> None:
        """Release at once if the secondary already sent it, else hold."""
        if self.mode >= MODE_MC or host.hold_all:
            self._primary_uncompared(host, content, rel, flen, now)
            return
        if self.masks:
            content = self._masked(host, content)
        self.pri_n += 1
        if self.carried and not self.diverged and self._take(self.carried, content, now):
            host.count("primary_datagrams_matched_across_checkpoint")
            host.release_unheld(rel)
            return
        if not self.diverged:
            waiting = self.sec_wait.get(content)
            if waiting:
                partner = waiting.popleft()
                if not waiting:
                    del self.sec_wait[content]
                partner.matched = True
                self.sec_bytes -= len(content)
                host.release_unheld(rel)
                self.pri_matched = self.pri_n
                if partner.index > self.sec_matched:
                    self.sec_matched = partner.index
                self._check_window(host, now, window)
                return
        entry = HeldDatagram(self.pri_n, rel, now, content, flen)
        self.pri_order.append(entry)
        self.pri_wait.setdefault(content, deque()).append(entry)
        host.hold(self, flen)
        if not self.diverged:
            self._check_window(host, now, window)

    def on_secondary(self, host: FlowHost, content: bytes, now: float, window: int) -> None:
        """Release the matching primary datagram, or wait for it."""
        if self.mode >= MODE_MC or host.hold_all:
            host.count("secondary_frames_dropped_uncompared_mode")
            return
        if self.masks:
            content = self._masked(host, content)
        if self.diverged:
            host.count("secondary_frames_dropped_diverged")
            return
        if self.ghosts and self._take(self.ghosts, content, now):
            host.count("secondary_datagrams_late_after_checkpoint")
            return
        self.sec_n += 1
        waiting = self.pri_wait.get(content)
        if waiting:
            partner = waiting.popleft()
            if not waiting:
                del self.pri_wait[content]
            partner.matched = True
            if partner.rel is not None:  # always: the primary's entries carry their frames
                host.release(self, partner.rel, partner.flen, 0)
            self.sec_matched = self.sec_n
            if partner.index > self.pri_matched:
                self.pri_matched = partner.index
        else:
            entry = HeldDatagram(self.sec_n, None, now, content, 0)
            self.sec_order.append(entry)
            host.watch(self)
            self.sec_wait.setdefault(content, deque()).append(entry)
            self.sec_bytes += len(content)
            if self.sec_bytes > host.max_sec_buffer:
                host.count("secondary_buffer_limit_hits")
                host.want_checkpoint(CheckpointReason.HOLD_LIMIT, now)
        self._check_window(host, now, window)

    def _primary_uncompared(
        self, host: FlowHost, content: bytes, rel: Rel, flen: int, now: float
    ) -> None:
        """mc: held until the next checkpoint; passthrough: released now (both uncompared)."""
        if self.mode == MODE_PASSTHROUGH:
            host.count("frames_passthrough")
            host.release_unheld(rel)
            return
        host.count("frames_held_mc")
        self.pri_n += 1
        entry = HeldDatagram(self.pri_n, rel, now, content, flen)
        self.pri_order.append(entry)  # not in pri_wait: nothing will match it
        host.hold(self, flen)

    def _masked(self, host: FlowHost, content: bytes) -> bytes:
        masked, n = mask_datagram(content, self.masks)
        if n:
            host.count("masked_bytes", n)
        return masked

    def _take(self, contents: dict[bytes, int], content: bytes, now: float) -> bool:
        """True if `content` is one of the other side's, kept since the last checkpoint."""
        if now > self.ghost_until:
            contents.clear()
            return False
        left = contents.get(content, 0)
        if not left:
            return False
        if left == 1:
            del contents[content]
        else:
            contents[content] = left - 1
        return True

    def _passed_pair(self) -> tuple[HeldDatagram, HeldDatagram] | None:
        """The oldest unmatched datagram of each side, if the flow matched later ones of both."""
        p = self._oldest(self.pri_order)
        s = self._oldest(self.sec_order)
        if (
            p is not None and s is not None
            and p.index < self.pri_matched and s.index < self.sec_matched
        ):
            return p, s
        return None

    def due(self, timeout: float) -> float | None:
        """When expired() next has something to report, if anything is unmatched."""
        oldest = self.oldest_pending()
        if oldest is None:
            return None
        pair = self._passed_pair()
        if pair is not None:
            return min(oldest + timeout, self._pair_due(pair, timeout))
        return oldest + timeout

    @staticmethod
    def _pair_due(pair: tuple[HeldDatagram, HeldDatagram], timeout: float) -> float:
        p, s = pair
        return max(p.time, s.time) + timeout / 10

    def _diverge_pair(self, host: FlowHost, now: float, pc: bytes, sc: bytes) -> None:
        """Report two datagrams that differ, each shown from the first differing byte."""
        n = min(len(pc), len(sc))
        lo = next((i for i in range(n) if pc[i] != sc[i]), n)
        if len(pc) != len(sc):
            detail = f"lengths differ ({len(pc)} vs {len(sc)} bytes), from byte {lo}"
        else:
            detail = f"contents differ from byte {lo}"
        self.reported = sc
        host.diverge(self, self.kind, None, pc[lo : lo + 16], sc[lo : lo + 16], now, detail)

    @staticmethod
    def _oldest(order: deque[HeldDatagram]) -> HeldDatagram | None:
        while order and order[0].matched:
            order.popleft()
        return order[0] if order else None

    def _check_window(self, host: FlowHost, now: float, window: int) -> None:
        po, so = self.pri_order, self.sec_order
        if (not po or self.sec_n - po[0].index < window) and (
            not so or self.pri_n - so[0].index < window
        ):
            return  # indexes grow along each queue: if its head is in the window, all are
        p = self._oldest(self.pri_order)
        s = self._oldest(self.sec_order)
        late_p = p is not None and self.sec_n - p.index >= window
        late_s = s is not None and self.pri_n - s.index >= window
        if late_p or late_s:
            pc = p.content if p is not None else b""
            sc = s.content if s is not None else b""
            if p is not None and s is not None:
                self._diverge_pair(host, now, pc, sc)
            else:
                host.diverge(self, self.kind, None, pc[:16], sc[:16], now, "no partner datagram")

    def pending(self) -> bool:
        """Whether any datagram of either side is still unmatched."""
        return self._oldest(self.pri_order) is not None or self._oldest(self.sec_order) is not None

    def oldest_pending(self) -> float | None:
        """Arrival time of the oldest unmatched datagram, if any."""
        heads = [h for h in (self._oldest(self.pri_order), self._oldest(self.sec_order)) if h]
        return min(h.time for h in heads) if heads else None

    def expired(self, host: FlowHost, now: float, timeout: float) -> bool:
        """Report a timeout divergence if a datagram waited too long; True if so.

        mc datagrams ask for the checkpoint that releases them past mc_period.
        """
        if self.mode == MODE_MC:
            head = self._oldest(self.pri_order)
            if head is not None and head.time + host.mc_period <= now:
                host.want_checkpoint(CheckpointReason.MC_PERIOD, now)
            return False
        if self.diverged or host.hold_all:
            return False
        pair = self._passed_pair()
        if pair is not None and self._pair_due(pair, timeout) <= now:
            p, s = pair
            self._diverge_pair(host, now, p.content, s.content)
            return True
        for order, who in ((self.pri_order, "primary"), (self.sec_order, "secondary")):
            head = self._oldest(order)
            if head is not None and head.time + timeout <= now:
                host.diverge(self, DivergenceKind.TIMEOUT, None, b"", b"", now,
                             f"{who} datagram unmatched")
                return True
        return False

    def after_checkpoint(self, host: FlowHost, now: float, grace: float, mode: str) -> None:
        """After a checkpoint: release held primary datagrams in arrival order.

        Their secondary copies may still arrive for `grace` seconds; they are
        absorbed rather than left unmatched (TCP gets the same effect from
        ignoring bytes below the compared offset).  Unless the secondary was
        reset (`mode`), its datagrams still unmatched are carried for as long:
        the primary's copies may be on their way (the reported one excepted).
        """
        self.ghosts.clear()
        self.carried.clear()
        if mode != "reset":
            for entry in self.sec_order:
                if not entry.matched:
                    content_s = entry.content
                    self.carried[content_s] = self.carried.get(content_s, 0) + 1
            if self.reported is not None and self.reported in self.carried:
                self._take(self.carried, self.reported, now)
        self.reported = None
        for entry in self.pri_order:
            if not entry.matched and entry.rel is not None:
                host.waited(self, entry.time, 1)
                host.release(self, entry.rel, entry.flen, 0)
                content = entry.content
                self.ghosts[content] = self.ghosts.get(content, 0) + 1
        self.ghost_until = now + grace
        self.pri_order.clear()
        self.sec_order.clear()
        self.sec_bytes = 0
        self.pri_wait.clear()
        self.sec_wait.clear()
        self.pri_n = self.sec_n = 0
        self.pri_matched = self.sec_matched = 0
        self.diverged = False
        self.mode = host.flow_mode(self, now)
