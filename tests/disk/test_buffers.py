"""The sans-IO Replica driven by an in-memory driver and checked against a plain model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo_proxy.disk.buffers import (
    BASE,
    Action,
    Apply,
    ApplyOverlay,
    DiskStateError,
    EpochApplied,
    Export,
    FailoverComplete,
    Phase,
    Refused,
    Release,
    Replica,
    Seal,
    WriteBase,
    WriteTo,
)
from colo_proxy.disk.extents import ZERO, compact

SIZE = 512


class MemDriver:
    """Carries out the Replica's actions on byte arrays, never in a surprising order."""

    def __init__(self, initial: bytes) -> None:
        self.base = bytearray(initial)
        self.r = Replica(len(initial))
        self.logs: dict[int, bytearray] = {}
        self.sealed: list[Seal] = []
        self.applies: list[Apply | ApplyOverlay] = []
        self.events: list[Action] = []
        self.overlay_rounds = 0

    def log(self, buf: int) -> bytearray:
        return self.logs.setdefault(buf, bytearray())

    def write(self, export: Export, off: int, data: bytes, zero: bool = False) -> bool:
        act = self.r.write(export, off, len(data), zero=zero)
        if isinstance(act, Refused):
            return False
        if isinstance(act, WriteBase):
            self.base[off:off + len(data)] = b"\0" * len(data) if zero else data
        else:
            assert isinstance(act, WriteTo)
            if not zero:
                assert act.pos == len(self.log(act.buffer))
                self.log(act.buffer).extend(data)
        return True

    def read(self, export: Export, off: int, n: int) -> bytes:
        out = bytearray()
        for p in self.r.read(export, off, n):
            if p.buffer == BASE:
                out += self.base[p.offset:p.offset + p.length]
            elif p.buffer == ZERO:
                out += bytes(p.length)
            else:
                out += self.logs[p.buffer][p.pos:p.pos + p.length]
        assert len(out) == n
        return bytes(out)

    def handle(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Release):
                self.logs.pop(a.buffer, None)
            elif isinstance(a, Seal):
                self.sealed.append(a)
            elif isinstance(a, Apply | ApplyOverlay):
                self.applies.append(a)
            else:
                self.events.append(a)

    def journal_next(self) -> None:
        seal = self.sealed.pop(0)
        src = self.logs.get(seal.buffer, bytearray())
        data = bytearray()
        for e in seal.extents:
            if e.pos != ZERO:
                data += src[e.pos:e.pos + e.length]
        jid = self.r.new_buffer_id()
        self.logs[jid] = data
        assert len(data) == sum(e.length for e in compact(list(seal.extents)) if e.pos != ZERO)
        self.handle(self.r.journaled(seal.epoch, jid))

    def apply_next(self, between: Callable[[], None] | None = None) -> None:
        """Carry out the next Apply or ApplyOverlay, extent by extent, calling
        ``between`` after each one (a half-written base must never show)."""
        a = self.applies.pop(0)
        src = self.logs.get(a.buffer, bytearray())  # all-zeros overlays never logged
        for e in a.extents:
            if e.pos == ZERO:
                self.base[e.offset:e.end] = bytes(e.length)
            else:
                self.base[e.offset:e.end] = src[e.pos:e.pos + e.length]
            if between is not None:
                between()
        if isinstance(a, ApplyOverlay):
            self.overlay_rounds += 1
            self.handle(self.r.overlay_applied(a.buffer))
        else:
            self.handle(self.r.applied(a.epoch))


ops = st.lists(st.one_of(
    st.tuples(st.sampled_from(["w", "z", "s", "sz"]), st.integers(0, SIZE - 1),
              st.integers(1, 80)),
    st.tuples(st.sampled_from(["ckpt", "journal", "apply", "failover"]), st.just(0), st.just(0)),
), max_size=60)


@settings(max_examples=400, deadline=None)
@given(ops)
def test_replica_matches_model(script: list[tuple[str, int, int]]) -> None:
    d = MemDriver(bytes(range(256)) * 2)
    primary = bytearray(d.base)  # what the primary's disk holds now
    snapshots = {0: bytes(d.base)}
    secondary = bytearray(d.base)  # what the secondary VM sees; it runs on after failover
    epoch = 0
    failing = False

    def secondary_view_is_right() -> None:
        assert d.read(Export.SECONDARY, 0, SIZE) == bytes(secondary)
        assert d.read(Export.REPLICATION, 0, SIZE) == bytes(secondary)

    for i, (op, off, n) in enumerate(script):
        n = min(n, SIZE - off)
        data = bytes([(i * 7 + k) % 251 for k in range(n)])
        if op in ("w", "z"):
            ok = d.write(Export.REPLICATION, off, data, zero=op == "z")
            assert ok == (d.r.phase is Phase.REPLICATING)
            if ok:
                primary[off:off + n] = bytes(n) if op == "z" else data
        elif op in ("s", "sz"):
            # Taken at every phase, failing over included: the secondary VM never stops.
            assert d.write(Export.SECONDARY, off, data, zero=op == "sz")
            secondary[off:off + n] = bytes(n) if op == "sz" else data
        elif op == "ckpt" and d.r.phase is Phase.REPLICATING:
            epoch += 1
            d.handle(d.r.checkpoint(epoch))
            snapshots[epoch] = bytes(primary)
            secondary = bytearray(primary)
        elif op == "journal" and d.sealed:
            d.journal_next()
        elif op == "apply" and d.applies:
            overlay = isinstance(d.applies[0], ApplyOverlay)
            d.apply_next(secondary_view_is_right if failing else None)
            if not overlay:
                assert bytes(d.base) == snapshots[d.r.applied_epoch]
        elif op == "failover":
            d.handle(d.r.failover())
            failing = True
        if failing:
            secondary_view_is_right()
        else:
            assert d.read(Export.REPLICATION, 0, SIZE) == bytes(primary)
            assert d.read(Export.SECONDARY, 0, SIZE) == bytes(secondary)
    # Finish everything: the base image must be exactly the secondary VM's disk.
    d.handle(d.r.failover())
    while d.sealed or d.applies:
        if d.sealed:
            d.journal_next()
        if d.applies:
            d.apply_next(secondary_view_is_right)
    done = [e for e in d.events if isinstance(e, FailoverComplete)]
    assert done and done[-1].epoch == epoch  # the last committed epoch, as before
    assert bytes(d.base) == bytes(secondary)
    assert d.r.phase is Phase.FAILED_OVER
    assert d.r.status().overlay_bytes == 0
    assert not d.write(Export.REPLICATION, 0, b"x")


def test_checkpoint_queues_behind_unapplied_writeout() -> None:
    d = MemDriver(bytes(SIZE))
    d.write(Export.REPLICATION, 0, b"a" * 10)
    d.handle(d.r.checkpoint(1))
    d.journal_next()
    assert [a.epoch for a in d.applies] == [1]
    d.write(Export.REPLICATION, 5, b"b" * 10)
    d.handle(d.r.checkpoint(2))
    d.journal_next()
    assert [a.epoch for a in d.applies] == [1]  # epoch 2 waits for epoch 1
    assert d.r.status().writeouts == ((1, 10, True), (2, 10, True))
    d.apply_next()
    assert [a.epoch for a in d.applies] == [2]
    assert EpochApplied(1) in d.events
    d.apply_next()
    assert bytes(d.base[:15]) == b"a" * 5 + b"b" * 10


def test_failover_waits_for_writeouts_drops_speculation_keeps_overlay() -> None:
    # Before the fix this asserted that the secondary's write at 8 vanished: that
    # encoded the bug (the secondary VM runs on from its state, not the checkpoint).
    d = MemDriver(bytes(SIZE))
    d.write(Export.REPLICATION, 0, b"x" * 4)
    d.handle(d.r.checkpoint(7))
    d.write(Export.REPLICATION, 0, b"y" * 4)  # speculation, never committed
    d.write(Export.SECONDARY, 8, b"s" * 4)
    d.handle(d.r.failover())
    assert d.r.phase is Phase.FAILING_OVER
    assert not any(isinstance(e, FailoverComplete) for e in d.events)
    d.journal_next()
    d.apply_next()  # epoch 7
    assert isinstance(d.applies[0], ApplyOverlay)
    assert d.r.phase is Phase.FAILING_OVER
    d.apply_next()  # the overlay
    assert FailoverComplete(7) in d.events
    assert bytes(d.base[:12]) == b"xxxx" + bytes(4) + b"ssss"
    assert d.write(Export.SECONDARY, 0, b"after")  # passthrough now
    assert bytes(d.base[:5]) == b"after"


# Table-driven failover scripts.  Steps: ("p"|"s", off, data) writes the primary's
# mirror / the secondary VM; ("sz", off, n) zeroes through the secondary; ("ckpt", N);
# ("journal",); ("apply",) carries out the next Apply/ApplyOverlay; ("failover",);
# ("read", off, want) reads the secondary export.  Every case then drains, checks
# the image (``want`` at offset 0), the number of overlay rounds and the epoch.
FAILOVER_CASES: list[tuple[str, list[tuple[object, ...]], bytes, int, int]] = [
    ("overlay survives failover",
     [("p", 0, b"aaaa"), ("ckpt", 1), ("journal",), ("apply",), ("s", 2, b"SS"),
      ("failover",), ("read", 0, b"aaSS")],
     b"aaSS", 1, 1),
    ("no secondary writes: no overlay round",
     [("p", 0, b"aaaa"), ("ckpt", 1), ("journal",), ("failover",)],
     b"aaaa", 0, 1),
    ("overlay written before the write-outs it covers are applied wins",
     [("p", 0, b"aaaaaaaa"), ("ckpt", 1), ("journal",), ("s", 2, b"SSSS"),
      ("p", 0, b"bbbbbbbb"), ("ckpt", 2), ("s", 6, b"T"), ("failover",),
      ("read", 0, b"bbbbbbTb"), ("journal",), ("apply",), ("read", 0, b"bbbbbbTb"),
      ("apply",), ("read", 0, b"bbbbbbTb")],
     b"bbbbbbTb", 1, 2),
    ("writes during failing over, before and during the overlay round",
     [("p", 0, b"aaaa"), ("ckpt", 1), ("s", 0, b"S"), ("failover",), ("s", 1, b"T"),
      ("journal",), ("apply",), ("s", 2, b"U"), ("read", 0, b"STUa"), ("apply",),
      ("read", 0, b"STUa"), ("s", 3, b"V"), ("apply",)],
     b"STUV", 3, 1),  # rounds: S+T, then U, then V
    ("secondary zeroes over committed data, also while failing over",
     [("p", 0, b"aaaaaaaa"), ("ckpt", 1), ("journal",), ("sz", 0, 2), ("failover",),
      ("sz", 6, 2), ("read", 0, b"\0\0aaaa\0\0")],
     b"\0\0aaaa\0\0", 1, 1),
    ("a later overlay write over a sealed overlay's range wins",
     [("s", 0, b"old!"), ("failover",), ("s", 0, b"new"), ("read", 0, b"new!"),
      ("apply",), ("read", 0, b"new!")],
     b"new!", 2, 0),
]


@pytest.mark.parametrize(("steps", "want", "rounds", "epoch"),
                         [c[1:] for c in FAILOVER_CASES], ids=[c[0] for c in FAILOVER_CASES])
def test_failover_keeps_the_secondary_overlay(steps: list[tuple[object, ...]], want: bytes,
                                               rounds: int, epoch: int) -> None:
    d = MemDriver(bytes(SIZE))
    for step in steps:
        op = step[0]
        if op in ("p", "s"):
            off, data = step[1], step[2]
            assert isinstance(off, int) and isinstance(data, bytes)
            exp = Export.REPLICATION if op == "p" else Export.SECONDARY
            assert d.write(exp, off, data)
        elif op == "sz":
            off, n = step[1], step[2]
            assert isinstance(off, int) and isinstance(n, int)
            assert d.write(Export.SECONDARY, off, bytes(n), zero=True)
        elif op == "ckpt":
            assert isinstance(step[1], int)
            d.handle(d.r.checkpoint(step[1]))
        elif op == "journal":
            d.journal_next()
        elif op == "apply":
            d.apply_next()
        elif op == "failover":
            d.handle(d.r.failover())
        else:
            assert op == "read"
            off, data = step[1], step[2]
            assert isinstance(off, int) and isinstance(data, bytes)
            assert d.read(Export.SECONDARY, off, len(data)) == data
    while d.sealed or d.applies:
        if d.sealed:
            d.journal_next()
        if d.applies:
            d.apply_next()
    assert d.r.phase is Phase.FAILED_OVER
    assert [e for e in d.events if isinstance(e, FailoverComplete)] == [FailoverComplete(epoch)]
    assert d.overlay_rounds == rounds
    assert bytes(d.base[:len(want)]) == want
    assert d.read(Export.SECONDARY, 0, len(want)) == want  # read back after FAILED_OVER
    assert d.r.status().overlay_bytes == 0 and d.r.overlay_id is None


def test_overlay_applied_out_of_turn_raises() -> None:
    r = Replica(100)
    r.write(Export.SECONDARY, 0, 4)
    acts = r.failover()
    over = [a for a in acts if isinstance(a, ApplyOverlay)]
    assert len(over) == 1
    with pytest.raises(DiskStateError):
        r.overlay_applied(over[0].buffer + 100)
    assert r.overlay_applied(over[0].buffer)[-1] == FailoverComplete(0)
    with pytest.raises(DiskStateError):
        r.overlay_applied(over[0].buffer)


def test_misuse_raises() -> None:
    r = Replica(100, applied_epoch=3)
    with pytest.raises(DiskStateError):
        r.checkpoint(3)
    with pytest.raises(DiskStateError):
        r.read(Export.REPLICATION, 90, 11)
    with pytest.raises(DiskStateError):
        r.applied(4)
    with pytest.raises(DiskStateError):
        r.checkpoint(2**64)
    r.checkpoint(4)
    with pytest.raises(DiskStateError):
        r.checkpoint(4)


def test_seal_failure_faults_replication() -> None:
    d = MemDriver(bytes(SIZE))
    d.write(Export.REPLICATION, 0, b"q")
    d.handle(d.r.checkpoint(1))
    d.handle(d.r.seal_failed(1))
    assert d.r.phase is Phase.FAULTED
    assert not d.write(Export.REPLICATION, 0, b"q")
    d.handle(d.r.failover())
    assert FailoverComplete(0) in d.events
