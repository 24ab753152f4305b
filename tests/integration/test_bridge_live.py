"""`colo-proxy bridge` live between real, unmodified Linux stacks in network namespaces.

tools/bridge_lab.py builds the lab: client, primary and secondary namespaces,
the guests sharing one MAC and IP address, offloads off, and the three host
veth ends in the root namespace, where `colo-proxy bridge` runs as a
subprocess.  Every test gets its own uniquely named lab, always deleted.
Timeouts only bound waiting; nothing asserts on time.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.tools_loader import load_tool

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SIZE = 300_000


@pytest.fixture(scope="module")
def lab_tool() -> ModuleType:
    return load_tool("bridge_lab")


@pytest.fixture
def lab(lab_tool: ModuleType) -> Iterator[Any]:
    reason = lab_tool.available()
    if reason is not None:
        pytest.skip(reason)
    with lab_tool.BridgeLab() as built:
        yield built


class BridgeProcess:
    """`colo-proxy bridge` in the root namespace; its log kept, its report parsed at stop."""

    def __init__(self, lab: Any, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "colo_proxy.cli", "bridge", *lab.bridge_args(), *extra],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for("bridge up")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, count: int = 1) -> None:
        """Until ``count`` log lines contain ``text`` (the wait is bounded, not asserted on)."""
        deadline = time.monotonic() + 30
        while sum(text in line for line in self.lines) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {text!r} in the bridge's log:\n" + self.log)
            time.sleep(0.02)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> dict[str, Any]:
        """SIGINT, wait, and the final JSON report."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        assert self.proc.returncode == 0, self.log
        last = json.loads(self.lines[-1])
        report: dict[str, Any] = last["colo_proxy_report"]
        return report

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def bridge(lab: Any) -> Iterator[Any]:
    started: list[BridgeProcess] = []

    def start(*extra: str) -> BridgeProcess:
        started.append(BridgeProcess(lab, *extra))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()


def result(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    """The one JSON line a lab program prints last."""
    out, err = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    assert lines, f"no output; stderr: {err}"
    parsed: dict[str, Any] = json.loads(lines[-1])
    return parsed


def start_servers(lab: Any, *args: str, secondary: tuple[str, ...] = ()) -> list[Any]:
    """The same server in both guests (the secondary's with extra args); wait until listening."""
    servers = [lab.tool("primary", *args), lab.tool("secondary", *args, *secondary)]
    for server in servers:
        assert server.stdout is not None
        assert "listening" in server.stdout.readline()
    return servers


def stop_all(procs: list[Any]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def fetch(lab: Any, port: int, size: int = SIZE, idle: float = 10.0) -> dict[str, Any]:
    """One TCP fetch of ``size`` bytes from both guests through the bridge; the client's result."""
    servers = start_servers(lab, "tcp-server", "--size", str(size), "--port", str(port),
                            "--timeout", "30")
    client = result(lab.tool("client", "tcp-client", "--host", lab.guest_ip, "--size",
                             str(size), "--port", str(port), "--idle", str(idle)))
    stop_all(servers)
    return client


def fetch_with_stops(
    lab: Any, proxy: BridgeProcess, size: int, first: float, stops: int = 3
) -> dict[str, Any]:
    """:func:`fetch` while the proxy is stopped (SIGSTOP) ``stops`` times for 0.4 s, the
    first after ``first`` seconds: what overflows rings in production, a descheduled proxy."""
    client: dict[str, Any] = {}
    fetcher = threading.Thread(
        target=lambda: client.update(fetch(lab, 8080, size=size, idle=20.0))
    )
    fetcher.start()
    for _ in range(stops):
        time.sleep(first)
        proxy.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.4)
        proxy.proc.send_signal(signal.SIGCONT)
    fetcher.join(timeout=300)
    return client


def test_tcp_fetch_through_the_bridge(lab: Any, bridge: Any) -> None:
    """The client gets every byte; the secondary's kernel takes the translated ACKs."""
    proxy = bridge()
    servers = start_servers(lab, "tcp-server", "--size", str(SIZE))
    client = result(lab.tool("client", "tcp-client", "--host", lab.guest_ip, "--size", str(SIZE)))
    primary, secondary = (result(s) for s in servers)
    report = proxy.stop()
    assert client["complete"] and client["eof"], client
    for server in (primary, secondary):
        # every byte and the FIN were acknowledged by the (for the secondary: translated)
        # client ACKs, and the client's FIN arrived
        assert server["sent"] == SIZE and server["eof"] and server["unacked"] == 0, server
    core = report["core"]
    assert core["divergences_by_kind"] == {}, proxy.log
    assert core["released_payload_bytes"] >= SIZE  # a tail-loss probe is released again
    assert core["released_frames"] > 0 and core["held_frames"] == 0
    assert core["secondary_frames"] > 0 and core["client_frames"] > 0
    assert report["rewriter"]["rewritten_frames"] > 0
    assert report["rewriter"]["ended_rst"] == 0
    assert report["client-if"]["frames_out"] == core["released_frames"]
    # the client's frames reached the primary in the kernel (tc mirred), not through us
    assert report["supervisor"]["kernel_forward_installed"] == 1
    assert report["primary-if"]["frames_out"] == 0
    assert report["supervisor"]["checkpoint_requests"] == 0
    assert report["shutdown"]["held_frames_at_stop"] == 0


@pytest.mark.parametrize("mirror", [True, False], ids=["kernel-mirror", "no-kernel-mirror"])
def test_udp_echo_through_the_bridge(lab: Any, bridge: Any, mirror: bool) -> None:
    """UDP needs no translation: by default the kernel copies it to the secondary (tc mirred)."""
    proxy = bridge() if mirror else bridge("--no-kernel-mirror")
    servers = start_servers(lab, "udp-echo", "--count", "20")
    client = result(lab.tool("client", "udp-client", "--host", lab.guest_ip, "--count", "20"))
    echoes = [result(s) for s in servers]
    report = proxy.stop()
    assert client["good_echoes"] == 20, client
    assert echoes == [{"echoed": 20}, {"echoed": 20}]
    core = report["core"]
    assert core["divergences_by_kind"] == {}, proxy.log
    assert core["released_frames"] >= 20 and core["held_frames"] == 0
    assert core["client_frames"] >= 20  # the core still sees every client frame
    assert report["supervisor"]["kernel_mirror_changes"] == int(mirror)
    if mirror:  # nothing went to the secondary through us: the kernel carried it all
        assert report["secondary-if"]["frames_out"] == 0
        assert report["rewriter"]["client_frames"] == 0
    else:
        assert report["secondary-if"]["frames_out"] >= 20


def test_diverging_secondary_holds_the_primarys_bytes(lab: Any, bridge: Any) -> None:
    """A secondary that answers differently: divergence, a checkpoint wanted, output held."""
    diverge_at = 150_000
    proxy = bridge()
    servers = start_servers(
        lab, "tcp-server", "--size", str(SIZE), "--timeout", "20",
        secondary=("--diverge-at", str(diverge_at)),
    )
    client_proc = lab.tool(
        "client", "tcp-client", "--host", lab.guest_ip, "--size", str(SIZE), "--idle", "3"
    )
    client = result(client_proc)
    report = proxy.stop()
    stop_all(servers)
    assert client["prefix_ok"] and not client["complete"], client
    assert 0 < client["received"] <= diverge_at  # the diverging byte never reached the client
    core = report["core"]
    assert client["received"] == core["released_payload_bytes"]
    assert core["divergences_by_kind"].get("payload", 0) >= 1, proxy.log
    assert "divergence payload" in proxy.log
    assert report["supervisor"]["checkpoint_requests"] >= 1
    assert report["supervisor"]["requests_unrouted"] >= 1  # no --qmp
    assert report["shutdown"]["held_frames_at_stop"] > 0
    assert report["shutdown"]["held_frames_not_released"] > 0  # --on-shutdown report


def test_arp_resolves_through_the_bridge(lab: Any, bridge: Any, lab_tool: ModuleType) -> None:
    """The client learns the guests' MAC: ARP requests reach both, the primary's reply returns."""
    proxy = bridge()
    servers = start_servers(lab, "udp-echo", "--count", "1")
    client = result(lab.tool("client", "udp-client", "--host", lab.guest_ip, "--count", "1"))
    stop_all(servers)
    neigh = subprocess.run(
        ["ip", "-n", lab.ns["client"], "neigh", "show", lab.guest_ip],
        capture_output=True, text=True, check=True,
    ).stdout
    report = proxy.stop()
    assert client["good_echoes"] == 1
    assert lab_tool.GUEST_MAC in neigh.lower(), neigh
    core = report["core"]
    assert core["uncompared"].get("arp", 0) >= 1  # the primary's reply, passed on
    assert core["divergences_by_kind"] == {}


def test_a_fresh_secondary_resolves_its_neighbours(
    lab: Any, bridge: Any, lab_tool: ModuleType
) -> None:
    """The client knows the guests' MAC; the secondary forgot the client's: it must ARP."""
    proxy = bridge()
    assert fetch(lab, 8080)["complete"]
    subprocess.run(["ip", "-n", lab.ns["client"], "neigh", "replace", lab.guest_ip, "lladdr",
                    lab_tool.GUEST_MAC, "dev", "eth0", "nud", "permanent"], check=True)
    subprocess.run(["ip", "-n", lab.ns["secondary"], "neigh", "flush", "all"], check=True)
    client = fetch(lab, 8081)
    neigh = subprocess.run(["ip", "-n", lab.ns["secondary"], "neigh", "show", lab.client_ip],
                           capture_output=True, text=True, check=True).stdout
    report = proxy.stop()
    assert client["complete"], (client, proxy.log)
    assert lab_tool.CLIENT_MAC in neigh.lower(), neigh  # learnt by ARP through the bridge
    assert report["supervisor"]["secondary_neighbour_requests"] >= 1
    assert report["core"]["divergences_by_kind"] == {}, proxy.log
