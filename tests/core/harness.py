"""A tiny driver for core tests: feed events, collect what the core says."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from colo_proxy.core.config import Config
from colo_proxy.core.events import CheckpointRequest, Divergence, Side
from colo_proxy.core.proxy import Proxy

P, S, C = Side.PRIMARY, Side.SECONDARY, Side.CLIENT


@dataclass
class Run:
    """Outcome of feeding a scenario."""

    proxy: Proxy
    released: list[bytes] = field(default_factory=list)
    requests: list[CheckpointRequest] = field(default_factory=list)
    divergences: list[Divergence] = field(default_factory=list)

    def collect(self) -> None:
        out = self.proxy.take_output()
        self.released += [d[o:] for d, o in out.released]
        self.requests += out.requests
        self.divergences += out.divergences

    @property
    def kinds(self) -> list[tuple[str, int | None]]:
        return [(d.kind.value, d.offset) for d in self.divergences]


def run(events: Iterable[tuple[Side, bytes]], config: Config | None = None,
        step: float = 0.001, auto_checkpoint: bool = False, end_time: float | None = None) -> Run:
    """Feed (side, frame) events `step` seconds apart; optionally complete checkpoints."""
    r = Run(Proxy(config or Config()))
    now = 0.0
    for side, frame in events:
        r.proxy.feed(side, frame, now)
        r.collect()
        if auto_checkpoint and r.requests and r.proxy.state.value == "requested":
            r.proxy.checkpoint_started(now)
            r.proxy.checkpoint_done(now)
            r.collect()
        now += step
    if end_time is not None:
        while now <= end_time:
            r.proxy.tick(now)
            r.collect()
            now += 0.05
    return r
