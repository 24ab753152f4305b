"""tools/grafana-dashboard.json is valid and only plots metrics the proxy serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

from colo_proxy.metrics import LiveMetrics, disk_agent_registry

DASHBOARD = Path(__file__).resolve().parents[1] / "tools" / "grafana-dashboard.json"


def test_dashboard_uses_served_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bcolo_[a-z_]+", e)}
    live = LiveMetrics()
    live.attach(lambda: {"core": {"divergences_by_kind": {"payload": 1},
                                  "checkpoints_requested_by_reason": {"divergence": 1},
                                  "malformed": {"runt": 1}, "uncompared": {"arp": 1}}})
    served = generate_latest(live.registry).decode()
    served += generate_latest(disk_agent_registry(lambda: {"disk_agent": {"sealed": 1}})).decode()
    names = set(re.findall(r"^(colo_[a-z_]+)", served, re.M))
    assert used and used <= names, used - names
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
