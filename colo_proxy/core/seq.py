"""Wrap-safe 32-bit TCP sequence arithmetic and mapping to 64-bit stream offsets.

TCP numbers wrap at 2**32; the core works on unbounded stream offsets so that
comparisons and dictionary keys never have to think about wraparound.
"""

from __future__ import annotations

from typing import Final

MASK32: Final = 0xFFFFFFFF
HALF32: Final = 0x80000000
SPAN32: Final = 0x100000000


def seq_diff(a: int, b: int) -> int:
    """Signed distance a - b in sequence space, in [-2**31, 2**31)."""
    return ((a - b + HALF32) & MASK32) - HALF32


def unwrap(rel32: int, near: int) -> int:
    """The 64-bit offset congruent to rel32 (mod 2**32) closest to near.

    rel32 is a sequence number already made relative to the ISN; near is the
    last offset seen on this stream, so a stream may run for any length.
    """
    return near + (((rel32 - near + HALF32) & MASK32) - HALF32)
