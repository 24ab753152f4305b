"""Comparison with noise fields blanked: how far two streams agree once masked.

A mask blanks a field only when it sits at the same place with the same
length on both sides and has ended on both (a field still growing at the
end of either buffer waits for more bytes).  Anything else stays a
divergence: a mask never hides a length change.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

MASK_CONTEXT: Final = 256
"""Agreed bytes kept before the buffers so a pattern can anchor on text before a field."""


def first_difference(a: bytearray, b: bytearray, lo: int, hi: int) -> int:
    """The first index in [lo, hi) where a and b differ, or hi."""
    if a[lo:hi] == b[lo:hi]:
        return hi
    while hi - lo > 1:  # invariant: a[lo:hi] != b[lo:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def field_at(
    regex: re.Pattern[bytes], text: bytes, ctx: int, at: int
) -> tuple[int, int] | None:
    """The span (in buffer offsets) of the field the regex finds covering buffer offset `at`."""
    pos = max(0, ctx + at - MASK_CONTEXT)
    for m in regex.finditer(text, pos):
        group = 1 if regex.groups else 0
        start, end = m.span(group)
        if start < 0:
            continue
        if start > ctx + at:
            return None
        if start <= ctx + at < end:
            return start - ctx, end - ctx
    return None


def masked_agree(
    ctx: bytes, pb: bytearray, sb: bytearray, n: int, masks: Sequence[re.Pattern[bytes]]
) -> tuple[int, int, bool]:
    """How many of the first n bytes agree once masked fields are blanked.

    Returns (agree, masked, wait): bytes that agree from the start, how many
    of them were masked, and whether the first difference lies in a field
    that has not ended yet on both sides (wait for more bytes, not a divergence).
    """
    pos = masked = 0
    text_p = text_s = b""
    while pos < n:
        d = first_difference(pb, sb, pos, n)
        if d >= n:
            return n, masked, False
        if not text_p:
            text_p, text_s = ctx + bytes(pb), ctx + bytes(sb)
        span = None
        for regex in masks:
            sp = field_at(regex, text_p, len(ctx), d)
            if sp is None:
                continue
            ss = field_at(regex, text_s, len(ctx), d)
            if ss is None:
                continue
            if sp[1] >= len(pb) or ss[1] >= len(sb):
                return d, masked, True  # the field may still grow on one side
            if sp != ss:
                return d, masked, False  # not the same place and length: a divergence
            span = sp
            break
        if span is None:
            return d, masked, False
        masked += span[1] - d
        pos = span[1]
    return min(pos, n), masked, False


def mask_datagram(content: bytes, masks: Sequence[re.Pattern[bytes]]) -> tuple[bytes, int]:
    """A datagram with every masked field blanked (same length), and how many bytes were."""
    spans: list[tuple[int, int]] = []
    for regex in masks:
        group = 1 if regex.groups else 0
        for m in regex.finditer(content):
            start, end = m.span(group)
            if start >= 0 and end > start:
                spans.append((start, end))
    if not spans:
        return content, 0
    out = bytearray(content)
    count = 0
    for start, end in spans:
        out[start:end] = bytes(end - start)
        count += end - start
    return bytes(out), count
