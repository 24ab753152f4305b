"""ExtentMap against a byte-array model: last writer wins, every split is right."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from colo_proxy.disk.extents import ZERO, Extent, ExtentMap, compact, data_bytes

SIZE = 256


def _render(m: ExtentMap, log: bytes) -> bytes:
    out = bytearray()
    for _off, n, pos in m.lookup(0, SIZE):
        if pos is None:
            out += b"." * n
        elif pos == ZERO:
            out += b"\0" * n
        else:
            out += log[pos:pos + n]
    return bytes(out)


writes = st.lists(
    st.tuples(st.integers(0, SIZE - 1), st.integers(1, 64), st.booleans()), max_size=40)


@settings(max_examples=300, deadline=None)
@given(writes)
def test_map_matches_model(ops: list[tuple[int, int, bool]]) -> None:
    m = ExtentMap()
    log = bytearray()
    model = bytearray(b"." * SIZE)
    for i, (off, n, zero) in enumerate(ops):
        n = min(n, SIZE - off)
        if zero:
            m.insert(off, n, ZERO)
            model[off:off + n] = b"\0" * n
        else:
            data = bytes([65 + i % 26]) * n
            m.insert(off, n, len(log))
            log += data
            model[off:off + n] = data
    assert _render(m, bytes(log)) == bytes(model)
    assert m.mapped_bytes == sum(1 for b in model if b != ord("."))
    exts = m.extents()
    assert all(a.end <= b.offset for a, b in itertools.pairwise(exts))
    # The compact (journal) layout reads back the same bytes.
    layout = compact(exts)
    packed = b"".join(log[e.pos:e.pos + e.length] for e in exts if e.pos != ZERO)
    assert len(packed) == data_bytes(layout)
    c = ExtentMap()
    for e in layout:
        c.insert(e.offset, e.length, e.pos)
    assert _render(c, packed) == bytes(model)


def test_sequential_writes_merge() -> None:
    m = ExtentMap()
    for i in range(100):
        m.insert(i * 10, 10, i * 10)
    assert m.extents() == [Extent(0, 1000, 0)]


def test_lookup_reports_holes() -> None:
    m = ExtentMap()
    m.insert(10, 5, 0)
    assert list(m.lookup(0, 20)) == [(0, 10, None), (10, 5, 0), (15, 5, None)]
    assert list(m.lookup(12, 2)) == [(12, 2, 2)]
