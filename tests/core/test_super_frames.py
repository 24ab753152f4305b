"""The core with GSO/GRO super-frames (bridge mode with offloads on): byte streams, not frames.

A super-frame is one TCP segment of up to 64 KiB, IP total length over any
MTU.  The core must compare it by stream offset like any segment, whichever
guest segmented differently, find a flipped byte inside it at its offset, and
hand back the (virtio_net_hdr + frame, 10) pairs the bridge fed it unchanged.
Both paths (fast and general) and both builds run these.
"""

from __future__ import annotations

import random

import pytest

from colo_proxy.core.events import Side
from colo_proxy.testing.synth import TcpServerStream
from tests.core.harness import P, S, both_paths, make_proxy, run

pytestmark = pytest.mark.usefixtures(both_paths.__name__)

SUPER = 64000
"""Payload of one super-frame: IP total length 64040, under the 65535 limit."""
PAYLOAD = random.Random(12).randbytes(4 * SUPER + 5000)
VNET = bytes((1, 1)) + bytes(8)  # NEEDS_CSUM, GSO_TCPV4 (the rest does not matter here)


def segments(st: TcpServerStream, data: bytes, size: int) -> list[bytes]:
    return [st.data(o, data[o:o + size]) for o in range(0, len(data), size)]


@pytest.mark.parametrize("primary_size,secondary_size", [(SUPER, 1448), (1448, SUPER),
                                                         (SUPER, 40000)])
def test_super_frames_against_other_segmentation_agree(primary_size: int,
                                                       secondary_size: int) -> None:
    p, s = TcpServerStream(isn=7), TcpServerStream(isn=2**32 - 5)
    pri = [p.synack(), *segments(p, PAYLOAD, primary_size)]
    sec = [s.synack(), *segments(s, PAYLOAD, secondary_size)]
    assert max(len(f) for f in pri + sec) > 60000  # super-frames on one side at least
    r = run([(P, f) for f in pri] + [(S, f) for f in sec])
    assert r.divergences == []
    assert r.released == pri
    assert r.proxy.held_frames() == 0


@pytest.mark.parametrize("flip", [0, SUPER - 1, SUPER, SUPER + 30000, 4 * SUPER + 4999])
def test_a_flipped_byte_inside_a_super_frame_is_found_at_its_offset(flip: int) -> None:
    p, s = TcpServerStream(isn=7), TcpServerStream(isn=99)
    bad = bytearray(PAYLOAD)
    bad[flip] ^= 0x5A
    pri = [p.synack(), *segments(p, PAYLOAD, SUPER)]
    sec = [s.synack(), *segments(s, bytes(bad), 1448)]
    r = run([(P, f) for f in pri] + [(S, f) for f in sec])
    assert r.kinds == [("payload", flip)]
    # the super-frames wholly before the flipped byte went out; none at or after it
    assert sum(len(f) - 54 for f in r.released[1:]) == flip // SUPER * SUPER


def test_vnet_pairs_are_compared_from_their_offset_and_released_unchanged() -> None:
    p, s = TcpServerStream(isn=7), TcpServerStream(isn=99)
    pri = [(VNET + f, len(VNET)) for f in [p.synack(), *segments(p, PAYLOAD, SUPER)]]
    sec = [(VNET + f, len(VNET)) for f in [s.synack(), *segments(s, PAYLOAD, 1448)]]
    proxy = make_proxy()
    proxy.feed_many(Side.PRIMARY, pri, 0.0)
    proxy.feed_many(Side.SECONDARY, sec, 0.001)
    out = proxy.take_output()
    assert out.divergences == []
    assert list(out.released) == pri  # header and offset kept: the bridge sends them on
    assert proxy.held_frames() == 0
