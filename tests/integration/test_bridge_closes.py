"""`colo-proxy bridge`: a connection one guest refuses is a divergence at once, not after 3 s.

Real Linux stacks in the lab's namespaces (tools/bridge_lab.py): the server
listens in one guest only, so the other guest's kernel answers the client's
SYN with an RST, as a secondary whose service is not up yet does.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration import test_bridge_live as live

lab_tool, lab, bridge = live.lab_tool, live.lab, live.bridge  # the fixtures, shared

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("refused_by", ["secondary", "primary"])
def test_an_rst_answering_a_syn_is_a_close_divergence(
    lab: Any, bridge: Any, refused_by: str
) -> None:
    listener = "primary" if refused_by == "secondary" else "secondary"
    proxy = bridge("--log-level", "info")
    server = lab.tool(listener, "tcp-server", "--port", "8090", "--timeout", "10")
    assert server.stdout is not None and "listening" in server.stdout.readline()
    client = lab.tool("client", "tcp-client", "--host", lab.guest_ip, "--port", "8090",
                      "--timeout", "2", "--idle", "2")
    _, client_err = client.communicate(timeout=60)
    proxy.wait_for("divergence close")
    report = proxy.stop()
    live.stop_all([server])
    core = report["core"]
    assert core["divergences_by_kind"] == {"close": 1}, proxy.log  # not a compare timeout
    assert f"{refused_by} answered the SYN with RST" in proxy.log
    # the held answer (the primary's SYN-ACK or RST) never reached the client: it timed out
    assert "TimeoutError" in client_err, client_err
