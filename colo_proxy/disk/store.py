"""File side of the replica: buffer logs (memory, spilling to files), journals, the image.

Crash safety rests on three files in the state directory:

* ``journal-<epoch>``: a write-out buffer in compact layout, written to a ``.tmp``
  name, fsynced and renamed, so it either exists whole or not at all.  It exists
  before the epoch is acknowledged.
* ``state.json``: the last epoch whose journal is fully written and fsynced into
  the image (same tmp + fsync + rename dance).
* the image itself, which is only ever written by applying a journal.

Replaying a journal is idempotent, so ``recover`` applies every journal newer than
``state.json`` in order: the image ends at exactly the last acknowledged epoch.
Speculation logs are not kept across a crash; their spill files are unlinked at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import tempfile
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final

from colo_proxy.disk.buffers import BASE, Piece
from colo_proxy.disk.extents import ZERO, Extent, data_bytes
from colo_proxy.errors import ColoProxyError, InputError

CHUNK = 4 << 20
_MAGIC = b"COLOJNL1"
_HEADER = struct.Struct(">8sQQQ")  # magic, epoch, extent count, data bytes
_ENTRY = struct.Struct(">QQQ")  # disk offset, length, flags (1 = zeros)
_JOURNAL_RE = re.compile(r"^journal-(\d{20})$")
_ZEROS = bytes(CHUNK)


class StoreError(ColoProxyError):
    """The state directory or image cannot be used (locked, corrupt, I/O error)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) < length:  # past EOF of a sparse/short file reads as zeros
        data += bytes(length - len(data))
    return data


class MemoryBudget:
    """How many bytes of buffer logs may live in memory before new data spills."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0


class SpillLog:
    """An append-only log: in memory while the budget allows, then in an unlinked file.

    The memory part keeps each written ``bytes`` object as it came (no copy); a
    sorted list of chunk start positions finds them again.
    """

    def __init__(self, budget: MemoryBudget, spill_dir: Path) -> None:
        self._budget = budget
        self._dir = spill_dir
        self._chunks: list[bytes] = []
        self._starts: list[int] = []
        self._mem_len = 0
        self._fd: int | None = None
        self._file_len = 0

    @property
    def length(self) -> int:
        return self._mem_len + self._file_len

    @property
    def memory_bytes(self) -> int:
        return self._mem_len

    @property
    def spilled_bytes(self) -> int:
        return self._file_len

    def append(self, data: bytes | bytearray | memoryview) -> int:
        pos = self.length
        n = len(data)
        if n == 0:
            return pos
        if self._fd is None and self._budget.used + n <= self._budget.cap:
            self._chunks.append(data if isinstance(data, bytes) else bytes(data))
            self._starts.append(pos)
            self._mem_len += n
            self._budget.used += n
            return pos
        if self._fd is None:
            fd, name = tempfile.mkstemp(prefix="spill-", dir=self._dir)
            os.unlink(name)
            self._fd = fd
        view = memoryview(data)
        done = 0
        while done < n:  # on failure the length stays put: the append did not happen
            done += os.pwrite(self._fd, view[done:], self._file_len + done)
        self._file_len += n
        return pos

    def _read_mem(self, pos: int, length: int) -> bytes:
        i = bisect_right(self._starts, pos) - 1
        chunk = self._chunks[i]
        skip = pos - self._starts[i]
        if skip == 0 and length == len(chunk):
            return chunk
        if skip + length <= len(chunk):
            return chunk[skip:skip + length]
        parts = [chunk[skip:]]
        got = len(parts[0])
        while got < length:
            i += 1
            part = self._chunks[i][:length - got]
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def read(self, pos: int, length: int) -> bytes:
        mem = self._mem_len
        if pos + length <= mem:
            return self._read_mem(pos, length) if length else b""
        head = b""
        if pos < mem:
            head = self._read_mem(pos, mem - pos)
            length -= mem - pos
            pos = mem
        assert self._fd is not None
        return head + _pread_full(self._fd, length, pos - mem)

    def close(self) -> None:
        self._budget.used -= self._mem_len
        self._chunks, self._starts, self._mem_len = [], [], 0
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class JournalLog:
    """Read access to a journal's data section, which is a log in compact layout."""

    def __init__(self, path: Path, epoch: int, extents: list[Extent], data_start: int) -> None:
        self.path = path
        self.epoch = epoch
        self.extents = extents
        self._data_start = data_start
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, pos: int, length: int) -> bytes:
        return _pread_full(self._fd, length, self._data_start + pos)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


Log = SpillLog | JournalLog


def journal_path(state_dir: Path, epoch: int) -> Path:
    return state_dir / f"journal-{epoch:020d}"


def write_journal(state_dir: Path, epoch: int, extents: Sequence[Extent],
                  source: Callable[[int, int], bytes]) -> JournalLog:
    """Write ``extents`` (read from ``source(pos, n)``) as epoch's journal, durably."""
    layout = list(extents)
    total = data_bytes(layout)
    final = journal_path(state_dir, epoch)
    tmp = final.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        index = bytearray(_HEADER.pack(_MAGIC, epoch, len(layout), total))
        for ext in layout:
            index += _ENTRY.pack(ext.offset, ext.length, 1 if ext.pos == ZERO else 0)
        _write_all(fd, index)
        compact_layout: list[Extent] = []
        cursor = 0
        parts: list[bytes] = []
        pending = 0
        for ext in layout:
            if ext.pos == ZERO:
                compact_layout.append(Extent(ext.offset, ext.length, ZERO))
                continue
            compact_layout.append(Extent(ext.offset, ext.length, cursor))
            cursor += ext.length
            done = 0
            while done < ext.length:
                n = min(CHUNK, ext.length - done)
                parts.append(source(ext.pos + done, n))
                pending += n
                done += n
                if pending >= CHUNK:
                    _write_all(fd, b"".join(parts))
                    parts, pending = [], 0
        if parts:
            _write_all(fd, b"".join(parts))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    _fsync_dir(state_dir)
    return JournalLog(final, epoch, compact_layout, len(index))


def load_journal(path: Path) -> JournalLog:
    """Open a complete journal file; refuse anything that does not add up."""
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) != _HEADER.size:
            raise InputError(f"{path}: truncated journal header")
        magic, epoch, count, total = _HEADER.unpack(head)
        if magic != _MAGIC:
            raise InputError(f"{path}: not a colo-proxy journal")
        raw = f.read(count * _ENTRY.size)
        if len(raw) != count * _ENTRY.size:
            raise InputError(f"{path}: truncated journal index")
        size = os.fstat(f.fileno()).st_size
    extents: list[Extent] = []
    cursor = 0
    for off, length, flags in _ENTRY.iter_unpack(raw):
        if flags & 1:
            extents.append(Extent(off, length, ZERO))
        else:
            extents.append(Extent(off, length, cursor))
            cursor += length
    data_start = _HEADER.size + len(raw)
    if cursor != total or size != data_start + total:
        raise InputError(f"{path}: journal size does not match its index")
    return JournalLog(path, epoch, extents, data_start)


_FORMAT_MAGIC: Final = ((b"QFI\xfb", "qcow2"), (b"QED\x00", "qed"), (b"KDMV", "vmdk"),
                        (b"vhdxfile", "vhdx"), (b"conectix", "vpc"))


def image_format(head: bytes) -> str | None:
    """The name of a non-raw format whose magic `head` starts with (as QEMU probes)."""
    for magic, name in _FORMAT_MAGIC:
        if head.startswith(magic):
            return name
    return None


class Image:
    """The secondary's raw disk image (a file or block device)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR)
        except OSError as err:
            raise StoreError(f"cannot open image {path}: {err}") from err
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        fmt = image_format(os.pread(self.fd, 8, 0))
        if fmt is not None:
            os.close(self.fd)
            raise StoreError(f"image {path} is {fmt}, not raw: the agent serves raw images "
                             f"(qemu-img convert -O raw {path} IMAGE.raw)")

    def read(self, offset: int, length: int) -> bytes:
        return _pread_full(self.fd, length, offset)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def zero(self, offset: int, length: int) -> None:
        while length > 0:
            n = min(length, CHUNK)
            self.write(offset, _ZEROS[:n])
            offset += n
            length -= n

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def apply_extents(image: Image, extents: Iterable[Extent], source: Callable[[int, int], bytes],
                  progress: Callable[[int], None] | None = None) -> None:
    """Copy ``extents`` (log positions read with ``source(pos, n)``) into the image, fsync."""
    for ext in extents:
        if ext.pos == ZERO:
            image.zero(ext.offset, ext.length)
        else:
            done = 0
            while done < ext.length:
                n = min(CHUNK, ext.length - done)
                image.write(ext.offset + done, source(ext.pos + done, n))
                done += n
        if progress is not None:
            progress(ext.length)
    image.sync()


def apply_journal(image: Image, journal: JournalLog,
                  progress: Callable[[int], None] | None = None) -> None:
    """Copy a journal into the image and fsync; safe to repeat after a crash."""
    apply_extents(image, journal.extents, journal.read, progress)


class StateDir:
    """The agent's state directory: a lock, ``state.json`` and journals."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.replayed = 0
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise StoreError(f"cannot use state directory {path}: "
                             f"{err.strerror or err}") from err
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(self._lock_fd)
            raise StoreError(f"state directory {path} is in use by another agent") from err

    def applied_epoch(self) -> int:
        try:
            raw = json.loads((self.path / "state.json").read_text())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as err:
            raise StoreError(f"unreadable state file in {self.path}: {err}") from err
        epoch = raw.get("applied_epoch") if isinstance(raw, dict) else None
        if not isinstance(epoch, int) or epoch < 0:
            raise StoreError(f"bad applied_epoch in {self.path}/state.json")
        return epoch

    def set_applied_epoch(self, epoch: int) -> None:
        tmp = self.path / "state.json.tmp"
        with open(tmp, "w") as f:
            json.dump({"applied_epoch": epoch}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "state.json")
        _fsync_dir(self.path)

    def journals(self) -> list[tuple[int, Path]]:
        found: list[tuple[int, Path]] = []
        for entry in self.path.iterdir():
            m = _JOURNAL_RE.match(entry.name)
            if m:
                found.append((int(m.group(1)), entry))
        return sorted(found)

    def recover(self, image: Image) -> int:
        """Finish every acknowledged epoch; return the epoch the image now holds."""
        for stale in self.path.glob("*.tmp"):
            stale.unlink()
        applied = self.applied_epoch()
        for epoch, path in self.journals():
            if epoch <= applied:
                path.unlink()
                continue
            journal = load_journal(path)
            apply_journal(image, journal)
            self.set_applied_epoch(epoch)
            journal.remove()
            applied = epoch
            self.replayed += 1
        return applied

    def close(self) -> None:
        os.close(self._lock_fd)


def read_pieces(pieces: Iterable[Piece], image: Image, logs: dict[int, Log]) -> bytes:
    """Assemble a read from the pieces the state machine resolved."""
    parts: list[bytes] = []
    for p in pieces:
        if p.buffer == BASE:
            parts.append(image.read(p.offset, p.length))
        elif p.buffer == ZERO:
            parts.append(bytes(p.length))
        else:
            parts.append(logs[p.buffer].read(p.pos, p.length))
    return parts[0] if len(parts) == 1 else b"".join(parts)
