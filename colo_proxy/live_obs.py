"""Metrics and saved divergences attached to a live host (`run`, `bridge`).

One call when the host exists, on its loop: puts a TapProxy in front of the
host's core when anything wants to observe it, starts the metrics server, and
returns what to do at shutdown.  With neither flag the host is left untouched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a flag asks for it: a plain start never loads observe
    from colo_proxy.observe import Observer

HOST_OBS_KEYS: dict[str, tuple[type, Any]] = {
    "metrics": (str, None),
    "log_format": (str, "text"),
    "save_divergences": (str, None),
    "save_divergences_max_bytes": (int, 64 * 1024 * 1024),
}
"""Settings of run and bridge for observing them (flags and [run]/[bridge] keys)."""


def attach(host: Any, values: Mapping[str, Any]) -> Callable[[dict[str, object]], None]:
    """Observe `host` as `values` ask; the returned function closes it all (and reports)."""
    observers: list[Observer] = []
    saver = None
    stop_server: Callable[[], None] | None = None
    if values.get("save_divergences"):
        from colo_proxy.observe import DivergenceSaver

        saver = DivergenceSaver(str(values["save_divergences"]),
                                int(values.get("save_divergences_max_bytes") or 0))
        observers.append(saver)
    if values.get("metrics"):
        from colo_proxy.metrics import LiveMetrics, loop_snapshot, serve

        live = LiveMetrics()
        live.attach(loop_snapshot(asyncio.get_running_loop(), host.stats))
        observers.append(live)
        stop_server = serve(str(values["metrics"]), live.registry)
    if observers:
        from colo_proxy.observe import TapProxy

        host.proxy = TapProxy(host.proxy, observers)

    def close(report: dict[str, object]) -> None:
        if stop_server is not None:
            stop_server()
        if saver is not None:
            report["saved_divergences"] = saver.report()

    return close
