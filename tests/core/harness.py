"""A tiny driver for core tests: feed events, collect what the core says."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pytest

from colo_proxy.core.config import Config
from colo_proxy.core.events import CheckpointRequest, Divergence, Side
from colo_proxy.core.proxy import Proxy

P, S, C = Side.PRIMARY, Side.SECONDARY, Side.CLIENT

FAST_PATH = True
"""Whether make_proxy's proxies use the fast path (set by the both_paths fixture)."""


def make_proxy(config: Config | None = None) -> Proxy:
    """A Proxy on the path the current test runs (see both_paths)."""
    return Proxy(config or Config(), fast_path=FAST_PATH)


@pytest.fixture(scope="module", params=[True, False], ids=["fast", "general"])
def both_paths(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Run a module's tests with the fast paths on, then with every frame general.

    Module-scoped (hypothesis refuses function-scoped fixtures); use with
    `pytestmark = pytest.mark.usefixtures("both_paths")` and make_proxy/run.
    """
    global FAST_PATH
    FAST_PATH = request.param
    yield request.param
    FAST_PATH = True


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
    r = Run(make_proxy(config))
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
