"""Bridge wiring without interfaces: fake ports, a scripted QMP primary; and its flags.

The ports are replaced by recorders, so the test drives exactly what each
interface would have read and sees what the bridge sends where.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import pytest

from colo_proxy.config_args import config_from_args
from colo_proxy.core.config import Config
from colo_proxy.core.framing import Frame
from colo_proxy.drivers.afpacket import PortStats, RingSpec
from colo_proxy.drivers.endpoints import parse_endpoint
from colo_proxy.drivers.qmp import FollowPolicy
from colo_proxy.errors import ConfigError
from colo_proxy.runtime import bridge_cli
from colo_proxy.runtime.bridge import Bridge, BridgeSettings, neighbour_request
from colo_proxy.runtime.host import ShutdownMode
from tests.fakes import FakeQmp, until

scapy_all = pytest.importorskip("scapy.all")

CLIENT, GUEST = "10.0.0.9", "10.0.0.2"


class FakePort:
    """Stands in for a PacketPort: records what is sent through it."""

    def __init__(self, name: str, ifname: str) -> None:
        self.name, self.ifname, self.mtu = name, ifname, 1500
        self.sent: list[bytes] = []
        self.stats = PortStats()
        self.pending_frames = 0
        self.reading = False

    def open(self) -> None:
        pass

    def start(self) -> None:
        self.reading = True

    def stop_reading(self) -> None:
        self.reading = False

    def close(self) -> None:
        pass

    def send(self, frames: list[Frame]) -> None:
        self.sent += [d[o:] for d, o in frames]

    def counters(self) -> dict[str, int]:
        return {"frames_out": len(self.sent)}


def tcp(src: str, dst: str, sport: int, dport: int, flags: str, seq: int, ack: int = 0,
        data: bytes = b"") -> bytes:
    frame = (scapy_all.Ether(src="52:54:00:00:00:01", dst="52:54:00:00:00:02")
             / scapy_all.IP(src=src, dst=dst)
             / scapy_all.TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack))
    return bytes(frame / data if data else frame)


def ack_of(frame: bytes) -> int:
    return int(scapy_all.Ether(frame)[scapy_all.TCP].ack)


def make_bridge(sockdir: Path) -> tuple[Bridge, dict[str, FakePort]]:
    settings = BridgeSettings(
        client_if="c0", primary_if="p0", secondary_if="s0",
        qmp=parse_endpoint(f"unix:{sockdir}/qmp"), qmp_follow=FollowPolicy.ALWAYS,
        kernel_forward=False,
    )
    bridge = Bridge(Config(compare_timeout=60.0, min_checkpoint_interval=0.0), settings)
    ports = {"client": FakePort("client-if", "c0"), "primary": FakePort("primary-if", "p0"),
             "secondary": FakePort("secondary-if", "s0")}
    bridge.client, bridge.primary, bridge.secondary = (  # type: ignore[assignment]
        ports["client"], ports["primary"], ports["secondary"]
    )
    bridge.ports = tuple(ports.values())  # type: ignore[assignment]
    bridge.links = NoLinks()  # type: ignore[assignment]
    return bridge, ports


class NoLinks:
    """Stands in for the LinkFollower: fake ports have no interfaces to check or watch."""

    counters: dict[str, int] = {}

    def check_offloads(self) -> None:
        pass

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_frames_take_their_paths_and_a_checkpoint_resets_the_rewriter(sockdir: Path) -> None:
    async def main() -> None:
        qemu = FakeQmp()
        server = await asyncio.start_unix_server(qemu.serve, f"{sockdir}/qmp")
        bridge, ports = make_bridge(sockdir)
        await bridge.start()
        assert bridge.qmp is not None
        qmp = bridge.qmp
        await until(lambda: qmp.connected, "QMP session")
        assert all(p.reading for p in ports.values())

        syn = tcp(CLIENT, GUEST, 40000, 80, "S", 100)
        bridge._from_client([(syn, 0)])
        assert ports["primary"].sent == [syn] and ports["secondary"].sent == [syn]

        syn_ack_p = tcp(GUEST, CLIENT, 80, 40000, "SA", 1000, 101)
        syn_ack_s = tcp(GUEST, CLIENT, 80, 40000, "SA", 5000, 101)
        bridge._from_primary([(syn_ack_p, 0)])
        assert ports["client"].sent == []  # waits for the secondary's SYN-ACK
        bridge._from_secondary([(syn_ack_s, 0)])
        assert ports["client"].sent == [syn_ack_p]

        request = tcp(CLIENT, GUEST, 40000, 80, "PA", 101, 1001, b"GET\n")
        bridge._from_client([(request, 0)])
        assert ports["primary"].sent[-1] == request  # unchanged
        assert ack_of(ports["secondary"].sent[-1]) == 5001  # in the secondary's space

        bridge._from_primary([(tcp(GUEST, CLIENT, 80, 40000, "PA", 1001, 105, b"hello"), 0)])
        bridge._from_secondary([(tcp(GUEST, CLIENT, 80, 40000, "PA", 5001, 105, b"hellx"), 0)])
        assert len(ports["client"].sent) == 1  # the diverging bytes are held
        await until(lambda: any(c == "migrate-set-parameters" for c, _ in qemu.commands),
                    "checkpoint requested over QMP")
        qemu.event("STOP")
        qemu.event("RESUME")
        await until(lambda: len(ports["client"].sent) == 2, "held output released")
        assert bridge.rewriter.stats()["checkpoint_dropped"] == 1

        # after the checkpoint the secondary runs with the primary's numbers: no translation
        bridge._from_client([(tcp(CLIENT, GUEST, 40000, 80, "A", 105, 1006), 0)])
        assert ack_of(ports["secondary"].sent[-1]) == 1006
        report = await bridge.shutdown()
        assert not any(p.reading for p in ports.values())
        assert report["client-if"] == {"frames_out": 2}  # secondary output never sent
        assert report["supervisor"]["requests_to_qmp"] >= 1  # type: ignore[index]
        assert report["core"]["divergences_by_kind"] == {"payload": 1}  # type: ignore[index]
        assert "rewriter" in report
        server.close()

    asyncio.run(main())


def test_a_rewriter_failure_passes_the_frame_unchanged(sockdir: Path) -> None:
    async def main() -> None:
        bridge, ports = make_bridge(sockdir)

        real = bridge.rewriter

        class Broken:
            """The rewriter failing (a stand-in: a compiled one's methods cannot be patched)."""

            def to_secondary(self, frame: bytes, now: float) -> bytes:
                raise RuntimeError("rewriter bug")

            def __getattr__(self, name: str) -> object:
                return getattr(real, name)

        bridge.rewriter = Broken()  # type: ignore[assignment]
        frame = tcp(CLIENT, GUEST, 40000, 80, "S", 1)
        bridge._from_client([(frame, 0), (frame, 0)])
        assert ports["secondary"].sent == [frame, frame]
        assert bridge.counters["rewriter_errors"] == 2

    asyncio.run(main())


def test_after_a_ring_drop_a_guests_hole_is_sacked_on_its_own_port(sockdir: Path) -> None:
    """Secondary frames lost before us: its port gets the client's ACK with a SACK past them."""
    async def main() -> None:
        bridge, ports = make_bridge(sockdir)
        bridge._from_client([(tcp(CLIENT, GUEST, 40000, 80, "S", 100), 0)])
        bridge._from_primary([(tcp(GUEST, CLIENT, 80, 40000, "SA", 1000, 101), 0)])
        bridge._from_secondary([(tcp(GUEST, CLIENT, 80, 40000, "SA", 5000, 101), 0)])
        bridge._from_client([(tcp(CLIENT, GUEST, 40000, 80, "A", 101, 1001), 0)])
        seg = [tcp(GUEST, CLIENT, 80, 40000, "PA", 5001 + i * 100, 101, b"x" * 100)
               for i in range(4)]
        bridge._from_secondary([(seg[0], 0)])
        sent = len(ports["secondary"].sent)
        bridge._from_secondary([(seg[2], 0)])  # no drop counted: nothing follows the flow
        assert len(ports["secondary"].sent) == sent

        ports["secondary"].stats.ring_drops += 1  # the ring dropped seg[1]
        bridge._from_secondary([(seg[3], 0)])
        nudge = scapy_all.Ether(ports["secondary"].sent[-1])
        assert len(ports["secondary"].sent) == sent + 1
        assert (nudge[scapy_all.IP].src, nudge[scapy_all.TCP].ack) == (CLIENT, 5001)
        assert ("SAck", (5301, 5401)) in nudge[scapy_all.TCP].options  # tracked since the drop
        assert ports["primary"].sent[-1] != ports["secondary"].sent[-1]
        assert bridge._port_stats()["sack_secondary"]["sack_nudges_sent"] == 1  # type: ignore[index]

    asyncio.run(main())


# ---- flags and TOML ---------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bridge_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bridge", *argv])


def settings_of(argv: list[str]) -> tuple[BridgeSettings, Config]:
    args = parse(argv)
    values = bridge_cli.section_values(args, "bridge", bridge_cli.BRIDGE_KEYS)
    config = config_from_args(args, extra_keys=frozenset(bridge_cli.BRIDGE_KEYS) | {"bridge"})
    return bridge_cli.settings_from_values(values), config


def test_flags() -> None:
    settings, config = settings_of([
        "--client-if", "eth1", "--primary-if", "tap0", "--secondary-if", "tap1",
        "--qmp", "unix:/tmp/q.sock", "--on-shutdown", "flush", "--stats-interval", "5",
        "--ring-blocks", "8", "--ring-retire-ms", "1", "--compare-timeout", "2",
    ])  # fmt: skip
    assert (settings.client_if, settings.primary_if, settings.secondary_if) == (
        "eth1", "tap0", "tap1"
    )
    assert settings.qmp is not None and settings.qmp.address == "/tmp/q.sock"
    assert settings.on_shutdown is ShutdownMode.FLUSH and settings.stats_interval == 5.0
    assert settings.ring == RingSpec(block_count=8, retire_ms=1)
    assert config.compare_timeout == 2.0


def test_toml_bridge_table(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text(
        '[bridge]\nclient_if = "eth1"\nprimary_if = "tap0"\nsecondary_if = "tap1"\n'
        'on_shutdown = "flush"\n[core]\ncompare_timeout = 4\n'
    )
    settings, config = settings_of(["--config", str(path), "--secondary-if", "tap9"])
    assert settings.secondary_if == "tap9" and settings.on_shutdown is ShutdownMode.FLUSH
    assert config.compare_timeout == 4.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--client-if", "a"], "--primary-if, --secondary-if required"),
        (["--client-if", "a", "--primary-if", "a", "--secondary-if", "b"], "three different"),
        (["--client-if", "a", "--primary-if", "b", "--secondary-if", "c",
          "--ring-block-size", "1000"], "multiple of"),
        (["--client-if", "a", "--primary-if", "b", "--secondary-if", "c",
          "--stats-interval", "-1"], "stats_interval"),
    ],
)
def test_bad_values_are_named(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_of(argv)


def test_unknown_toml_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text('[bridge]\nclient_if = "a"\noutdev = "unix:/x"\n')
    with pytest.raises(ConfigError, match=r"unknown \[bridge\] setting\(s\): outdev"):
        settings_of(["--config", str(path)])


def test_bridge_subcommand_is_registered(capsys: Any) -> None:
    from colo_proxy.cli import main

    assert main(["bridge", "--client-if", "a"]) == 2
    assert "required" in capsys.readouterr().err


def test_neighbour_requests_are_recognised() -> None:
    s = scapy_all
    eth = s.Ether(src="52:54:00:00:00:02", dst="ff:ff:ff:ff:ff:ff")
    ns_ = s.IPv6(src="fe80::2", dst="ff02::1:ff00:9") / s.ICMPv6ND_NS(tgt="fe80::9")
    na = s.IPv6(src="fe80::9", dst="fe80::2") / s.ICMPv6ND_NA(tgt="fe80::9")
    yes = [eth / s.ARP(op=1, pdst=CLIENT), eth / s.Dot1Q(vlan=5) / s.ARP(op=1, pdst=CLIENT),
           eth / ns_, eth / s.IPv6(dst="ff02::2") / s.ICMPv6ND_RS()]
    no = [eth / s.ARP(op=2, psrc=CLIENT), eth / na, eth / s.IP(dst=CLIENT) / s.UDP(),
          eth / s.IPv6(dst="ff02::1") / s.UDP()]
    assert [neighbour_request(bytes(f)) for f in yes] == [True] * 4
    assert [neighbour_request(bytes(f)) for f in no] == [False] * 4
    assert not neighbour_request(bytes(eth)[:13])


def test_the_kernels_secondary_leg_carries_what_needs_no_translation() -> None:
    """The same test as the tc filters (links.py): ARP and IPv4 other than TCP, one tag deep."""
    from colo_proxy.drivers.links import needs_no_translation

    s = scapy_all
    eth = s.Ether(src="52:54:00:00:00:02", dst="52:54:00:00:00:01")
    tcp, udp = s.IP(dst=CLIENT) / s.TCP(), s.IP(dst=CLIENT) / s.UDP()
    yes = [eth / s.ARP(op=1, pdst=CLIENT), eth / s.ARP(op=2), eth / udp,
           eth / s.IP(dst=CLIENT) / s.ICMP(), eth / s.Dot1Q(vlan=5) / udp,
           eth / s.Dot1AD(vlan=5) / s.ARP()]
    no = [eth / tcp, eth / s.Dot1Q(vlan=5) / tcp, eth / s.Dot1AD(vlan=5) / tcp,
          eth / s.Dot1AD(vlan=5) / s.Dot1Q(vlan=6) / udp,  # QinQ: tc sees the inner tag
          eth / s.IPv6(dst="fe80::1") / s.UDP(), eth / s.IPv6(dst="fe80::1") / s.TCP()]
    assert [needs_no_translation(bytes(f)) for f in yes] == [True] * len(yes)
    assert [needs_no_translation(bytes(f)) for f in no] == [False] * len(no)
    assert not needs_no_translation(bytes(eth / s.IP(dst=CLIENT))[:20])
