"""Fixtures shared by the driver tests."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A fresh directory under /tmp: unix socket paths must stay under 108 bytes."""
    d = tempfile.mkdtemp(dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["asyncio", "uvloop"])
def run_loop(request: pytest.FixtureRequest) -> Runner:
    """Run each test on both loops: uvloop's transports are not asyncio.Transport subclasses."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run  # type: ignore[no-any-return]
    return asyncio.run
