"""`disk-agent --metrics`: epochs and buffered bytes scraped from a real agent process."""

from __future__ import annotations

import json
import shutil

from tests.disk.agent_helpers import NbdClient, start_agent
from tests.fakes import short_tmpdir
from tests.metrics_helpers import by_name, free_port, scrape


def test_disk_agent_metrics_follow_writes_and_epochs() -> None:
    workdir = short_tmpdir()
    try:
        image = workdir / "disk.img"
        image.write_bytes(bytes(1 << 20))
        port = free_port()
        agent = start_agent(workdir, image, "--metrics", f"127.0.0.1:{port}",
                            "--log-format", "json", main_cli=True)
        try:
            first = scrape(port)
            nbd = NbdClient(agent.nbd)
            nbd.write(0, b"x" * 4096)
            written = scrape(port)
            mon = agent.monitor()
            assert mon.cmd_raw("colo-disk-checkpoint", {"epoch": 1})["return"] == {"epoch": 1}
            mon.close()
            nbd.close()
            committed = scrape(port)
        finally:
            agent.stop()
        log_lines = [json.loads(x) for x in agent.stderr().splitlines() if x.startswith("{")]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    epoch = "colo_disk_agent_epoch"
    held = "colo_disk_agent_bytes"
    assert by_name(first, epoch)[(("state", "committed"),)] == 0
    assert by_name(written, held)[(("kind", "speculation"),)] >= 4096
    assert by_name(committed, epoch)[(("state", "committed"),)] == 1
    assert by_name(committed, epoch)[(("state", "sealed"),)] == 1
    assert any("disk-agent ready" in x["message"] for x in log_lines)
