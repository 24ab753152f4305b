"""QEMU record codec: golden tables, any-split property, errors as state."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo_proxy.core.framing import (
    NET_BUFSIZE,
    FrameDecoder,
    FramingErrorKind,
    encode_frame,
    encode_frames,
)
from colo_proxy.core.xen_notify import (
    NotifyDecoder,
    NotifyKind,
    do_checkpoint,
    encode_message,
    init_reply,
)

ETH = bytes(range(60))

GOLDEN = [
    # (vnet, frames, wire bytes)
    (False, [(b"\xaa" * 3, 0)], b"\x00\x00\x00\x03\xaa\xaa\xaa"),
    (
        True,
        [(b"\x00" * 12 + b"\xbb", 12)],
        b"\x00\x00\x00\x0d\x00\x00\x00\x0c" + b"\x00" * 12 + b"\xbb",
    ),
    (True, [(b"\xcc", 0)], b"\x00\x00\x00\x01\x00\x00\x00\x00\xcc"),
    (False, [(b"a", 0), (b"bc", 0)], b"\x00\x00\x00\x01a\x00\x00\x00\x02bc"),
]


@pytest.mark.parametrize(("vnet", "frames", "wire"), GOLDEN)
def test_golden_encode_and_decode(vnet: bool, frames: list[tuple[bytes, int]], wire: bytes) -> None:
    assert encode_frames(frames, vnet) == wire
    dec = FrameDecoder(vnet)
    assert dec.feed(wire) == frames
    assert dec.error is None
    assert dec.pending_bytes == 0


def test_vnet_header_bytes_carried_untouched() -> None:
    vhdr = bytes([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    frame = (vhdr + ETH, 12)
    dec = FrameDecoder(True)
    [(data, off)] = dec.feed(encode_frame(*frame, vnet_hdr=True))
    assert data[:off] == vhdr and data[off:] == ETH


def test_offset_without_vnet_is_misuse() -> None:
    with pytest.raises(ValueError):
        encode_frames([(b"xx", 1)], False)


def test_byte_by_byte_max_size_record_is_linear() -> None:
    body = b"\x5a" * NET_BUFSIZE
    wire = encode_frame(body, 0, False)
    dec = FrameDecoder(False)
    got = []
    for i in range(len(wire)):
        got += dec.feed(wire[i : i + 1])
    assert got == [(body, 0)]


ERRORS = [
    # (vnet, bad record header, kind)
    (False, struct.pack(">I", 0), FramingErrorKind.ZERO_LENGTH),
    (False, struct.pack(">I", NET_BUFSIZE + 1), FramingErrorKind.OVERSIZED),
    (False, b"GET / HTTP/1.1\r\n", FramingErrorKind.OVERSIZED),
    (True, struct.pack(">II", 10, 11), FramingErrorKind.VNET_HDR_TOO_LONG),
    (True, struct.pack(">II", 0, 0), FramingErrorKind.ZERO_LENGTH),
    (True, struct.pack(">II", 0xFFFFFFFF, 0), FramingErrorKind.OVERSIZED),
]


@pytest.mark.parametrize(("vnet", "bad", "kind"), ERRORS)
def test_errors_keep_earlier_frames_and_stop(
    vnet: bool, bad: bytes, kind: FramingErrorKind
) -> None:
    good = [(ETH, 0), (ETH[:20], 0)]
    wire = encode_frames(good, vnet)
    dec = FrameDecoder(vnet)
    assert dec.feed(wire + bad + wire) == good
    assert dec.error is not None and dec.error.kind is kind
    assert dec.error.stream_offset == len(wire)
    assert kind.value in dec.error.describe()
    assert dec.feed(wire) == []  # ignored until reset
    dec.reset()
    assert dec.error is None
    assert dec.feed(wire) == good


def test_exactly_max_length_is_accepted() -> None:
    body = b"\x01" * NET_BUFSIZE
    assert FrameDecoder(False).feed(encode_frame(body, 0, False)) == [(body, 0)]


def test_partial_record_is_reported_and_dropped_on_reset() -> None:
    dec = FrameDecoder(False)
    assert dec.feed(encode_frame(ETH, 0, False)[:10]) == []
    assert dec.pending_bytes == 10
    dec.reset()
    assert dec.pending_bytes == 0
    assert dec.feed(encode_frame(ETH, 0, False)) == [(ETH, 0)]


frames_strategy = st.lists(
    st.tuples(st.binary(min_size=1, max_size=300), st.integers(0, 20)), min_size=0, max_size=20
)


@settings(max_examples=300, deadline=None)
@given(
    frames=frames_strategy, cuts=st.lists(st.integers(0, 10_000), max_size=30), vnet=st.booleans()
)
def test_any_split_decodes_the_same(
    frames: list[tuple[bytes, int]], cuts: list[int], vnet: bool
) -> None:
    # a vnet header length must fit in its record; without vnet support it is 0
    frames = [(d + b"\x00" * o, o) if vnet else (d, 0) for d, o in frames]
    wire = encode_frames(frames, vnet)
    points = sorted({c % (len(wire) + 1) for c in cuts})
    pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    dec = FrameDecoder(vnet)
    got: list[tuple[bytes, int]] = []
    for piece in pieces:
        got += dec.feed(piece)
    assert got == frames
    assert dec.error is None and dec.pending_bytes == 0


# ---- notify_dev text protocol -------------------------------------------------------------


def test_notify_messages_with_and_without_vnet_word() -> None:
    with_vnet = struct.pack(">II", 15, 0) + b"COLO_CHECKPOINT"
    plain = encode_message("COLO_USERSPACE_PROXY_INIT")
    odd = encode_message("HELLO")
    dec = NotifyDecoder()
    wire = with_vnet + plain + odd
    got = []
    for i in range(len(wire)):
        got += dec.feed(wire[i : i + 1])
    assert [m.kind for m in got] == [
        NotifyKind.CHECKPOINT_DONE,
        NotifyKind.INIT,
        NotifyKind.UNKNOWN,
    ]
    assert got[2].text == "HELLO"
    assert dec.error is None


def test_notify_outgoing_framing_matches_colo_compare() -> None:
    assert do_checkpoint() == b"\x00\x00\x00\x0dDO_CHECKPOINT"
    assert init_reply() == struct.pack(">I", 25) + b"COLO_COMPARE_GET_XEN_INIT"


@pytest.mark.parametrize(
    "bad", [struct.pack(">I", 0) + b"x", struct.pack(">I", 100000) + b"x", b"\x00\x00\x00\x02A\x00"]
)
def test_notify_garbage_sets_error(bad: bytes) -> None:
    dec = NotifyDecoder()
    assert dec.feed(encode_message("COLO_CHECKPOINT") + bad)[0].kind is NotifyKind.CHECKPOINT_DONE
    assert dec.error is not None
    dec.reset()
    assert dec.feed(encode_message("COLO_CHECKPOINT"))[0].kind is NotifyKind.CHECKPOINT_DONE
