"""Sans-IO side of colo-compare's ``notify_dev`` text protocol (Xen COLO).

Theory of operation
-------------------
Xen COLO talks to the comparator over one more chardev, with short ASCII
messages in the chardev framing (reference section 1, harness README):

=================  ====================================  ======================================
direction          message                               meaning
=================  ====================================  ======================================
peer -> proxy      ``COLO_USERSPACE_PROXY_INIT``          optional handshake
proxy -> peer      ``COLO_COMPARE_GET_XEN_INIT``          answer to the handshake
peer -> proxy      ``COLO_CHECKPOINT``                    a checkpoint is done: flush
proxy -> peer      ``DO_CHECKPOINT``                      please checkpoint (divergence, timeout)
=================  ====================================  ======================================

The framing is asymmetric in QEMU: what colo-compare sends is ``[u32 len]
text`` and never carries the vnet word; what it reads is parsed with
``vnet_hdr_support``, so a peer that disagrees about the vnet word is
misread and its flushes are lost.  colo-proxy accepts both forms whatever
``--vnet-hdr`` says: text never starts with a NUL byte while a vnet length
word (a small number) always does, so one look at the byte after the length
tells which form arrived.  That is a deliberate, documented difference.

There is no way to resynchronise after garbage (a zero or huge length, a
NUL inside the text): :attr:`NotifyDecoder.error` is set and the driver
resets the connection.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

MAX_MESSAGE: Final = 256
"""Longest notify message accepted; the real ones are under 30 bytes."""

INIT: Final = "COLO_USERSPACE_PROXY_INIT"
INIT_REPLY: Final = "COLO_COMPARE_GET_XEN_INIT"
CHECKPOINT_DONE: Final = "COLO_CHECKPOINT"
DO_CHECKPOINT: Final = "DO_CHECKPOINT"

_U32: Final = struct.Struct(">I")


class NotifyKind(enum.Enum):
    """What a message from the Xen side means to the proxy."""

    INIT = "init"
    CHECKPOINT_DONE = "checkpoint_done"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class NotifyMessage:
    """One decoded message; ``text`` kept for logging unknown ones."""

    kind: NotifyKind
    text: str


_KINDS: Final = {INIT: NotifyKind.INIT, CHECKPOINT_DONE: NotifyKind.CHECKPOINT_DONE}


class NotifyDecoder:
    """Incremental decoder for messages arriving on ``notify_dev``."""

    __slots__ = ("_buf", "error")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.error: str | None = None

    def reset(self) -> None:
        """Forget partial input and any error (a new connection)."""
        self._buf = bytearray()
        self.error = None

    def feed(self, chunk: bytes) -> list[NotifyMessage]:
        """Decode every complete message; stop (and set ``error``) on garbage."""
        if self.error is not None:
            return []
        self._buf += chunk
        buf = self._buf
        out: list[NotifyMessage] = []
        pos = 0
        while len(buf) - pos >= 5:
            (length,) = _U32.unpack_from(buf, pos)
            if length == 0 or length > MAX_MESSAGE:
                self.error = f"notify_dev: bad message length {length}"
                break
            start = pos + 4
            if buf[start] == 0:  # a vnet length word precedes the text
                if len(buf) - start < 4:
                    break
                start += 4
            end = start + length
            if end > len(buf):
                break
            raw = bytes(buf[start:end])
            if 0 in raw or not raw.isascii():
                self.error = f"notify_dev: message is not ASCII text: {raw[:32]!r}"
                break
            text = raw.decode("ascii")
            out.append(NotifyMessage(_KINDS.get(text, NotifyKind.UNKNOWN), text))
            pos = end
        del buf[:pos]
        return out


def encode_message(text: str) -> bytes:
    """Frame a message the way colo-compare sends it: ``[u32 len][text]``, no vnet word."""
    raw = text.encode("ascii")
    return _U32.pack(len(raw)) + raw


def do_checkpoint() -> bytes:
    """The checkpoint request colo-compare sends on divergence or timeout."""
    return encode_message(DO_CHECKPOINT)


def init_reply() -> bytes:
    """The answer to ``COLO_USERSPACE_PROXY_INIT``."""
    return encode_message(INIT_REPLY)
