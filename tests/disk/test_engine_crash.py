"""Hundreds of in-process crashes of the engine at random I/O steps, then recovery.

A crash is an exception raised from inside a file operation (after a partial
write, for pwrite), after which the engine is abandoned as a kill -9 would leave
it.  Recovery must leave the image at exactly the last acknowledged epoch (or the
epoch whose checkpoint was in flight, if its journal was complete).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from colo_proxy.disk import store
from colo_proxy.disk.buffers import Action, Apply, ApplyOverlay, Export, Phase
from colo_proxy.disk.engine import DiskEngine

SIZE = 64 << 10


class Crash(Exception):
    pass


class CrashingOs:
    """Stands in for ``os`` inside the store; dies at the n-th mutating call."""

    def __init__(self, budget: int, rng: random.Random) -> None:
        self.budget = budget
        self.rng = rng

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _tick(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise Crash

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        if self.budget == 0 and len(data) > 1:
            os.pwrite(fd, bytes(data)[: self.rng.randrange(1, len(data))], offset)
        self._tick()
        return os.pwrite(fd, data, offset)

    def write(self, fd: int, data: Any) -> int:
        if self.budget == 0 and len(data) > 1:
            os.write(fd, bytes(data)[: self.rng.randrange(1, len(data))])
        self._tick()
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        self._tick()
        os.fsync(fd)

    def replace(self, a: Any, b: Any) -> None:
        self._tick()
        os.replace(a, b)


def _trial(tmp: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> bool:
    rng = random.Random(seed)
    image = tmp / f"img{seed}"
    state = tmp / f"state{seed}"
    initial = rng.randbytes(SIZE)
    image.write_bytes(initial)
    eng = DiskEngine(image, state, memory_cap=rng.choice([0, 4096, 1 << 20]))
    primary = bytearray(initial)
    snapshots = {0: bytes(initial)}
    acked = 0
    in_flight: int | None = None
    pending: list[Apply] = []
    failed_over = False
    fake = CrashingOs(rng.randrange(0, 60), rng)
    monkeypatch.setattr(store, "os", fake)
    try:
        for step in range(rng.randrange(5, 40)):
            r = rng.random()
            if r < 0.6:
                off = rng.randrange(0, SIZE - 1)
                n = min(rng.randrange(1, 9000), SIZE - off)
                if rng.random() < 0.1:
                    eng.write_zeroes(Export.REPLICATION, off, n)
                    primary[off:off + n] = bytes(n)
                else:
                    data = bytes([step % 256]) * n
                    eng.write(Export.REPLICATION, off, data)
                    primary[off:off + n] = data
            elif r < 0.8:
                epoch = acked + rng.randrange(1, 3)
                snapshots[epoch] = bytes(primary)
                in_flight = epoch
                acts = eng.checkpoint(epoch)
                acked, in_flight = epoch, None
                pending.extend(a for a in acts if isinstance(a, Apply))
            elif r < 0.83:
                done = eng.drain([*pending, *eng.failover()])
                assert done == acked, f"seed {seed}: failover reported {done}, acked {acked}"
                assert image.read_bytes() == snapshots[acked], f"seed {seed}: failover image"
                failed_over = True
                break
            elif pending:
                a = pending.pop(0)
                eng.run_apply(a)
                pending.extend(x for x in eng.finish_apply(a.epoch) if isinstance(x, Apply))
    except Crash:
        pass
    finally:
        monkeypatch.setattr(store, "os", os)
        eng.close()
    eng = DiskEngine(image, state)
    try:
        got = eng.replica.applied_epoch
        allowed = {acked} if in_flight is None else {acked, in_flight}
        assert got in allowed, f"seed {seed}: recovered epoch {got}, allowed {allowed}"
        assert image.read_bytes() == snapshots[got], f"seed {seed}: image is not epoch {got}"
        assert eng.read(Export.REPLICATION, 0, SIZE) == snapshots[got]
        assert not any(state.glob("journal-*"))
    finally:
        eng.close()
    return failed_over


def test_random_crashes_recover_to_a_committed_epoch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failovers = sum(_trial(tmp_path, seed, monkeypatch) for seed in range(300))
    assert failovers > 20  # the failover path really ran, not only crashes


def test_failover_drains_and_reports_epoch(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(bytes(SIZE))
    eng = DiskEngine(image, tmp_path / "st", memory_cap=0)
    eng.write(Export.REPLICATION, 0, b"one")
    acts = eng.checkpoint(1)
    eng.write(Export.REPLICATION, 0, b"two")
    acts += eng.checkpoint(2)
    eng.write(Export.REPLICATION, 0, b"spec")
    eng.write(Export.SECONDARY, 100, b"mine")
    assert eng.read(Export.SECONDARY, 0, 3) == b"two"
    assert eng.read(Export.SECONDARY, 100, 4) == b"mine"
    done = eng.drain(acts + eng.failover())
    assert done == 2  # the last committed epoch, though the image also holds "mine"
    assert image.read_bytes()[:4] == b"two\0"
    # This once asserted zeros here, which encoded the bug: the secondary VM runs on
    # from its own state at failover, so its writes since the checkpoint must stay.
    assert image.read_bytes()[100:104] == b"mine"
    assert eng.write(Export.REPLICATION, 0, b"x") is not None
    eng.close()


def test_failover_overlay_rounds_with_spilled_logs(tmp_path: Path) -> None:
    """Writes while failing over (spilled to files) land in the image, newest wins."""
    image = tmp_path / "img"
    image.write_bytes(bytes(SIZE))
    eng = DiskEngine(image, tmp_path / "st", memory_cap=0)
    eng.write(Export.REPLICATION, 0, b"A" * 8192)
    acts = eng.checkpoint(1)
    eng.write(Export.SECONDARY, 4096, b"s" * 8192)
    acts += eng.failover()
    assert eng.write(Export.SECONDARY, 0, b"t" * 100) is None  # while failing over
    assert eng.write_zeroes(Export.SECONDARY, 8000, 10) is None
    want = bytearray(b"A" * 8192 + bytes(SIZE - 8192))
    want[4096:4096 + 8192] = b"s" * 8192
    want[0:100] = b"t" * 100
    want[8000:8010] = bytes(10)
    assert eng.read(Export.SECONDARY, 0, SIZE) == want

    def on_action(act: Action) -> None:
        # Between the rounds the secondary writes again; every read sees all of it.
        if isinstance(act, ApplyOverlay) and act.extents[0].offset != 60000:
            assert eng.write(Export.SECONDARY, 60000, b"late") is None
            want[60000:60004] = b"late"
        assert eng.read(Export.SECONDARY, 0, SIZE) == want

    assert eng.drain(acts, on_action) == 1
    assert eng.replica.phase is Phase.FAILED_OVER
    assert image.read_bytes() == want
    assert eng.read(Export.SECONDARY, 0, SIZE) == want
    assert not eng.logs  # every overlay log released
    eng.close()


def test_second_agent_on_same_state_dir_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(bytes(4096))
    eng = DiskEngine(image, tmp_path / "st")
    with pytest.raises(store.StoreError):
        DiskEngine(image, tmp_path / "st")
    eng.close()


def test_corrupt_journal_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(bytes(4096))
    st = tmp_path / "st"
    st.mkdir()
    (st / "journal-00000000000000000001").write_bytes(b"COLOJNL1" + bytes(30))
    with pytest.raises(store.ColoProxyError):
        DiskEngine(image, st)




def test_failed_spill_write_leaves_zeros_and_keeps_going(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"\x01" * 4096)
    eng = DiskEngine(image, tmp_path / "st", memory_cap=0)
    eng.write(Export.REPLICATION, 0, b"a" * 100)

    def full(*_: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.os, "pwrite", full)
    with pytest.raises(OSError):
        eng.write(Export.REPLICATION, 50, b"b" * 100)
    monkeypatch.undo()
    assert eng.read(Export.REPLICATION, 0, 200) == b"a" * 50 + bytes(100) + b"\x01" * 50
    eng.write(Export.REPLICATION, 150, b"c" * 10)
    assert eng.read(Export.REPLICATION, 140, 30) == bytes(10) + b"c" * 10 + b"\x01" * 10
    eng.drain(eng.checkpoint(1))
    assert image.read_bytes()[:200] == eng.read(Export.REPLICATION, 0, 200)
    eng.close()
