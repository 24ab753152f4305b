"""The sans-IO Replica driven by an in-memory driver and checked against a plain model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo_proxy.disk.buffers import (
    BASE,
    Action,
    Apply,
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
        self.applies: list[Apply] = []
        self.events: list[Action] = []

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
            elif isinstance(a, Apply):
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

    def apply_next(self) -> None:
        a = self.applies.pop(0)
        src = self.logs[a.buffer]
        for e in a.extents:
            if e.pos == ZERO:
                self.base[e.offset:e.end] = bytes(e.length)
            else:
                self.base[e.offset:e.end] = src[e.pos:e.pos + e.length]
        self.handle(self.r.applied(a.epoch))


ops = st.lists(st.one_of(
    st.tuples(st.sampled_from(["w", "z", "s"]), st.integers(0, SIZE - 1), st.integers(1, 80)),
    st.tuples(st.sampled_from(["ckpt", "journal", "apply", "failover"]), st.just(0), st.just(0)),
), max_size=60)


@settings(max_examples=400, deadline=None)
@given(ops)
def test_replica_matches_model(script: list[tuple[str, int, int]]) -> None:
    d = MemDriver(bytes(range(256)) * 2)
    primary = bytearray(d.base)  # what the primary's disk holds now
    snapshots = {0: bytes(d.base)}
    secondary = bytearray(d.base)  # what the secondary VM sees
    epoch = 0
    taken_over: bytearray | None = None
    for i, (op, off, n) in enumerate(script):
        n = min(n, SIZE - off)
        data = bytes([(i * 7 + k) % 251 for k in range(n)])
        if op in ("w", "z"):
            ok = d.write(Export.REPLICATION, off, data, zero=op == "z")
            assert ok == (d.r.phase is Phase.REPLICATING)
            if ok:
                primary[off:off + n] = bytes(n) if op == "z" else data
        elif op == "s":
            ok = d.write(Export.SECONDARY, off, data)
            assert ok == (d.r.phase is not Phase.FAILING_OVER)
            if ok and d.r.phase is Phase.FAILED_OVER:
                taken_over[off:off + n] = data
            elif ok:
                secondary[off:off + n] = data
        elif op == "ckpt" and d.r.phase is Phase.REPLICATING:
            epoch += 1
            d.handle(d.r.checkpoint(epoch))
            snapshots[epoch] = bytes(primary)
            secondary = bytearray(primary)
        elif op == "journal" and d.sealed:
            d.journal_next()
        elif op == "apply" and d.applies:
            d.apply_next()
            assert bytes(d.base) == snapshots[d.r.applied_epoch]
        elif op == "failover":
            d.handle(d.r.failover())
        if d.r.phase is Phase.FAILED_OVER and taken_over is None:
            taken_over = bytearray(snapshots[d.r.sealed_epoch])
        if d.r.phase is Phase.REPLICATING:
            assert d.read(Export.REPLICATION, 0, SIZE) == bytes(primary)
            assert d.read(Export.SECONDARY, 0, SIZE) == bytes(secondary)
        else:
            # Failing over / failed over: the last sealed epoch, plus the new primary's writes.
            want = snapshots[d.r.sealed_epoch] if taken_over is None else bytes(taken_over)
            assert d.read(Export.REPLICATION, 0, SIZE) == want
            if d.r.phase is Phase.FAILED_OVER:
                assert d.read(Export.SECONDARY, 0, SIZE) == want
    # Finish everything: the base image must be exactly the last sealed epoch.
    while d.sealed or d.applies:
        if d.sealed:
            d.journal_next()
        if d.applies:
            d.apply_next()
    d.handle(d.r.failover())
    done = [e for e in d.events if isinstance(e, FailoverComplete)]
    assert done and done[-1].epoch == epoch
    want = snapshots[epoch] if taken_over is None else bytes(taken_over)
    assert bytes(d.base) == want
    assert d.r.phase is Phase.FAILED_OVER
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


def test_failover_waits_for_writeouts_and_drops_speculation() -> None:
    d = MemDriver(bytes(SIZE))
    d.write(Export.REPLICATION, 0, b"x" * 4)
    d.handle(d.r.checkpoint(7))
    d.write(Export.REPLICATION, 0, b"y" * 4)  # speculation, never committed
    d.write(Export.SECONDARY, 8, b"s" * 4)
    d.handle(d.r.failover())
    assert d.r.phase is Phase.FAILING_OVER
    assert not any(isinstance(e, FailoverComplete) for e in d.events)
    d.journal_next()
    d.apply_next()
    assert FailoverComplete(7) in d.events
    assert bytes(d.base[:12]) == b"xxxx" + bytes(8)
    assert d.write(Export.SECONDARY, 0, b"after")  # passthrough now
    assert bytes(d.base[:5]) == b"after"


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
