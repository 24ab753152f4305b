"""QEMU chardev record codec (filter-mirror / filter-redirector / colo-compare framing).

Theory of operation
-------------------
A record on ``primary_in``, ``secondary_in`` and ``outdev`` is::

    [u32 BE len] [u32 BE vnet_hdr_len, only with vnet_hdr_support] [len bytes]

and with vnet headers the ``len`` bytes start with the virtio-net header, the
Ethernet header beginning ``vnet_hdr_len`` bytes in.  QEMU writes the length
and the frame in separate writes, so a reader sees records split anywhere.

:class:`FrameDecoder` is sans-IO: a driver hands it whatever bytes a socket
produced and gets back every complete record as ``(data, offset)``, where
``data`` is the whole record body (vnet header included, carried through
untouched) and ``offset`` the vnet header length (0 without vnet support).
It parses straight out of the incoming chunk through ``struct.unpack_from``
and only copies a tail that ends mid-record, so a chunk holding hundreds of
records costs one loop over them and no per-record buffer shuffling; the
record a read cut off is completed from just the bytes it lacks, not by
joining the whole next chunk to it.

Errors are decoder state, not exceptions: a zero length, a length over
QEMU's 69632-byte limit (``NET_BUFSIZE``) or a vnet header length larger
than its record makes the decoder stop at that record, keep every record
decoded before it, and report :class:`FramingError`.  There is no way to
resynchronise a length-prefixed stream, so the driver resets the connection
(QEMU itself gives up on such a stream for good) and calls :meth:`reset`.

:func:`encode_frames` builds one ``bytes`` for a batch of released frames,
so the driver issues one write per batch instead of two or three per frame
as QEMU does.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

NET_BUFSIZE: Final = 4096 + 65536
"""Largest record body QEMU's reader (``net_fill_rstate``) accepts."""

_U32: Final = struct.Struct(">I")
_U32X2: Final = struct.Struct(">II")

Frame = tuple[bytes, int]
"""A record body and the number of vnet header bytes at its start."""


class FramingErrorKind(enum.Enum):
    """Why a record stream cannot be decoded any further."""

    ZERO_LENGTH = "zero-length record"
    OVERSIZED = "record length over QEMU's 69632-byte limit"
    VNET_HDR_TOO_LONG = "vnet header length does not fit in its record"


@dataclass(frozen=True, slots=True)
class FramingError:
    """A broken stream: what was wrong and where (bytes since the last reset)."""

    kind: FramingErrorKind
    stream_offset: int
    length: int
    vnet_hdr_len: int = 0

    def describe(self) -> str:
        """One log line's worth of explanation."""
        text = f"{self.kind.value} at stream byte {self.stream_offset}: len={self.length}"
        if self.kind is FramingErrorKind.VNET_HDR_TOO_LONG:
            text += f" vnet_hdr_len={self.vnet_hdr_len}"
        return text


class FrameDecoder:
    """Incremental decoder: feed bytes split anywhere, get whole records back."""

    __slots__ = ("_buf", "_consumed", "_error", "_header", "_max_len", "_need", "vnet_hdr")

    def __init__(self, vnet_hdr: bool, max_len: int = NET_BUFSIZE) -> None:
        self.vnet_hdr = vnet_hdr
        self._header = 8 if vnet_hdr else 4
        self._max_len = max_len
        self._buf = bytearray()
        self._need = 0
        self._consumed = 0
        self._error: FramingError | None = None

    @property
    def error(self) -> FramingError | None:
        """The error that stopped decoding, or None while the stream is good."""
        return self._error

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete record waiting for the rest (lost on reset)."""
        return len(self._buf)

    def reset(self) -> None:
        """Start afresh, as on a new connection: drop any partial record and the error."""
        self._buf = bytearray()
        self._need = 0
        self._consumed = 0
        self._error = None

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[Frame]:
        """Decode every complete record in the buffered bytes plus ``chunk``.

        After an error, further input is ignored (and an empty list returned)
        until :meth:`reset`.
        """
        if self._error is not None:
            return []
        data = chunk if isinstance(chunk, bytes) else bytes(chunk)
        out: list[Frame] = []
        start = 0
        buf = self._buf
        while buf:
            # Finish the record cut by the previous read from just the bytes it lacks,
            # instead of copying the whole chunk behind it (twice) as a join would.
            take = self._need - len(buf)
            if take > len(data) - start:
                buf += memoryview(data)[start:]
                return out
            buf += memoryview(data)[start : start + take]
            start += take
            used = self._decode(bytes(buf), 0, out)
            if self.error is not None:  # keep what follows, as pending_bytes says
                # (self.error, not self._error: mypy narrowed _error to None above, and
                # mypyc would compile that read as a None, failing on a FramingError)
                buf += memoryview(data)[start:]
                return out
            if used:  # the whole record; otherwise only its header, and _need grew
                self._consumed += used
                buf.clear()
        pos = self._decode(data, start, out)
        self._consumed += pos - start
        if pos < len(data):
            self._buf = bytearray(memoryview(data)[pos:])
        return out

    def _decode(self, data: bytes, pos: int, out: list[Frame]) -> int:
        """Append records from ``data[pos:]`` to ``out``; return where decoding stopped."""
        n = len(data)
        start = pos
        header = self._header
        max_len = self._max_len
        append = out.append
        if self.vnet_hdr:
            unpack2 = _U32X2.unpack_from
            while n - pos >= 8:
                length, vlen = unpack2(data, pos)
                if length == 0 or length > max_len or vlen > length:
                    self._fail(pos - start, length, vlen)
                    return pos
                end = pos + 8 + length
                if end > n:
                    self._need = end - pos
                    return pos
                append((data[pos + 8 : end], vlen))
                pos = end
        else:
            unpack1 = _U32.unpack_from
            while n - pos >= header:
                (length,) = unpack1(data, pos)
                if length == 0 or length > max_len:
                    self._fail(pos - start, length, 0)
                    return pos
                end = pos + 4 + length
                if end > n:
                    self._need = end - pos
                    return pos
                append((data[pos + 4 : end], 0))
                pos = end
        self._need = header
        return pos

    def _fail(self, pos: int, length: int, vlen: int) -> None:
        if length == 0:
            kind = FramingErrorKind.ZERO_LENGTH
        elif length > self._max_len:
            kind = FramingErrorKind.OVERSIZED
        else:
            kind = FramingErrorKind.VNET_HDR_TOO_LONG
        self._error = FramingError(kind, self._consumed + pos, length, vlen)


def encode_frames(frames: Iterable[Frame], vnet_hdr: bool) -> bytes:
    """Frame a batch of ``(data, offset)`` records into one buffer.

    With ``vnet_hdr`` the offset is written as the vnet header length word;
    without it the offset must be 0 (there is nowhere to say otherwise).
    """
    parts: list[bytes] = []
    append = parts.append
    if vnet_hdr:
        pack2 = _U32X2.pack
        for data, offset in frames:
            append(pack2(len(data), offset))
            append(data)
    else:
        pack1 = _U32.pack
        for data, offset in frames:
            if offset:
                raise ValueError("a frame with a vnet header needs vnet_hdr=True")
            append(pack1(len(data)))
            append(data)
    return b"".join(parts)


def encode_frame(data: bytes, offset: int, vnet_hdr: bool) -> bytes:
    """Frame one record (convenience for tests and rare writers)."""
    return encode_frames(((data, offset),), vnet_hdr)
