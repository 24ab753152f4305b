"""A short fuzz run of every target (deterministic), and the corpus replayed.

The long run is ``tools/fuzz.py``; a failing input it finds lands in
``tests/fuzz/corpus/<target>/`` and is replayed here from then on.  FUZZ_EXAMPLES
sets the inputs per target (default 150).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import pytest

from tests.tools_loader import load_tool

CORPUS = Path(__file__).resolve().parent / "corpus"
FUZZ = load_tool("fuzz")
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))


@pytest.fixture(scope="module")
def fuzz() -> ModuleType:
    return FUZZ


@pytest.mark.parametrize("target", sorted(FUZZ.TARGETS))
def test_short_fuzz_run(fuzz: ModuleType, target: str) -> None:
    res = fuzz.run_target(target, EXAMPLES, derandomize=True, save=False)
    assert res.findings == [] and res.executions >= EXAMPLES


CASES = sorted((p.parent.name, p) for p in CORPUS.glob("*/*.bin"))


@pytest.mark.parametrize("target,path", CASES, ids=[f"{t}/{p.name}" for t, p in CASES])
def test_corpus_input(fuzz: ModuleType, target: str, path: Path) -> None:
    fuzz.TARGETS[target](path.read_bytes())


def test_every_target_has_a_corpus() -> None:
    assert {t for t, _ in CASES} == set(FUZZ.TARGETS)
