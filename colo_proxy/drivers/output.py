"""Output files that never clobber inputs and never leave a half-written result.

A report or capture written by a failed run must not replace a good one from
an earlier run, and `--released primary.pcap` must not truncate the capture
being read.  Everything is written to a temporary name beside the target
and renamed over it only when the run succeeded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from colo_proxy.errors import InputError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_inputs(target: str | Path, inputs: Iterable[str | Path]) -> None:
    """InputError if writing `target` would overwrite one of `inputs`."""
    out = Path(target)
    for item in inputs:
        path = Path(item)
        if _same_file(out, path) or out.resolve() == path.resolve():
            raise InputError(f"{target}: is an input of this run; refusing to overwrite it")


@contextlib.contextmanager
def atomic_output(target: str | Path, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces `target`, on failure it is removed."""
    out = Path(target)
    refuse_inputs(out, inputs)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
    except OSError as err:
        raise InputError(f"{target}: cannot write: {err.strerror or err}") from err
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary directory; on success its files move into `target`.

    Files already in `target` that the run did not write are left alone; on
    failure `target` is untouched.  A written file whose name is an input's
    is refused before anything moves.
    """
    out = Path(target)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as err:
        raise InputError(f"{target}: cannot create: {err.strerror or err}") from err
    try:
        yield tmp
        written = sorted(tmp.iterdir())
        for item in written:
            refuse_inputs(out / item.name, inputs)
        try:
            out.mkdir(exist_ok=True)
            for item in written:
                os.replace(item, out / item.name)
        except OSError as err:
            raise InputError(f"{target}: cannot write: {err.strerror or err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
