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
from colo_proxy.core.flows import FlowHost, FlowKey, HeldCounts, Rel

# Entry fields: [index, rel (None for the secondary), time, matched, content, flen]
D_INDEX, D_REL, D_TIME, D_MATCHED, D_CONTENT, D_FLEN = range(6)


class DatagramFlow(HeldCounts):
    """Comparison state of one UDP, ICMP or other-protocol flow."""

    __slots__ = (
        "carried", "ghost_until", "ghosts", "kind", "pri_matched", "pri_n", "pri_order",
        "pri_wait", "reported", "sec_bytes", "sec_matched", "sec_n", "sec_order", "sec_wait",
    )

    def __init__(self, key: FlowKey, now: float, kind: DivergenceKind) -> None:
        super().__init__(key, now)
        self.kind = kind
        self.pri_wait: dict[bytes, deque[list[object]]] = {}
        self.sec_wait: dict[bytes, deque[list[object]]] = {}
        self.pri_order: deque[list[object]] = deque()
        self.sec_order: deque[list[object]] = deque()
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
                partner[D_MATCHED] = True
                self.sec_bytes -= len(content)
                host.release_unheld(rel)
                self.pri_matched = self.pri_n
                if partner[D_INDEX] > self.sec_matched:  # type: ignore[operator]
                    self.sec_matched = partner[D_INDEX]  # type: ignore[assignment]
                self._check_window(host, now, window)
                return
        entry: list[object] = [self.pri_n, rel, now, False, content, flen]
        self.pri_order.append(entry)
        self.pri_wait.setdefault(content, deque()).append(entry)
        host.hold(self, flen)
        if not self.diverged:
            self._check_window(host, now, window)

    def on_secondary(self, host: FlowHost, content: bytes, now: float, window: int) -> None:
        """Release the matching primary datagram, or wait for it."""
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
            partner[D_MATCHED] = True
            host.release(self, partner[D_REL], partner[D_FLEN], 0)  # type: ignore[arg-type]
            self.sec_matched = self.sec_n
            if partner[D_INDEX] > self.pri_matched:  # type: ignore[operator]
                self.pri_matched = partner[D_INDEX]  # type: ignore[assignment]
        else:
            entry: list[object] = [self.sec_n, None, now, False, content, 0]
            self.sec_order.append(entry)
            host.watch(self)
            self.sec_wait.setdefault(content, deque()).append(entry)
            self.sec_bytes += len(content)
            if self.sec_bytes > host.max_sec_buffer:
                host.count("secondary_buffer_limit_hits")
                host.want_checkpoint(CheckpointReason.HOLD_LIMIT, now)
        self._check_window(host, now, window)

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

    def _passed_pair(self) -> tuple[list[object], list[object]] | None:
        """The oldest unmatched datagram of each side, if the flow matched later ones of both."""
        p = self._oldest(self.pri_order)
        s = self._oldest(self.sec_order)
        if (
            p is not None and s is not None
            and p[D_INDEX] < self.pri_matched and s[D_INDEX] < self.sec_matched  # type: ignore[operator]
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
    def _pair_due(pair: tuple[list[object], list[object]], timeout: float) -> float:
        p, s = pair
        return max(p[D_TIME], s[D_TIME]) + timeout / 10  # type: ignore[call-overload,no-any-return]

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
    def _oldest(order: deque[list[object]]) -> list[object] | None:
        while order and order[0][D_MATCHED]:
            order.popleft()
        return order[0] if order else None

    def _check_window(self, host: FlowHost, now: float, window: int) -> None:
        po, so = self.pri_order, self.sec_order
        if (not po or self.sec_n - po[0][D_INDEX] < window) and (  # type: ignore[operator]
            not so or self.pri_n - so[0][D_INDEX] < window  # type: ignore[operator]
        ):
            return  # indexes grow along each queue: if its head is in the window, all are
        p = self._oldest(self.pri_order)
        s = self._oldest(self.sec_order)
        late_p = p is not None and self.sec_n - p[D_INDEX] >= window  # type: ignore[operator]
        late_s = s is not None and self.pri_n - s[D_INDEX] >= window  # type: ignore[operator]
        if late_p or late_s:
            pc: bytes = p[D_CONTENT] if p is not None else b""  # type: ignore[assignment]
            sc: bytes = s[D_CONTENT] if s is not None else b""  # type: ignore[assignment]
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
        return min(h[D_TIME] for h in heads) if heads else None  # type: ignore[type-var,return-value]

    def expired(self, host: FlowHost, now: float, timeout: float) -> bool:
        """Report a timeout divergence if a datagram waited too long; True if so."""
        if self.diverged:
            return False
        pair = self._passed_pair()
        if pair is not None and self._pair_due(pair, timeout) <= now:
            p, s = pair
            self._diverge_pair(host, now, p[D_CONTENT], s[D_CONTENT])  # type: ignore[arg-type]
            return True
        for order, who in ((self.pri_order, "primary"), (self.sec_order, "secondary")):
            head = self._oldest(order)
            if head is not None and head[D_TIME] + timeout <= now:  # type: ignore[operator]
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
                if not entry[D_MATCHED]:
                    content_s: bytes = entry[D_CONTENT]  # type: ignore[assignment]
                    self.carried[content_s] = self.carried.get(content_s, 0) + 1
            if self.reported is not None and self.reported in self.carried:
                self._take(self.carried, self.reported, now)
        self.reported = None
        for entry in self.pri_order:
            if not entry[D_MATCHED]:
                host.release(self, entry[D_REL], entry[D_FLEN], 0)  # type: ignore[arg-type]
                content: bytes = entry[D_CONTENT]  # type: ignore[assignment]
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
