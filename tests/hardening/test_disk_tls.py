"""`colo-proxy run --disk-qmp tcp:... --disk-tls-creds DIR`: the disk link over (mutual) TLS.

In process first (DiskLink against DiskAgent, on both event loops), then the real
thing: a disk agent process with --tls-creds and a `colo-proxy run` process whose
primary QMP is scripted, so a checkpoint cycle (STOP, the agent's epoch, RESUME)
goes through the TLS link, and a client that does not trust the agent's CA is
refused with one error line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from colo_proxy.disk.tls import client_context
from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.errors import ConfigError
from colo_proxy.runtime import run_cli
from colo_proxy.runtime.disk_link import DiskLink
from tests.disk.agent_helpers import ROOT, AgentProcess, start_agent
from tests.fakes import FakeQmp, short_tmpdir
from tests.hardening.conftest import free_port, tls_agent

Runner = Callable[[Coroutine[Any, Any, None]], None]


async def until(cond: Callable[[], bool], what: str, tries: int = 3000) -> None:
    for _ in range(tries):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


# -- credentials and flags ---------------------------------------------------------------


def test_client_credentials_are_checked(tmp_path: Path, creds: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"--disk-tls-creds .*missing ca-cert\.pem"):
        client_context(tmp_path)
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(creds["client"] / "ca-cert.pem", half)
    shutil.copy(creds["client"] / "client-cert.pem", half)
    with pytest.raises(ConfigError, match=r"missing client-key\.pem"):
        client_context(half)
    (half / "client-cert.pem").unlink()  # a CA alone: server verified, no client cert
    assert client_context(half).verify_mode.name == "CERT_REQUIRED"


def test_disk_tls_creds_flag_and_toml_key(tmp_path: Path, creds: dict[str, Path]) -> None:
    import argparse

    base = ["--primary-in", "unix:/p,server", "--secondary-in", "unix:/s,server", "--outdev",
            "unix:/o", "--disk-qmp", "tcp:127.0.0.1:4446"]  # fmt: skip
    parser = argparse.ArgumentParser()
    run_cli.add_parser(parser.add_subparsers(dest="command"))

    def settings(*extra: str) -> Any:
        return run_cli.settings_from_values(run_cli.run_values(parser.parse_args(["run", *extra])))

    flags = settings(*base, "--disk-tls-creds", str(creds["client"]))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\ndisk_tls_creds = "{creds["client"]}"\n')
    assert flags == settings(*base, "--config", str(cfg))
    assert flags.disk_tls_creds == creds["client"]
    assert settings(*base).disk_tls_creds is None
    with pytest.raises(ConfigError, match=r"missing ca-cert\.pem"):
        settings(*base, "--disk-tls-creds", str(tmp_path))
    with pytest.raises(ConfigError, match="needs --disk-qmp"):
        settings(*base[:-2], "--disk-tls-creds", str(creds["client"]))


# -- in process ----------------------------------------------------------------------------


def link_against_agent(run_loop: Runner, creds: dict[str, Path], client: str,
                       body: Callable[[DiskLink, list[int]], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        async with tls_agent(creds["server"]) as port:
            released: list[int] = []
            link = DiskLink(parse_endpoint(f"tcp:127.0.0.1:{port}"),
                            lambda: released.append(1), tls=creds[client])
            link.start()
            try:
                await body(link, released)
            finally:
                await link.close()

    run_loop(main())


def test_disk_link_over_mutual_tls_checkpoints_and_disconnects_cleanly(
    run_loop: Runner, creds: dict[str, Path]
) -> None:
    async def body(link: DiskLink, released: list[int]) -> None:
        await until(lambda: link.driver.connected, "TLS session")
        for epoch in (1, 2):
            link.vm_stopped()
            await until(lambda e=epoch: link.gate.disk_epoch == e,  # type: ignore[misc]
                        f"disk epoch {epoch}")
            link.vm_resumed()
            assert len(released) == epoch
        assert link.report()["agent_epoch"] == 2
        await link.close()  # the hang: qemu.qmp's flush on an SSL transport never returned
        assert link.driver.stats.disconnects_abandoned == 0

    link_against_agent(run_loop, creds, "client", body)


def test_agent_refuses_a_foreign_client_certificate_in_one_line(
    run_loop: Runner, creds: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="colo_proxy")

    async def body(link: DiskLink, released: list[int]) -> None:
        await until(lambda: link.driver.stats.connect_failures >= 1, "a refused handshake")
        link.vm_stopped()
        link.vm_resumed()
        await asyncio.sleep(0.2)
        assert released == [] and link.waiting and not link.driver.connected

    link_against_agent(run_loop, creds, "rogue", body)
    errors = [r for r in caplog.records if r.name.startswith("colo_proxy")
              and r.levelno >= logging.ERROR]
    assert errors, caplog.text
    line = errors[0].getMessage()
    assert "TLS handshake failed" in line and "\n" not in line, line
    assert errors[0].exc_info is None


# -- the real processes --------------------------------------------------------------------


class RunProcess:
    """`colo-proxy run` on unix chardevs in ``d``, a scripted primary QMP, the disk link."""

    def __init__(self, d: Path, disk_port: int, tls_dir: Path) -> None:
        self.d = d
        self.log = d / "run.log"
        self.args = [
            sys.executable, "-c", "import sys; from colo_proxy.cli import main; sys.exit(main())",
            "run", "--primary-in", f"unix:{d}/pin,server", "--secondary-in",
            f"unix:{d}/sin,server", "--outdev", f"unix:{d}/out,server", "--qmp",
            f"unix:{d}/qmp", "--qmp-follow", "always", "--disk-qmp",
            f"tcp:127.0.0.1:{disk_port}", "--disk-tls-creds", str(tls_dir),
        ]  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.log, "wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, stdin=asyncio.subprocess.DEVNULL, stdout=err, stderr=err,
                env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def stop(self) -> dict[str, Any]:
        """SIGTERM, wait for the exit (a hung disconnect would hang here), the report."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
                raise AssertionError(f"run did not exit on SIGTERM: {self.text()}") from None
        for line in self.text().splitlines():
            if line.startswith('{"colo_proxy_report"'):
                report: dict[str, Any] = json.loads(line)["colo_proxy_report"]
                return report
        raise AssertionError(f"no report: {self.text()}")

    def stats_say(self, text: str) -> bool:
        """Ask for a stats line (SIGUSR1); whether one so far contains ``text``."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        return any(ln for ln in self.text().splitlines() if " stats " in ln and text in ln)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


def agent_epoch(agent: AgentProcess) -> int:
    """The agent's epoch over its unix QMP (a blocking socket: callable inside a loop)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(agent.qmp))
        with sock.makefile("rwb") as f:
            f.readline()  # the greeting
            f.write(b'{"execute": "qmp_capabilities"}\n{"execute": "query-colo-disk"}\n')
            f.flush()
            f.readline()
            return int(json.loads(f.readline())["return"]["epoch"])


async def run_cycle(d: Path, port: int, tls_dir: Path, agent: AgentProcess,
                    connected_line: str) -> dict[str, Any]:
    """Start run, wait for ``connected_line`` in its log, one checkpoint, stop it."""
    primary = FakeQmp()
    server = await asyncio.start_unix_server(primary.serve, f"{d}/qmp")
    run = RunProcess(d, port, tls_dir)
    try:
        await run.start()
        await until(lambda: "primary-qmp: QMP connected" in run.text()
                    and connected_line in run.text(), connected_line)
        await asyncio.sleep(0.2)  # the driver clears stale events once connected
        before = agent_epoch(agent)
        primary.event("STOP")
        if "QMP connected" in connected_line:
            await until(lambda: agent_epoch(agent) == before + 1, "the agent's epoch")
            primary.event("RESUME")
            await until(lambda: run.stats_say('"releases": 1'), "the release")
        else:
            primary.event("RESUME")
            await until(lambda: "memory done, waiting for the disk agent" in run.text(),
                        "the checkpoint, waiting for the disk")
        return await run.stop()
    finally:
        run.kill()
        if run.proc is not None:
            await run.proc.wait()
        server.close()


@pytest.mark.integration
def test_run_checkpoints_through_the_agent_over_tls_and_refuses_a_wrong_ca(
    creds: dict[str, Path],
) -> None:
    d = short_tmpdir()
    img = d / "img"
    img.write_bytes(bytes(1 << 20))
    port = free_port()
    agent = start_agent(d, img, "--qmp", f"tcp:127.0.0.1:{port}",
                        "--tls-creds", str(creds["server"]))
    try:
        good = asyncio.run(run_cycle(d, port, creds["client"], agent,
                                     "disk-qmp: QMP connected"))
        log_good = (d / "run.log").read_text()
        link = good["disk_link"]
        assert link["releases"] == 1 and link["disk_checkpoints_acked"] == 1, log_good
        assert link["released_epoch"] == 1
        assert agent_epoch(agent) == 1
        assert link["disconnects_abandoned"] == 0, log_good  # the TLS close hang
        assert "Traceback" not in log_good, log_good

        bad = asyncio.run(run_cycle(d, port, creds["wrongca"], agent, "TLS handshake failed"))
        log_bad = (d / "run.log").read_text()
        refused = [ln for ln in log_bad.splitlines() if "TLS handshake failed" in ln]
        assert "CERTIFICATE_VERIFY_FAILED" in refused[0], log_bad
        assert "Traceback" not in log_bad and "qemu.qmp" not in log_bad, log_bad
        link = bad["disk_link"]
        assert link["releases"] == 0 and link["disk_checkpoints_acked"] == 0, log_bad
        assert bad["shutdown"]["waiting_for_disk_agent"] is True
        assert agent_epoch(agent) == 1  # nothing reached the agent
    finally:
        agent.stop()
        shutil.rmtree(d, ignore_errors=True)
