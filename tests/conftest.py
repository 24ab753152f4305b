"""Suite-wide guard (every test cleans up the processes it starts) and the shared fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import Runner, short_tmpdir


def live_children() -> set[int]:
    """Pids of this process's children that are still running (zombies excluded)."""
    me = os.getpid()
    out: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == me:
            out.add(int(entry.name))
    return out


@pytest.fixture(autouse=True)
def no_orphan_processes() -> Iterator[None]:
    """Fail a test that leaves a child process running (and kill that process)."""
    before = live_children()
    yield
    left = live_children() - before
    if not left:
        return
    names = {}
    for pid in left:
        with contextlib.suppress(OSError):
            names[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200]
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)
    pytest.fail(f"test left {len(left)} process(es) running: {names}")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A fresh directory under /tmp (unix socket paths must stay under 108 bytes), removed after."""
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["asyncio", "uvloop"])
def run_loop(request: pytest.FixtureRequest) -> Runner:
    """Run each test on both loops: uvloop's transports are not asyncio.Transport subclasses."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run  # type: ignore[no-any-return]
    return asyncio.run
