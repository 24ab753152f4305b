"""Spill logs and journals against plain byte strings."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from colo_proxy.disk.extents import ZERO, Extent
from colo_proxy.disk.store import MemoryBudget, SpillLog, load_journal, write_journal
from colo_proxy.errors import InputError


@pytest.mark.parametrize("cap", [0, 1, 100, 1000, 10**9])
def test_spill_log_reads_any_range(tmp_path: Path, cap: int) -> None:
    rng = random.Random(cap)
    budget = MemoryBudget(cap)
    log = SpillLog(budget, tmp_path)
    model = bytearray()
    for _ in range(60):
        data = rng.randbytes(rng.randrange(0, 50))
        assert log.append(data if rng.random() < 0.5 else bytearray(data)) == len(model)
        model += data
    assert log.length == len(model)
    assert log.memory_bytes + log.spilled_bytes == len(model)
    assert budget.used == log.memory_bytes <= cap
    for _ in range(300):
        a = rng.randrange(0, len(model))
        b = rng.randrange(a, len(model) + 1)
        assert log.read(a, b - a) == bytes(model[a:b])
    log.close()
    assert budget.used == 0
    assert list(tmp_path.iterdir()) == []  # spill files never outlive the process


def test_journal_round_trip_and_damage(tmp_path: Path) -> None:
    src = bytes(range(200))
    extents = [Extent(0, 10, 5), Extent(50, 20, ZERO), Extent(100, 30, 40)]
    j = write_journal(tmp_path, 7, extents, lambda pos, n: src[pos:pos + n])
    again = load_journal(j.path)
    assert again.epoch == 7
    assert again.extents == [Extent(0, 10, 0), Extent(50, 20, ZERO), Extent(100, 30, 10)]
    assert again.read(0, 40) == src[5:15] + src[40:70]
    again.close()
    j.close()
    raw = j.path.read_bytes()
    j.path.write_bytes(raw[:-1])
    with pytest.raises(InputError):
        load_journal(j.path)
    j.path.write_bytes(b"NOTAJRNL" + raw[8:])
    with pytest.raises(InputError):
        load_journal(j.path)
