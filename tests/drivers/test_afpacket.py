"""The packet port: ring parsing on a synthetic block, then against a real veth pair.

The real tests put one veth end in a namespace made for the test (deleted
afterwards) and the other in the root namespace, where the port reads it.
Frames are written from the namespace side with a packet socket (or the
kernel's UDP stack, for offloaded checksums).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from colo_proxy.core.checksum import checksum_ok
from colo_proxy.core.framing import Frame
from colo_proxy.drivers.afpacket import (
    RETRY_DELAY,
    TP_STATUS_CSUMNOTREADY,
    TP_STATUS_LOSING,
    TP_STATUS_USER,
    TP_STATUS_VLAN_TPID_VALID,
    TP_STATUS_VLAN_VALID,
    PacketPort,
    PortStats,
    RingSpec,
    busy_poll,
    parse_block,
    parse_slots,
)
from colo_proxy.drivers.links import LinkInfo
from colo_proxy.errors import ConfigError, TransportError
from tests.fakes import until

SRC = bytes.fromhex("525400aa0001")
DST = bytes.fromhex("525400aa0002")


def ether(payload: bytes, ethertype: int = 0x88B5, tags: bytes = b"") -> bytes:
    return DST + SRC + tags + struct.pack("!H", ethertype) + payload.ljust(46, b"\x00")


# ---- a synthetic block (no root needed) -----------------------------------------------------


def _block(frames: list[tuple[bytes, int, int, int, int]]) -> bytearray:
    """A TPACKET_V3 block: (data, tp_len, tp_status, vlan_tci, vlan_tpid) per frame."""
    ring = bytearray(8192)
    first = 48
    struct.pack_into("=III", ring, 8, TP_STATUS_USER, len(frames), first)
    at = first
    for i, (data, length, status, tci, tpid) in enumerate(frames):
        mac = 66  # TPACKET_ALIGN(sizeof(tpacket3_hdr)) + sockaddr_ll, as the kernel lays it out
        size = (mac + len(data) + 15) & ~15
        nxt = size if i < len(frames) - 1 else 0
        struct.pack_into("=IIIIIIHHIIH", ring, at, nxt, 0, 0, len(data), length, status, mac,
                         mac + 14, 0, tci, tpid)
        ring[at + mac : at + mac + len(data)] = data
        at += size
    return ring


def test_parse_block_copies_frames_and_undoes_the_kernels_changes() -> None:
    plain = ether(b"plain")
    tagged = ether(b"tagged")
    udp = bytes.fromhex(
        "525400aa0002525400aa00010800450000200001000040117ab40a0000010a000002"
        "0035d43d000c1234" "61626364"
    )  # fmt: skip
    frames = [
        (plain, len(plain), 0, 0, 0),
        (tagged, len(tagged), TP_STATUS_VLAN_VALID | TP_STATUS_VLAN_TPID_VALID, 0x600A, 0x88A8),
        (tagged, len(tagged), TP_STATUS_VLAN_VALID, 0x0005, 0),  # no TPID: 802.1Q assumed
        (plain[:40], len(plain), 0, 0, 0),  # cut short by the ring
        (b"\x00" * 1600, 1600, 0, 0, 0),  # over MTU 1500: a GSO super-frame
        (udp, len(udp), TP_STATUS_CSUMNOTREADY, 0, 0),
    ]
    ring = _block(frames)
    stats = PortStats()
    out: list[Frame] = []
    assert parse_block(memoryview(ring), 0, 1500 + 14 + 8, stats, out)
    datas = [d for d, _ in out]
    assert datas[0] == plain
    assert datas[1] == tagged[:12] + b"\x88\xa8\x60\x0a" + tagged[12:]
    assert datas[2] == tagged[:12] + b"\x81\x00\x00\x05" + tagged[12:]
    assert checksum_ok(datas[3]) is True and datas[3][:40] == udp[:40]
    assert len(out) == 4 and {o for _, o in out} == {0}
    assert (stats.vlan_reinserted, stats.truncated_dropped, stats.gso_dropped) == (2, 1, 1)
    assert stats.checksums_completed == 1 and stats.blocks == 1


def _slots(frames: list[tuple[bytes, int, int]], slots: int, slot: int = 2048) -> bytearray:
    """A TPACKET_V2 ring of ``slots`` slots: (data, tp_len, tp_status) from slot 0 on."""
    ring = bytearray(slots * slot)
    for i, (data, length, status) in enumerate(frames):
        at = i * slot
        struct.pack_into("=IIIHHIIHH", ring, at, status, length, len(data), 66, 80, 0, 0, 0, 0)
        ring[at + 66 : at + 66 + len(data)] = data
    return ring


def test_parse_slots_takes_owned_slots_in_order_and_hands_them_back() -> None:
    one, two = ether(b"one"), ether(b"two")
    ring = _slots([(one, len(one), TP_STATUS_USER), (b"\x00" * 100, 1600, TP_STATUS_USER),
                   (two, len(two), TP_STATUS_USER), (one, len(one), 0)], slots=4)
    stats, out = PortStats(), []
    head = parse_slots(memoryview(ring), 0, 4, 2048, 1500 + 14 + 8, stats, out)
    assert [d for d, _ in out] == [one, two] and head == 3  # slot 3 is still the kernel's
    assert stats.gso_dropped == 1  # a super-frame cut short by the slot: GSO, not truncation
    assert [struct.unpack_from("=I", ring, i * 2048)[0] for i in range(3)] == [0, 0, 0]
    struct.pack_into("=I", ring, 3 * 2048, TP_STATUS_USER)
    struct.pack_into("=I", ring, 0, TP_STATUS_USER)  # the ring wraps round
    assert parse_slots(memoryview(ring), 3, 4, 2048, 1522, stats, out) == 1
    assert [d for d, _ in out][2:] == [one, one]


def test_a_frame_after_ring_drops_is_taken_and_the_loss_noticed() -> None:
    one = ether(b"one")
    ring = _slots([(one, len(one), TP_STATUS_USER | TP_STATUS_LOSING)], slots=2)
    stats, out = PortStats(), []
    assert parse_slots(memoryview(ring), 0, 2, 2048, 1522, stats, out) == 1
    assert [d for d, _ in out] == [one] and stats.ring_losses_seen == 1


def test_busy_poll_reads_ready_ports_until_they_go_quiet() -> None:
    class Port:
        def __init__(self, frames: int) -> None:
            self.frames, self.reads = frames, 0

        def ready(self) -> bool:
            return self.frames > 0

        def read(self) -> None:
            self.frames -= 1
            self.reads += 1

    ports = [Port(3), Port(0), Port(5)]
    assert busy_poll(ports, 0.001, 1.0) == 8  # type: ignore[arg-type]
    assert [p.reads for p in ports] == [3, 0, 5]


def test_parse_block_leaves_a_kernel_block_alone() -> None:
    ring = _block([(ether(b"x"), 60, 0, 0, 0)])
    struct.pack_into("=I", ring, 8, 0)
    out: list[Frame] = []
    assert not parse_block(memoryview(ring), 0, 1522, PortStats(), out)
    assert out == []


@pytest.mark.parametrize(
    "spec",
    [RingSpec(block_size=1000), RingSpec(block_count=1), RingSpec(retire_ms=0),
     RingSpec(version=1)],
)
def test_bad_ring_geometry_is_a_config_error(spec: RingSpec) -> None:
    with pytest.raises(ConfigError):
        spec.validate()


def test_missing_interface_is_a_config_error() -> None:
    port = PacketPort("client-if", "nosuchif0", None)
    with pytest.raises(ConfigError, match="no interface named 'nosuchif0'"):
        port.open()


def test_no_permission_says_what_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: object) -> socket.socket:
        raise PermissionError(1, "Operation not permitted")

    lo = LinkInfo(name="lo", index=1, mtu=65536, up=True)
    monkeypatch.setattr("colo_proxy.drivers.afpacket.link_info", lambda name: lo)
    monkeypatch.setattr("colo_proxy.drivers.afpacket.socket.socket", refused)
    with pytest.raises(TransportError, match="needs root or CAP_NET_RAW"):
        PacketPort("client-if", "lo", None).open()


# ---- a real veth pair ---------------------------------------------------------------------


@dataclass
class Veth:
    ns: str
    host: str
    peer: str


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def veth() -> Iterator[Veth]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and packet sockets")
    tag = secrets.token_hex(3)
    v = Veth(f"b12a-{tag}", f"b12a{tag}h", f"b12a{tag}p")
    try:
        _sh("ip", "netns", "add", v.ns)
        _sh("ip", "netns", "exec", v.ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1")
        _sh("ip", "link", "add", v.host, "type", "veth", "peer", "name", v.peer)
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{v.host}.disable_ipv6=1"],
                       capture_output=True)
        _sh("ip", "link", "set", v.peer, "netns", v.ns)
        _sh("ip", "-n", v.ns, "addr", "add", "10.231.0.2/24", "dev", v.peer)
        _sh("ip", "-n", v.ns, "link", "set", v.peer, "up")
        _sh("ip", "link", "set", v.host, "up")
        yield v
    finally:
        subprocess.run(["ip", "link", "del", v.host], capture_output=True)
        subprocess.run(["ip", "netns", "del", v.ns], capture_output=True)


def peer_socket(v: Veth) -> socket.socket:
    """A packet socket on the namespace end (created inside the namespace)."""
    from pyroute2.netns import popns, pushns

    pushns(v.ns)
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    finally:
        popns()
    sock.bind((v.peer, 3))
    sock.settimeout(5)
    return sock


def reading_port(v: Veth, got: list[bytes]) -> PacketPort:
    """A started port on the host end that appends every frame it reads to ``got``."""
    port = PacketPort("test", v.host, lambda frames: got.extend(d for d, _ in frames))
    port.open()
    port.start()
    return port


async def peer_receives(peer: socket.socket, count: int) -> list[bytes]:
    """The next ``count`` frames the port sent (source SRC) as the namespace end sees them."""
    received: list[bytes] = []
    while len(received) < count:
        frame = await asyncio.get_running_loop().run_in_executor(None, peer.recv, 4096)
        if frame[6:12] == SRC:
            received.append(frame)
    return received


def ns_udp_socket(v: Veth) -> socket.socket:
    """A UDP socket of the namespace's own stack; 10.231.0.9 resolves without ARP."""
    from pyroute2.netns import popns, pushns

    _sh("ip", "-n", v.ns, "neigh", "add", "10.231.0.9", "lladdr", "52:54:00:aa:00:09",
        "dev", v.peer)
    pushns(v.ns)
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    finally:
        popns()


def test_ring_drops_are_counted_as_soon_as_a_frame_says_so(veth: Veth) -> None:
    """A 2-slot ring overflows: the owner sees ring_drops grow in the very callback after it."""
    seen: list[int] = []

    async def main() -> None:
        port = PacketPort("test", veth.host, lambda frames: seen.append(port.stats.ring_drops),
                          RingSpec(block_size=4096, block_count=2))
        port.open()
        peer = peer_socket(veth)
        for i in range(40):  # before the loop reads anything: the ring overflows
            peer.send(ether(bytes([i])))
        port.start()
        await until(lambda: bool(seen), "a wake-up")
        for i in range(3):  # room again: these say the ring lost frames before them
            wakeups = len(seen)
            peer.send(ether(bytes([i])))
            await until(lambda: len(seen) > wakeups, "a later frame")  # noqa: B023
        port.close()
        peer.close()
        assert seen[-1] > 0 and port.stats.ring_losses_seen >= 1

    asyncio.run(main())


@pytest.mark.parametrize("version", [2, 3])
def test_ring_delivers_every_frame_in_order_in_batches(veth: Veth, version: int) -> None:
    sent = [ether(bytes([i % 256]) * (i * 13 % 1400 + 1)) for i in range(300)]
    batches: list[list[Frame]] = []

    async def main() -> None:
        # 1 MiB: room for all 300 frames (V3 packs them, V2 has 512 slots of 2 KiB)
        ring = RingSpec(block_size=65536, block_count=16, version=version)
        port = PacketPort("test", veth.host, batches.append, ring)
        port.open()
        port.start()
        peer = peer_socket(veth)
        for frame in sent:
            peer.send(frame)
        await until(lambda: sum(map(len, batches)) >= len(sent), "all frames")
        await asyncio.sleep(0.05)
        counters = port.counters()
        port.close()
        peer.close()
        assert [d for b in batches for d, _ in b] == sent
        assert len(batches) < len(sent)  # batched, not one callback per frame
        assert counters["frames_in"] == len(sent) and counters["ring_drops"] == 0
        assert counters["blocks"] >= (2 if version == 3 else 1) and counters["mtu"] == 1500

    asyncio.run(main())


def test_vlan_tags_are_put_back(veth: Veth) -> None:
    dot1q = ether(b"one tag", tags=b"\x81\x00\xa0\x64")  # PCP 5, VID 100
    qinq = ether(b"two tags", tags=b"\x88\xa8\x00\x0a\x81\x00\x00\x14")
    got: list[bytes] = []

    async def main() -> None:
        port = reading_port(veth, got)
        peer = peer_socket(veth)
        peer.send(dot1q)
        peer.send(qinq)
        await until(lambda: len(got) >= 2, "tagged frames")
        reinserted = port.stats.vlan_reinserted
        port.close()
        peer.close()
        assert got == [dot1q, qinq]
        assert reinserted == 2  # the kernel had stripped both outer tags

    asyncio.run(main())


def test_sent_frames_reach_the_peer_and_are_not_read_back(veth: Veth) -> None:
    out = [ether(b"out %d" % i) for i in range(50)]
    got: list[bytes] = []

    async def main() -> None:
        port = reading_port(veth, got)
        peer = peer_socket(veth)
        port.send([(b"\x00" * 4 + f, 4) for f in out])  # offsets are honoured
        received = await peer_receives(peer, len(out))
        peer.send(ether(b"marker"))
        await until(lambda: ether(b"marker") in got, "marker")
        counters = port.counters()
        port.close()
        peer.close()
        assert received == out
        assert got == [ether(b"marker")]  # none of our own 50 came back
        assert counters["frames_out"] == len(out) and counters["send_errors"] == 0

    asyncio.run(main())


def test_offloaded_udp_checksums_are_completed(veth: Veth) -> None:
    """The namespace's stack leaves UDP checksums to the (veth) hardware: we finish them."""
    got: list[bytes] = []

    async def main() -> None:
        port = reading_port(veth, got)
        udp = ns_udp_socket(veth)
        udp.sendto(b"checksum me" * 20, ("10.231.0.9", 9))
        udp.close()
        await until(lambda: any(d[23:24] == b"\x11" for d in got), "the UDP frame")
        completed = port.stats.checksums_completed
        port.close()
        frame = next(d for d in got if d[23:24] == b"\x11")
        assert completed >= 1
        assert checksum_ok(frame) is True

    asyncio.run(main())


def test_gso_super_frames_are_dropped_counted_and_logged(
    veth: Veth, caplog: pytest.LogCaptureFixture
) -> None:
    """UDP GSO with the veth's segmentation offload on: one 4000-byte frame reaches the host."""
    got: list[bytes] = []

    async def main() -> None:
        port = reading_port(veth, got)
        udp = ns_udp_socket(veth)
        udp.setsockopt(socket.SOL_UDP, 103, 1000)  # UDP_SEGMENT: 1000-byte segments
        udp.sendto(b"\x01" * 4000, ("10.231.0.9", 9))
        udp.setsockopt(socket.SOL_UDP, 103, 0)
        udp.sendto(b"small", ("10.231.0.9", 9))
        udp.close()
        await until(lambda: any(d.endswith(b"small") for d in got), "the small datagram")
        stats = port.stats
        port.close()
        if len(got) == 5:
            pytest.skip("this kernel segmented the UDP GSO send itself: no super-frame to drop")
        assert stats.gso_dropped == 1
        assert [len(d) for d in got] == [47]

    asyncio.run(main())
    assert "ethtool -K" in caplog.text and "tso off gso off gro off" in caplog.text


def test_more_frames_than_the_transmit_ring_holds_all_leave_in_order(veth: Veth) -> None:
    out = [ether(i.to_bytes(4, "big") * 100) for i in range(6000)]  # the ring has 2048 slots

    async def main() -> None:
        port = PacketPort("test", veth.host, None)
        port.open()
        peer = peer_socket(veth)
        peer.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: room for all
        port.send([(f, 0) for f in out])
        await until(lambda: port.pending_frames == 0, "the queue drained")
        received = []
        peer.settimeout(2)
        with contextlib.suppress(TimeoutError):
            while len(received) < len(out):
                frame = peer.recv(4096)
                if frame[6:12] == SRC:
                    received.append(frame)
        counters = port.counters()
        port.close()
        peer.close()
        assert counters["send_deferred"] > 0  # some had to wait for free slots
        assert counters["frames_out"] == len(out) and counters["send_overflow_dropped"] == 0
        assert received == out

    asyncio.run(main())


def test_frames_too_big_for_the_interface_are_refused_and_counted(
    veth: Veth, caplog: pytest.LogCaptureFixture
) -> None:
    too_big = ether(b"\x02" * 1501)  # 1515 bytes: one over MTU 1500 + 14
    tagged = ether(b"\x03" * 1500, tags=b"\x81\x00\x00\x07")  # 1518: fits with its tag

    async def main() -> None:
        port = PacketPort("test", veth.host, None)
        port.open()
        peer = peer_socket(veth)
        port.send([(too_big, 0), (tagged, 0), (b"short", 0)])
        received = await peer_receives(peer, 1)
        counters = port.counters()
        port.close()
        peer.close()
        assert received == [tagged[:12] + tagged[16:]]  # the peer's kernel strips the tag
        assert counters["send_oversize"] == 2 and counters["frames_out"] == 1

    asyncio.run(main())
    assert "does not fit" in caplog.text


def test_a_vanished_interface_is_reported_without_spinning(
    veth: Veth, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    async def main() -> None:
        port = PacketPort("test", veth.host, None)
        port.open()
        readable = port._readable
        port._on_frames = lambda frames: None

        def counted() -> None:
            calls.append(1)
            readable()

        assert port._sock is not None
        asyncio.get_running_loop().add_reader(port._sock.fileno(), counted)
        _sh("ip", "link", "del", veth.host)
        await until(lambda: port.stats.socket_errors == 1, "the error read")
        port.send([(ether(b"lost"), 0)] * 3)
        await asyncio.sleep(0.5)
        stats = port.counters()
        backed_off = port._retry_delay > RETRY_DELAY
        asyncio.get_running_loop().remove_reader(port._sock.fileno())
        port.close()
        assert len(calls) <= 3  # woken for the error, not spinning on it
        assert stats["pending_frames"] == 3 and stats["send_errors"] >= 1  # kept, retried
        assert backed_off

    asyncio.run(main())
    assert "Network is down" in caplog.text
