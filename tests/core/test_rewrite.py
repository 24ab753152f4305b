"""The secondary rewriter: client ACK/SACK/TSecr moved into the secondary's spaces.

Frames are built with scapy and every result is checked with scapy too: the
checksum scapy recomputes must equal the one in the frame, and each field must
move by exactly the offset mod 2**32.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, in4_chksum
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from colo_proxy.core.rewrite import SecondaryRewriter

M32 = 2**32
G4, C4 = "10.0.0.1", "10.0.0.2"
G6, C6 = "fd00::1", "fd00::2"
GPORT, CPORT = 80, 40000
CLIENT_ISN = 5000
WRAP_ISNS = [0, 1, M32 - 1, M32 - 11]


def build(
    flags: str, seq: int, ack: int = 0, *, to_guest: bool = True, v6: bool = False,
    vlan: tuple[int, ...] = (), opts: list[tuple[str, Any]] | None = None,
    payload: bytes = b"", gport: int = GPORT, cport: int = CPORT,
) -> bytes:
    """One TCP frame between the guest and the client (either way), with correct checksums."""
    g, c = (G6, C6) if v6 else (G4, C4)
    src, dst, sport, dport = (c, g, cport, gport) if to_guest else (g, c, gport, cport)
    layer: Any = Ether(src="52:54:00:00:00:02", dst="52:54:00:00:00:01")
    for tag in vlan:
        layer = layer / Dot1Q(vlan=tag)
    ip = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)
    tcp = TCP(sport=sport, dport=dport, flags=flags, seq=seq % M32, ack=ack % M32,
              options=opts or [])
    pkt = layer / ip / tcp
    if payload:
        pkt = pkt / Raw(payload)
    return bytes(pkt)


def ts(val: int, ecr: int = 0) -> tuple[str, Any]:
    return ("Timestamp", (val % M32, ecr % M32))


def learn(
    r: SecondaryRewriter, pri_isn: int, sec_isn: int, *, active: bool = False,
    pri_ts: int | None = None, sec_ts: int | None = None, now: float = 0.0, **kw: Any,
) -> None:
    """Both guests' SYN (active open) or SYN-ACK (passive open)."""
    flags, ack = ("S", 0) if active else ("SA", CLIENT_ISN + 1)
    for isn, tsval, observe in ((pri_isn, pri_ts, r.observe_primary),
                                (sec_isn, sec_ts, r.observe_secondary)):
        opts = [("MSS", 1460)] + ([ts(tsval)] if tsval is not None else [])
        observe(build(flags, isn, ack, to_guest=False, opts=opts, **kw), now)


def tcp_of(frame: bytes) -> Any:
    return Ether(frame)[TCP]


def assert_checksum_ok(frame: bytes) -> None:
    """scapy's own checksum of the frame equals the one it carries."""
    pkt = Ether(frame)
    carried = pkt[TCP].chksum
    del pkt[TCP].chksum
    assert Ether(bytes(pkt))[TCP].chksum == carried


def opt(frame: bytes, name: str) -> Any:
    return dict(tcp_of(frame).options).get(name)


def client_ack(ack: int, **kw: Any) -> bytes:
    """A client ACK with a timestamp echo and two SACK blocks, all in the primary's space."""
    opts = [("NOP", None), ("NOP", None), ts(77, ack + 3),
            ("NOP", None), ("NOP", None), ("SAck", tuple(
                (ack + d) % M32 for d in (100, 200, -50, -10)))]
    return build("A", CLIENT_ISN + 1, ack, opts=opts, payload=b"hello", **kw)


def ip_header_and_payload(frame: bytes) -> tuple[bytes, bytes]:
    """What must never change: everything before the TCP header, and the TCP payload."""
    pkt = Ether(frame)
    tcp = pkt[TCP]
    start = len(frame) - len(bytes(tcp))
    return frame[:start], bytes(tcp.payload)


SHAPES: dict[str, dict[str, Any]] = {
    "ipv4": {},
    "ipv6": {"v6": True},
    "vlan": {"vlan": (10,)},
    "qinq_ipv6": {"vlan": (100, 10), "v6": True},
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("active", [False, True], ids=["passive", "active"])
@pytest.mark.parametrize(("pri_isn", "sec_isn"), [
    (1000, 777000), (777000, 1000), *[(p, s) for p in WRAP_ISNS for s in WRAP_ISNS if p != s],
])
def test_ack_sack_tsecr_shift_by_the_offsets(
    shape: str, active: bool, pri_isn: int, sec_isn: int
) -> None:
    kw = SHAPES[shape]
    pri_ts, sec_ts = pri_isn ^ 0x5A5A, sec_isn ^ 0xA5A5
    r = SecondaryRewriter()
    learn(r, pri_isn, sec_isn, active=active, pri_ts=pri_ts, sec_ts=sec_ts, **kw)
    off, ts_off = (sec_isn - pri_isn) % M32, (sec_ts - pri_ts) % M32
    frame = client_ack(pri_isn + 1, **kw)
    before = tcp_of(frame)
    out = r.to_secondary(frame, 1.0)
    after = tcp_of(out)
    assert after.ack == (before.ack + off) % M32 == (sec_isn + 1) % M32
    assert opt(out, "SAck") == tuple((e + off) % M32 for e in opt(frame, "SAck"))
    assert opt(out, "Timestamp") == (77, (opt(frame, "Timestamp")[1] + ts_off) % M32)
    assert after.seq == before.seq
    assert ip_header_and_payload(out) == ip_header_and_payload(frame)
    assert len(out) == len(frame)
    assert_checksum_ok(out)
    assert r.stats()["rewritten_frames"] == 1


@pytest.mark.parametrize("shape", SHAPES)
def test_active_open_client_syn_ack_is_translated(shape: str) -> None:
    kw = SHAPES[shape]
    r = SecondaryRewriter()
    learn(r, 1000, 9000, active=True, pri_ts=500, sec_ts=100, **kw)
    syn_ack = build("SA", CLIENT_ISN, 1001, opts=[("MSS", 1460), ts(42, 500)], **kw)
    out = r.to_secondary(syn_ack, 0.1)
    assert tcp_of(out).ack == 9001
    assert opt(out, "Timestamp") == (42, 100)
    assert_checksum_ok(out)


@pytest.mark.parametrize(("pri_ts", "sec_ts", "echo", "expect"), [
    (100, 40, 150, 90),
    (10, M32 - 5, 20, 5),          # the secondary's clock wraps first
    (M32 - 5, 10, M32 - 1, 14),    # the echo wraps
    (100, 40, 0, 0),               # TSecr 0 means "no echo": left alone
])
def test_tsecr_table(pri_ts: int, sec_ts: int, echo: int, expect: int) -> None:
    r = SecondaryRewriter()
    learn(r, 1000, 2000, pri_ts=pri_ts, sec_ts=sec_ts)
    out = r.to_secondary(build("A", CLIENT_ISN + 1, 1001, opts=[ts(7, echo)]), 0.0)
    assert opt(out, "Timestamp") == (7, expect)
    assert tcp_of(out).ack == 2001
    assert_checksum_ok(out)


@pytest.mark.parametrize(("pri_ts", "sec_ts"), [(100, None), (None, 100), (None, None)])
def test_timestamps_untouched_unless_both_guests_sent_them(
    pri_ts: int | None, sec_ts: int | None
) -> None:
    r = SecondaryRewriter()
    learn(r, 1000, 2000, pri_ts=pri_ts, sec_ts=sec_ts)
    out = r.to_secondary(build("A", CLIENT_ISN + 1, 1001, opts=[ts(7, 150)]), 0.0)
    assert opt(out, "Timestamp") == (7, 150)
    assert tcp_of(out).ack == 2001
    assert_checksum_ok(out)


def test_equal_isns_and_clocks_return_the_same_object() -> None:
    r = SecondaryRewriter()
    learn(r, 1000, 1000, pri_ts=5, sec_ts=5)
    frame = client_ack(1001)
    assert r.to_secondary(frame, 0.0) is frame
    assert r.stats()["zero_offset"] == 1


@pytest.mark.parametrize("other", [
    {"cport": CPORT + 1}, {"gport": GPORT + 1}, {"vlan": (10,)}, {"v6": True},
])
def test_unknown_connection_is_untouched(other: dict[str, Any]) -> None:
    r = SecondaryRewriter()
    learn(r, 1000, 2000)
    frame = client_ack(1001, **other)
    assert r.to_secondary(frame, 0.0) is frame
    assert r.stats()["untracked"] == 1
    assert r.to_secondary(client_ack(1001), 0.0) != client_ack(1001)


@pytest.mark.parametrize("seen", ["primary", "secondary"])
def test_one_isn_known_passes_unchanged_and_counts(seen: str) -> None:
    r = SecondaryRewriter()
    observe = r.observe_primary if seen == "primary" else r.observe_secondary
    observe(build("SA", 1000, CLIENT_ISN + 1, to_guest=False), 0.0)
    frame = client_ack(1001)
    assert r.to_secondary(frame, 0.0) is frame
    assert r.stats()["half_known"] == 1
    other = r.observe_secondary if seen == "primary" else r.observe_primary
    other(build("SA", 3000, CLIENT_ISN + 1, to_guest=False), 0.0)
    offset = 2000 if seen == "primary" else -2000
    assert tcp_of(r.to_secondary(frame, 0.0)).ack == (1001 + offset) % M32


def test_retransmitted_syn_ack_keeps_the_entry_new_isn_replaces_it() -> None:
    r = SecondaryRewriter()
    learn(r, 1000, 2000)
    r.observe_primary(build("SA", 1000, CLIENT_ISN + 1, to_guest=False), 0.5)
    assert tcp_of(r.to_secondary(client_ack(1001), 1.0)).ack == 2001
    r.observe_secondary(build("SA", 7000, CLIENT_ISN + 1, to_guest=False), 2.0)
    frame = client_ack(1001)
    assert r.to_secondary(frame, 2.0) is frame  # the primary's ISN belongs to the old one
    r.observe_primary(build("SA", 4000, CLIENT_ISN + 1, to_guest=False), 2.0)
    assert tcp_of(r.to_secondary(client_ack(4001), 2.0)).ack == 7001
    assert r.stats()["replaced"] == 1 and r.stats()["connections"] == 1


def test_checkpoint_done_drops_every_offset() -> None:
    r = SecondaryRewriter()
    learn(r, 1000, 2000)
    learn(r, 1000, 2000, v6=True)
    r.checkpoint_done()
    frame = client_ack(1001)
    assert r.to_secondary(frame, 0.0) is frame
    assert r.stats()["connections"] == 0 and r.stats()["checkpoint_dropped"] == 2


@pytest.mark.parametrize("who", ["primary", "secondary", "client"])
def test_rst_from_anyone_ends_the_entry(who: str) -> None:
    r = SecondaryRewriter()
    learn(r, 1000, 2000)
    if who == "client":
        rst = build("RA", CLIENT_ISN + 1, 1001)
        out = r.to_secondary(rst, 0.0)
        assert tcp_of(out).ack == 2001  # translated before the entry goes
        assert_checksum_ok(out)
    else:
        observe = r.observe_primary if who == "primary" else r.observe_secondary
        observe(build("R", 1001, to_guest=False), 0.0)
    frame = client_ack(1001)
    assert r.to_secondary(frame, 0.0) is frame
    assert r.stats()["ended_rst"] == 1 and r.stats()["connections"] == 0


# (who, flags, client ack or guest seq, guest payload, entries left afterwards).  Client
# frames must come out translated until the one that ends the entry, that one included.
CLOSES: dict[str, list[tuple[str, str, int, bytes, int]]] = {
    "client_first": [
        ("client", "FA", 1001, b"", 1),
        ("primary", "FA", 1001, b"bye", 1),
        ("secondary", "FA", 2001, b"bye", 1),
        ("client", "A", 1004, b"", 1),  # acks the data, not the guests' FIN
        ("client", "A", 1005, b"", 0),  # the last ACK: translated, then the entry goes
    ],
    "guests_first": [
        ("secondary", "FA", 2001, b"", 1),
        ("primary", "FA", 1001, b"", 1),
        ("client", "FA", 1002, b"", 0),
    ],
    "secondary_lags": [
        ("primary", "FA", 1001, b"", 1),
        ("client", "FA", 1002, b"", 1),
        ("secondary", "FA", 2001, b"", 0),
    ],
}


@pytest.mark.parametrize("case", CLOSES)
def test_fin_from_all_three_ends_the_entry_after_the_last_ack(case: str) -> None:
    r = SecondaryRewriter()
    learn(r, 1000, 2000)
    for who, flags, number, payload, left in CLOSES[case]:
        if who == "client":
            out = r.to_secondary(build(flags, CLIENT_ISN + 1, number), 0.0)
            assert tcp_of(out).ack == number + 1000
            assert_checksum_ok(out)
        else:
            observe = r.observe_primary if who == "primary" else r.observe_secondary
            observe(build(flags, number, CLIENT_ISN + 2, to_guest=False, payload=payload), 0.0)
        assert r.stats()["connections"] == left, (who, flags, number)
    assert r.stats()["ended_fin"] == 1


def test_table_is_bounded() -> None:
    r = SecondaryRewriter(max_connections=2)
    for port in (1, 2, 3):
        learn(r, 1000, 2000, cport=port)
    assert r.stats()["connections"] == 2
    assert r.stats()["table_full"] == 2  # both guests' SYN-ACKs of the third
    third = client_ack(1001, cport=3)
    assert r.to_secondary(third, 0.0) is third
    r.observe_primary(build("R", 1001, to_guest=False, cport=1), 0.0)
    learn(r, 1000, 2000, cport=3)
    assert tcp_of(r.to_secondary(third, 0.0)).ack == 2001


def test_idle_entries_expire_and_client_frames_keep_them_alive() -> None:
    r = SecondaryRewriter(idle_timeout=10.0)
    learn(r, 1000, 2000, now=0.0)
    learn(r, 1000, 2000, cport=1, now=0.0)
    r.expire(10.0)
    assert r.stats()["connections"] == 2
    r.to_secondary(client_ack(1001), 9.0)
    r.expire(15.0)
    assert r.stats()["connections"] == 1 and r.stats()["expired"] == 1
    assert tcp_of(r.to_secondary(client_ack(1001), 15.0)).ack == 2001
    r.expire(25.5)
    assert r.stats()["connections"] == 0 and r.stats()["expired"] == 2


def _pseudo_sum(frame: bytes) -> int:
    """The folded pseudo-header sum a stack leaves in the field when the NIC will finish it."""
    pkt = Ether(frame)
    ip = pkt[IPv6] if IPv6 in pkt else pkt[IP]
    tcp_len = len(bytes(pkt[TCP]))
    if IPv6 in pkt:
        words = bytes(IPv6(src=ip.src, dst=ip.dst))[8:40] + tcp_len.to_bytes(4, "big") + b"\0\0\0\6"
    else:
        words = bytes(IP(src=ip.src, dst=ip.dst))[12:20] + b"\0\6" + tcp_len.to_bytes(2, "big")
    total = sum(int.from_bytes(words[i:i + 2], "big") for i in range(0, len(words), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _nic_completes(frame: bytes) -> int:
    """What an offloading NIC writes: the complement of the sum over the segment as it stands."""
    tcp = bytes(Ether(frame)[TCP])
    data = tcp + b"\0" * (len(tcp) & 1)
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return 0xFFFF - total


def _with_checksum(frame: bytes, value: int) -> bytes:
    pkt = Ether(frame)
    pkt[TCP].chksum = value
    return bytes(pkt)


@pytest.mark.parametrize("v6", [False, True])
def test_partial_checksum_left_for_the_nic(v6: bool) -> None:
    r = SecondaryRewriter()
    learn(r, 1000, 2000, pri_ts=1, sec_ts=9, v6=v6)
    full = client_ack(1001, v6=v6)
    partial = _with_checksum(full, _pseudo_sum(full))
    assert _nic_completes(partial) == tcp_of(full).chksum  # the emulated NIC is right
    out = r.to_secondary(partial, 0.0)
    assert tcp_of(out).ack == 2001
    assert tcp_of(out).chksum == tcp_of(partial).chksum
    pkt = Ether(out)
    del pkt[TCP].chksum
    assert _nic_completes(out) == Ether(bytes(pkt))[TCP].chksum
    assert r.stats()["partial_checksums"] == 1


@pytest.mark.parametrize("tail", [b"", b"\x07"], ids=["even", "odd"])
def test_full_checksum_equal_to_the_pseudo_sum_is_still_updated(tail: bytes) -> None:
    """One frame in 65535 has a complete checksum that looks like a partial one."""
    r = SecondaryRewriter()
    learn(r, 1000, 2000)
    base = build("A", CLIENT_ISN + 1, 1001, payload=b"\0\0" + tail)
    pseudo = _pseudo_sum(base)
    # Two payload bytes x add x to the sum, so the checksum drops by x: pick x to land on it.
    x = (tcp_of(base).chksum - pseudo) % 0xFFFF
    frame = build("A", CLIENT_ISN + 1, 1001, payload=x.to_bytes(2, "big") + tail)
    assert tcp_of(frame).chksum % 0xFFFF == pseudo % 0xFFFF
    out = r.to_secondary(frame, 0.0)
    assert tcp_of(out).ack == 2001
    assert_checksum_ok(out)
    assert r.stats()["partial_checksums"] == 0


def test_rewritten_checksum_that_sums_to_zero_is_0x0000() -> None:
    """A ones'-complement sum of real data folds to 0xFFFF, so the field is 0, never 0xFFFF."""
    r = SecondaryRewriter()
    learn(r, 1000, 2000)
    first = r.to_secondary(build("A", CLIENT_ISN + 1, 1001, payload=b"\0\0"), 0.0)
    x = tcp_of(first).chksum  # payload x lowers the rewritten checksum by exactly x
    out = r.to_secondary(build("A", CLIENT_ISN + 1, 1001, payload=x.to_bytes(2, "big")), 0.0)
    assert tcp_of(out).chksum == 0
    assert_checksum_ok(out)


@pytest.mark.parametrize(("opts", "walkable"), [
    (b"\x05\x07" + bytes(6), False),           # SACK length not 2 + 8n
    (b"\x05\x02\x00\x00", False),              # SACK with no block
    (b"\x08\x09" + bytes(10), False),          # timestamp of the wrong length
    (b"\x01\x01\x05\x0c" + bytes(8), False),   # SACK running past the header
    (b"\x01\x01\x01\x13", False),              # last option has no length byte
    (b"\x01\x01\x13\x00", False),              # option length 0
    (b"\x01\x01\x08\x0a" + bytes(8) + b"\x01\x01\x08\x0a" + bytes(8), False),  # two timestamps
    (b"\x05\x0a" + bytes(8) + b"\x05\x0a" + bytes(8) + b"\x01\x01\x01\x01", False),  # two SACKs
    (b"\x01\x01\x01\x00\x05\x07\x00\x00", True),   # garbage after EOL is not read
])
def test_malformed_client_options_pass_unchanged(opts: bytes, walkable: bool) -> None:
    r = SecondaryRewriter()
    learn(r, 1000, 2000, pri_ts=1, sec_ts=9)
    tcp = TCP(sport=CPORT, dport=GPORT, flags="A", seq=CLIENT_ISN + 1, ack=1001,
              dataofs=5 + len(opts) // 4)
    frame = bytes(Ether() / IP(src=C4, dst=G4) / tcp / Raw(opts))
    out = r.to_secondary(frame, 0.0)
    if walkable:
        assert out[-len(opts):] == opts
        assert tcp_of(out).ack == 2001
        # scapy drops the bytes after EOL when it rebuilds, so sum the raw segment here.
        segment = out[34:50] + b"\0\0" + out[52:]
        assert in4_chksum(6, Ether(out)[IP], segment) == tcp_of(out).chksum
    else:
        assert out is frame
        assert r.stats()["bad_options"] == 1


def test_fragments_and_other_protocols_pass_unchanged() -> None:
    r = SecondaryRewriter()
    learn(r, 1000, 2000)
    frag = bytes(Ether() / IP(src=C4, dst=G4, flags="MF", proto=6) / Raw(client_ack(1001)[34:]))
    udp = bytes(Ether() / IP(src=C4, dst=G4) / UDP(sport=CPORT, dport=GPORT) / Raw(b"x" * 20))
    arp = b"\xff" * 6 + b"\x52\x54\x00\x00\x00\x02" + b"\x08\x06" + bytes(28)
    for frame in (frag, udp, arp):
        assert r.to_secondary(frame, 0.0) is frame
    stats = r.stats()
    assert stats["fragments"] == 1 and stats["not_tcp"] == 2 and stats["malformed"] == 0


def test_a_rewritten_frame_is_a_new_object() -> None:
    """The input (declared bytes: a compiled core rejects a bytearray) is left as it was."""
    r = SecondaryRewriter()
    learn(r, 1000, 2000)
    frame = client_ack(1001)
    out = r.to_secondary(frame, 0.0)
    assert frame == client_ack(1001) and out is not frame and out != frame


# ---- properties ------------------------------------------------------------------------------

u32 = st.integers(0, M32 - 1)


@settings(max_examples=150, deadline=None)
@given(pri_isn=u32, sec_isn=u32, pri_ts=u32, sec_ts=u32, ack=u32, echo=u32,
       edges=st.lists(u32, min_size=0, max_size=3), payload=st.binary(max_size=9),
       shape=st.sampled_from(sorted(SHAPES)), active=st.booleans())
def test_any_offsets_shift_exactly_with_a_valid_checksum(
    pri_isn: int, sec_isn: int, pri_ts: int, sec_ts: int, ack: int, echo: int,
    edges: list[int], payload: bytes, shape: str, active: bool,
) -> None:
    kw = SHAPES[shape]
    r = SecondaryRewriter()
    learn(r, pri_isn, sec_isn, active=active, pri_ts=pri_ts, sec_ts=sec_ts, **kw)
    blocks = tuple(e for edge in edges for e in (edge, (edge + 1000) % M32))
    opts: list[tuple[str, Any]] = [ts(3, echo)]
    if blocks:
        opts += [("NOP", None), ("NOP", None), ("SAck", blocks)]
    frame = build("A", CLIENT_ISN + 1, ack, opts=opts, payload=payload, **kw)
    out = r.to_secondary(frame, 0.0)
    off, ts_off = (sec_isn - pri_isn) % M32, (sec_ts - pri_ts) % M32
    assert tcp_of(out).ack == (ack + off) % M32
    assert opt(out, "SAck") == (tuple((e + off) % M32 for e in blocks) if blocks else None)
    assert opt(out, "Timestamp") == (3, (echo + ts_off) % M32 if echo else 0)
    assert ip_header_and_payload(out) == ip_header_and_payload(frame)
    assert_checksum_ok(out)


def _primed() -> SecondaryRewriter:
    r = SecondaryRewriter()
    learn(r, 1000, 2000, pri_ts=1, sec_ts=9)
    learn(r, 1000, 2000, pri_ts=1, sec_ts=9, v6=True, vlan=(10,))
    return r


def _valid_frames() -> list[bytes]:
    return [
        client_ack(1001),
        client_ack(1001, v6=True, vlan=(10,)),
        build("SA", 2000, CLIENT_ISN + 1, to_guest=False, opts=[("MSS", 1460), ts(5)]),
        build("FA", 1001, CLIENT_ISN + 1, to_guest=False, v6=True, vlan=(10,), payload=b"z"),
    ]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_never_raise_and_pass_unchanged(data: bytes) -> None:
    r = _primed()
    r.observe_primary(data, 0.0)
    r.observe_secondary(data, 0.0)
    assert r.to_secondary(data, 0.0) == data


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, 3), cut=st.integers(0, 500))
def test_truncated_frames_never_raise_and_pass_unchanged(which: int, cut: int) -> None:
    frame = _valid_frames()[which]
    short = frame[: cut % len(frame)]
    r = _primed()
    r.observe_primary(short, 0.0)
    r.observe_secondary(short, 0.0)
    assert r.to_secondary(short, 0.0) is short
    assert r.stats()["connections"] == 2  # nothing learnt or ended from a broken frame
    assert r.stats()["malformed"] == 1


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, 3), flips=st.lists(st.tuples(st.integers(0, 200), u32), max_size=6))
def test_corrupted_frames_never_raise(which: int, flips: list[tuple[int, int]]) -> None:
    frame = bytearray(_valid_frames()[which])
    for at, value in flips:
        frame[at % len(frame)] = value & 0xFF
    data = bytes(frame)
    r = _primed()
    r.observe_primary(data, 0.0)
    r.observe_secondary(data, 0.0)
    out = r.to_secondary(data, 0.0)
    assert out is data or r.stats()["rewritten_frames"] == 1
    assert len(out) == len(data)
