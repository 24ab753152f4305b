"""The bridge's frame paths with virtio_net_hdr frames: the parts that read frames bare.

Fake ports (tests/drivers/test_bridge.py): what the rewriter and the sackers
see, and what goes out behind which header.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from colo_proxy.core.checksum import checksum_ok, complete_checksum
from colo_proxy.drivers import vnet
from tests.drivers.test_bridge import CLIENT, GUEST, make_bridge
from tests.drivers.test_vnet import open_checksum

scapy_all = pytest.importorskip("scapy.all")

GSO = vnet.VnetHeader(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 66, 1448, 34, 16).pack()


def segment(tsval: int, payload: bytes, seq: int = 1001) -> bytes:
    frame = (scapy_all.Ether(src="52:54:00:00:00:02", dst="52:54:00:00:00:01")
             / scapy_all.IP(src=GUEST, dst=CLIENT)
             / scapy_all.TCP(sport=80, dport=40000, flags="A", seq=seq, ack=101,
                             options=[("NOP", None), ("NOP", None), ("Timestamp", (tsval, 7))])
             / payload)
    return bytes(frame)


def test_reopened_puts_the_pseudo_header_sum_back() -> None:
    whole = segment(5, b"x" * 3000)
    assert checksum_ok(whole) is True
    assert vnet.reopened(whole) == open_checksum(whole)
    assert complete_checksum(vnet.reopened(whole)) == whole


def test_released_super_frames_get_monotonic_tsvals_behind_their_own_header(
    sockdir: Path,
) -> None:
    """After a ring drop the sacker raises an older TSval; the frame keeps its GSO header."""
    async def main() -> None:
        bridge, ports = make_bridge(sockdir)
        bridge._vnet = True  # (make_bridge's ports are fakes: the mode as a root run has it)
        bridge.sack_secondary.activate(bridge._clock())
        newer = open_checksum(segment(1000, b"a" * 5000, seq=1001))
        older = open_checksum(segment(900, b"b" * 5000, seq=6001))  # released after a hole
        plain = vnet.ZERO + segment(950, b"c" * 100, seq=11001)  # a whole checksum
        bridge._send_released([(GSO + newer, 10), (GSO + older, 10), (plain, 10)])
        first, second, third = ports["client"].sent  # (FakePort strips the offset)
        assert first == newer  # unchanged: the very bytes that came in
        assert complete_checksum(second) == segment(1000, b"b" * 5000, seq=6001)
        assert second == open_checksum(second)  # the field is open again, as its header says
        assert third == segment(1000, b"c" * 100, seq=11001)  # raised, checksum updated
        assert bridge._port_stats()["sack_secondary"]["tsval_raised"] == 2  # type: ignore[index]

    asyncio.run(main())


def test_a_client_frame_the_sacker_replaces_keeps_its_header(sockdir: Path) -> None:
    """TS.recent echo (bridge_sack) on a vnet client frame with an open checksum."""
    from tests.drivers.test_bridge_sack import client_ack, guest_seg

    async def main() -> None:
        bridge, _ports = make_bridge(sockdir)
        bridge._vnet = True
        sacker = bridge.sack_secondary
        sacker.activate(bridge._clock())
        for at, tsval in ((0, 500), (2000, 510), (1000, 700)):  # a hole, then its resend
            sacker.guest_frames([(guest_seg(at, tsval=tsval), 0)], bridge._clock())
        csum = vnet.VnetHeader(vnet.F_NEEDS_CSUM, 0, 0, 0, 34, 16).pack()
        frames = [(csum + open_checksum(client_ack(3000, tsecr=500)), 10)]
        bridge._sack_client(sacker, frames, 1)
        data, offset = frames[0]
        assert offset == 10 and data[:10] == csum
        assert data[10:] == open_checksum(data[10:])  # still open, as its header says
        assert complete_checksum(data[10:]) == client_ack(3000, tsecr=700)
        assert sacker.stats()["tsecr_raised"] == 1

    asyncio.run(main())


def test_the_offloads_mode_is_a_flag_and_checked() -> None:
    from colo_proxy.errors import ConfigError
    from colo_proxy.runtime.bridge import BridgeSettings
    from tests.drivers.test_bridge import settings_of

    ifs = ["--client-if", "eth1", "--primary-if", "tap0", "--secondary-if", "tap1"]
    assert settings_of(ifs)[0].offloads == "accept"
    settings = settings_of([*ifs, "--offloads", "off", "--fix-offloads"])[0]
    assert settings.offloads == "off" and settings.fix_offloads
    with pytest.raises(ConfigError, match="offloads 'on'"):
        BridgeSettings("a", "b", "c", offloads="on").validate()
