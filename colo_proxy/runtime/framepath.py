"""The per-read path of a live proxy, compiled: feed the core, send what it released, re-arm.

Why a class of its own: :class:`~colo_proxy.runtime.host.CoreHost` is
subclassed by interpreted classes (Bridge, FailoverSupervisor), which a
mypyc-compiled class forbids, so the host stays interpreted; this final
class holds only what runs for every read (``Proxy.feed_many``,
``take_output``, the released frames out, the one timer following
``next_deadline``), and the host keeps the rest (checkpoint requests,
divergences, mode switches, refused flows, pass-through, the disk link),
reached through the callables it hands over.  At 1k frames/s every read is
its own wake-up, so what surrounds the core there is paid once per frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, Protocol, final

from colo_proxy.core.events import CoreOutput, Side
from colo_proxy.core.framing import Frame
from colo_proxy.core.proxy import CoreFault

PRIMARY: Final = Side.PRIMARY
SECONDARY: Final = Side.SECONDARY


class Core(Protocol):
    """What the path calls on the core: a Proxy, or what stands in for one (live_obs's
    TapProxy wraps it for --metrics; tests make a core fail).  A protocol, so the
    compiled path takes either (a Proxy-typed attribute would refuse the stand-ins)."""

    @property
    def counters(self) -> dict[str, int]: ...
    def feed_many(self, side: Side, frames: list[Frame], now: float) -> object: ...
    def take_output(self) -> CoreOutput: ...
    def next_deadline(self) -> float | None: ...
    def tick(self, now: float) -> object: ...


@final
class FramePath:
    """Feed, drain, send and re-arm for one host; the host's hooks for everything rare."""

    def __init__(
        self,
        proxy: Core,
        clock: Callable[[], float],
        send: Callable[[list[Frame]], object],
        rare: Callable[[CoreOutput, float], None],
        core_error: Callable[[Side, Frame | None], None],
        host_feed: Callable[[Side, list[Frame]], None],
        host_after: Callable[[float], None],
    ) -> None:
        self.proxy = proxy
        """The host's core (the host sets this again when its ``proxy`` is replaced)."""
        self.clock = clock
        self.send = send
        """Released frames out (the host's _send_released, or run's outdev directly)."""
        self.rare = rare
        """Switches, requests, divergences, refused flows: the host carries them out."""
        self.core_error = core_error
        self.host_feed = host_feed
        """The host's own _feed, for reads while ``bypass`` is set."""
        self.host_after = host_after
        """The host's _after (a subclass may add to it), called when the timer fires."""
        self.bypass = False
        """Reads go to ``host_feed`` (pass-through, a disk link, a host that overrides _feed)."""
        self.refused_logged = 0
        """flows_refused when the host last logged it (its _log_refused sets this)."""
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None

    def feed_primary(self, frames: list[Frame]) -> None:
        """One read's frames from primary_in (a RecordChannel's on_frames)."""
        self.feed(PRIMARY, frames)

    def feed_secondary(self, frames: list[Frame]) -> None:
        """One read's frames from secondary_in."""
        self.feed(SECONDARY, frames)

    def feed(self, side: Side, frames: list[Frame]) -> None:
        if self.bypass:
            self.host_feed(side, frames)
            return
        now = self.clock()
        self.compare(side, frames, now)
        self.after(now)

    def compare(self, side: Side, frames: list[Frame], now: float) -> None:
        """Feed one read's frames to the core at once; a core exception costs that frame only."""
        feed_many = self.proxy.feed_many
        done = 0
        while done < len(frames):
            try:
                feed_many(side, frames[done:] if done else frames, now)
                done = len(frames)
            except CoreFault as fault:  # a core bug must not cost the connection
                if fault.index < 0:  # every frame was fed; comparing them afterwards failed
                    self.core_error(side, None)
                    return
                done += fault.index
                self.core_error(side, frames[done])
                done += 1

    def after(self, now: float) -> None:
        """Carry out everything the core produced; re-arm the timer."""
        proxy = self.proxy
        out = proxy.take_output()
        if out.released:
            self.send(out.released)
        if (out.switches or out.requests or out.divergences
                or proxy.counters["flows_refused"] != self.refused_logged):
            self.rare(out, now)
        deadline = proxy.next_deadline()
        if deadline is not None:
            timer_at = self.timer_at
            if timer_at is None or deadline < timer_at:
                timer = self.timer
                if timer is not None:
                    timer.cancel()
                self.timer_at = deadline
                self.timer = asyncio.get_running_loop().call_later(
                    max(0.0, deadline - now), self.on_timer
                )

    def on_timer(self) -> None:
        self.timer = None
        self.timer_at = None
        now = self.clock()
        self.proxy.tick(now)
        self.host_after(now)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.timer_at = None
