"""HoleSacker: the SACKs, probes and timestamps that keep a guest's lost frames from stalling.

Frames are built and read back with scapy, so every field and checksum is
checked by an independent implementation.
"""

from __future__ import annotations

from typing import Any

import pytest

from colo_proxy.core.checksum import tcp_pseudo_sum
from colo_proxy.runtime.bridge_sack import ACTIVE_FOR, HoleSacker

scapy_all = pytest.importorskip("scapy.all")
Ether, IP, TCP, Raw = scapy_all.Ether, scapy_all.IP, scapy_all.TCP, scapy_all.Raw

CLIENT, GUEST = "10.0.0.9", "10.0.0.2"
CMAC, GMAC = "52:54:00:00:00:09", "52:54:00:00:00:02"
ISN = 4_294_967_000  # the guest's ISN: its sequence numbers wrap inside the test
MSS = 1000


def guest_seg(offset: int, size: int = MSS, tsval: int = 500, flags: str = "PA") -> bytes:
    """The guest's segment carrying stream bytes [offset, offset + size)."""
    pkt = (Ether(src=GMAC, dst=CMAC) / IP(src=GUEST, dst=CLIENT)
           / TCP(sport=8080, dport=40000, seq=(ISN + 1 + offset) % 2**32, ack=77, flags=flags,
                 options=[("NOP", None), ("NOP", None), ("Timestamp", (tsval, 900))])
           / Raw(b"x" * size))
    return bytes(pkt)


def client_ack(offset: int, payload: bytes = b"", tsval: int = 901, tsecr: int = 500) -> bytes:
    """The client's ACK of guest bytes up to ``offset`` (as translated for this guest)."""
    pkt = (Ether(src=CMAC, dst=GMAC) / IP(src=CLIENT, dst=GUEST)
           / TCP(sport=40000, dport=8080, seq=70, ack=(ISN + 1 + offset) % 2**32, flags="A",
                 window=501, options=[("NOP", None), ("NOP", None), ("Timestamp", (tsval, tsecr))])
           / Raw(payload))
    return bytes(pkt)


def checked(frame: bytes) -> Any:
    """The frame parsed by scapy, after checking both checksums against scapy's own."""
    pkt = Ether(frame)
    fresh = Ether(frame)
    del fresh[IP].chksum
    del fresh[TCP].chksum
    fresh = Ether(bytes(fresh))
    assert pkt[IP].chksum == fresh[IP].chksum
    assert pkt[TCP].chksum == fresh[TCP].chksum
    return pkt


def sack_blocks(pkt: Any) -> list[tuple[int, int]]:
    for name, value in pkt[TCP].options:
        if name == "SAck":
            return [((value[i] - ISN - 1) % 2**32, (value[i + 1] - ISN - 1) % 2**32)
                    for i in range(0, len(value), 2)]
    return []


def feed(
    sacker: HoleSacker, *frames: bytes, now: float = 1.0
) -> tuple[list[bytes], list[bytes]]:
    nudges, probes = sacker.guest_frames([(f, 0) for f in frames], now)
    return [f for f, _ in nudges], [f for f, _ in probes]


def active(echo_recent: bool = False) -> HoleSacker:
    """A sacker told that a ring dropped frames at time 0."""
    sacker = HoleSacker(echo_recent=echo_recent)
    sacker.activate(0.0)
    return sacker


def test_idle_until_a_ring_drops_then_idle_again_once_whole() -> None:
    """No per-frame work without drops; on a drop, each flow is followed from the client's ACK."""
    sacker = HoleSacker()
    sacker.client_frames([(client_ack(1000), 0)])  # kept by reference while idle
    assert feed(sacker, guest_seg(0), guest_seg(2000)) == ([], [])
    released = [(guest_seg(2000, tsval=1), 0)]
    assert sacker.released(released, 1.0) is released
    assert sacker.stats()["flows"] == 0

    sacker.activate(2.0)
    nudges, _ = feed(sacker, guest_seg(3000), now=2.0)  # [1000, 3000) missing since the ACK
    assert [sack_blocks(checked(f)) for f in nudges] == [[(3000, 4000)]]
    feed(sacker, guest_seg(1000), guest_seg(2000), now=2.0 + ACTIVE_FOR / 2)
    assert sacker.active
    assert feed(sacker, guest_seg(4000), now=3.0 + ACTIVE_FOR) == ([], [])
    assert not sacker.active and sacker.stats()["flows"] == 0
    assert sacker.stats()["activations"] == 1


def test_in_order_data_sends_nothing() -> None:
    sacker = active()
    sacker.client_frames([(client_ack(0), 0)])
    assert feed(sacker, *(guest_seg(i * MSS) for i in range(5))) == ([], [])
    assert sacker.stats()["sack_holes_seen"] == 0


def test_a_hole_is_sacked_to_the_guest_from_the_clients_latest_frame() -> None:
    sacker = active()
    feed(sacker, guest_seg(0))
    sacker.client_frames([(client_ack(1000, payload=b"GET"), 0)])
    nudges, probes = feed(sacker, guest_seg(2000), guest_seg(3000), guest_seg(5000))
    assert probes == [] and len(nudges) == 1
    pkt = checked(nudges[0])
    assert (pkt[IP].src, pkt[IP].dst, pkt[Ether].dst) == (CLIENT, GUEST, GMAC)
    assert (pkt[TCP].sport, pkt[TCP].dport, pkt[TCP].flags) == (40000, 8080, "A")
    assert pkt[TCP].ack == (ISN + 1 + 1000) % 2**32  # the client's ACK, unchanged
    assert pkt[TCP].seq == 73  # after the template's 3 bytes of data: the next one
    assert pkt[TCP].window == 501 and len(pkt[TCP].payload) == 0
    assert dict(pkt[TCP].options)["Timestamp"] == (901, 500)
    assert sack_blocks(pkt) == [(2000, 4000), (5000, 6000)]
    assert sacker.stats()["sack_holes_seen"] == 1

    # the guest resends the first hole: the second one is still SACKed
    nudges, _ = feed(sacker, guest_seg(1000))
    assert [sack_blocks(checked(f)) for f in nudges] == [[(5000, 6000)]]
    nudges, _ = feed(sacker, guest_seg(4000))
    assert nudges == []
    assert feed(sacker, guest_seg(6000)) == ([], [])


def test_the_clients_ack_closes_a_hole_the_proxy_never_saw_filled() -> None:
    sacker = active()
    feed(sacker, guest_seg(0))
    sacker.client_frames([(client_ack(1000), 0)])
    assert len(feed(sacker, guest_seg(2000))[0]) == 1
    sacker.client_frames([(client_ack(3000), 0)])  # the client has it all: no SACK owed
    assert feed(sacker, guest_seg(3000)) == ([], [])


def test_at_most_three_blocks_the_lowest_first() -> None:
    sacker = active()
    feed(sacker, guest_seg(0))
    sacker.client_frames([(client_ack(1000), 0)])
    nudges, _ = feed(sacker, *(guest_seg(i * 2000) for i in range(1, 6)))
    assert sack_blocks(checked(nudges[-1])) == [(2000, 3000), (4000, 5000), (10000, 11000)]


def test_without_a_client_frame_nothing_is_sent() -> None:
    sacker = active()
    feed(sacker, guest_seg(0))
    assert feed(sacker, guest_seg(2000)) == ([], [])
    assert sacker.stats()["sack_no_template"] == 1


def test_a_resent_segment_the_proxy_had_probes_the_client() -> None:
    """The guest resends what we had: the client's ACK was lost; the client must repeat it."""
    sacker = active()
    feed(sacker, guest_seg(0), guest_seg(1000))
    released = guest_seg(1000)
    sacker.released([(released, 0)], 1.0)
    nudges, probes = feed(sacker, guest_seg(0))
    assert nudges == [] and len(probes) == 1
    probe, whole = checked(probes[0]), checked(released)
    assert bytes(probe[Raw]) == b"x"  # cut to its first byte: fits any MTU
    assert (probe[TCP].seq, probe[TCP].ack, probe[TCP].options) == (
        whole[TCP].seq, whole[TCP].ack, whole[TCP].options)
    assert sacker.stats()["client_probes_sent"] == 1


def test_a_released_super_frame_probes_with_one_byte() -> None:
    """Offloads on: a released 20 KB super-frame, sent again whole, would be refused."""
    sacker = active()
    feed(sacker, guest_seg(0, size=20_000))
    sacker.released([(guest_seg(0, size=20_000), 0)], 1.0)
    _, probes = feed(sacker, guest_seg(0, size=20_000))
    assert len(probes[0]) == 14 + 20 + 32 + 1 and bytes(checked(probes[0])[Raw]) == b"x"


def test_released_timestamps_never_go_back() -> None:
    """A frame released after later ones must not carry an older TSval (the client's PAWS)."""
    sacker = active()
    first = [(guest_seg(1000, tsval=700), 0)]
    assert sacker.released(first, 1.0) is first
    late = guest_seg(0, tsval=690)
    out = sacker.released([(late, 0)], 1.0)
    pkt = checked(out[0][0])
    assert dict(pkt[TCP].options)["Timestamp"] == (700, 900)
    assert bytes(pkt[Raw]) == b"x" * MSS
    assert sacker.stats()["tsval_raised"] == 1
    newer = guest_seg(2000, tsval=701)
    assert sacker.released([(newer, 0)], 1.0)[0][0] == newer


def test_a_checkpoint_forgets_everything() -> None:
    sacker = active()
    feed(sacker, guest_seg(0))
    sacker.client_frames([(client_ack(1000), 0)])
    sacker.forget()
    assert feed(sacker, guest_seg(2000)) == ([], [])  # picked up anew, no hole known


def test_each_client_ack_on_a_holed_flow_brings_the_sack_again() -> None:
    """The guest's resend was lost too and it sends nothing: the client's ACKs repeat the SACK."""
    sacker = active()
    feed(sacker, guest_seg(0))
    sacker.client_frames([(client_ack(1000), 0)])
    feed(sacker, guest_seg(2000))
    nudges = sacker.client_frames([(client_ack(1000, tsval=905), 0)])
    assert len(nudges) == 1
    pkt = checked(nudges[0][0])
    assert sack_blocks(pkt) == [(2000, 3000)] and dict(pkt[TCP].options)["Timestamp"] == (905, 500)
    feed(sacker, guest_seg(1000))  # the hole is filled: ACKs pass alone again
    assert sacker.client_frames([(client_ack(3000), 0)]) == []


def echoed(frames: list[tuple[bytes, int]]) -> int:
    """The TSecr of the one (checksum-checked) client frame in ``frames``."""
    (frame, _), = frames
    return int(dict(checked(frame)[TCP].options)["Timestamp"][1])


def test_the_clients_echo_is_raised_to_the_guests_resend() -> None:
    """Released only after the guest resent a hole, the client's echo predates the resend:
    raised to it, or Linux takes the resend for spurious and undoes its loss recovery."""
    sacker = active(echo_recent=True)
    feed(sacker, guest_seg(0, tsval=500))
    frames = [(client_ack(1000, tsecr=500), 0)]
    original = frames[0]
    assert sacker.client_frames(frames) == [] and frames[0] is original  # TS.recent is 500
    feed(sacker, guest_seg(2000, tsval=510))  # past the hole: TS.recent does not move
    frames = [(client_ack(1000, tsecr=500), 0)]
    original = frames[0]
    nudges = sacker.client_frames(frames)
    assert frames[0] is original
    feed(sacker, guest_seg(1000, tsval=700))  # the resend fills the hole
    frames = [(client_ack(3000, tsecr=500), 0)]
    assert sacker.client_frames(frames) == []
    assert echoed(frames) == 700
    assert checked(frames[0][0])[TCP].ack == (ISN + 1 + 3000) % 2**32
    assert sacker.stats()["tsecr_raised"] == 1
    newer = [(client_ack(3000, tsecr=800), 0)]
    sacker.client_frames(newer)
    assert echoed(newer) == 800  # a newer echo is kept
    for at, tsval in ((3000, 2**31 + 600), (4000, 2**32 - 5), (5000, 10)):  # the clock wraps
        feed(sacker, guest_seg(at, tsval=tsval))
    wrapped = [(client_ack(6000, tsecr=2**32 - 5), 0)]
    sacker.client_frames(wrapped)
    assert echoed(wrapped) == 10
    assert len(nudges) == 1  # the hole was SACKed meanwhile, from the raised frame too


def test_the_echo_is_left_alone_without_echo_recent() -> None:
    """The primary gets the client's frames from the kernel: its sacker changes none."""
    sacker = active()
    feed(sacker, guest_seg(0, tsval=500))
    feed(sacker, guest_seg(1000, tsval=700))
    frames = [(client_ack(2000, tsecr=500), 0)]
    sacker.client_frames(frames)
    assert echoed(frames) == 500 and sacker.stats()["tsecr_raised"] == 0


def test_a_checksum_left_to_offload_is_not_updated() -> None:
    """A field holding only the pseudo-header sum: the device sums the new TSecr itself."""
    sacker = active(echo_recent=True)
    feed(sacker, guest_seg(0, tsval=700))
    full = bytearray(client_ack(1000, tsecr=500))
    pseudo = tcp_pseudo_sum(bytes(full[26:30]), bytes(full[30:34]), len(full) - 34)
    full[50:52] = pseudo.to_bytes(2, "big")
    frames = [(bytes(full), 0)]
    sacker.client_frames(frames)
    out = frames[0][0]
    assert out[50:52] == full[50:52] and int.from_bytes(out[62:66], "big") == 700
