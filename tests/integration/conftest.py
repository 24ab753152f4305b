"""Fixtures shared by the integration tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh directory under /tmp: unix socket paths must stay under 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="cp-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
