"""Sans-IO NBD server connection: fixed newstyle handshake and simple-reply transmission.

Feed it whatever bytes arrive (whole, byte by byte, split anywhere); it answers
the handshake itself, validates every request (magic, command, flags, range,
read-only, size) and hands the driver only well-formed requests.  Invalid
requests get an error reply in ``data_to_send()``; a desynchronised stream
(bad magic, oversized option) ends with ``Closed``.  Spec: NetworkBlockDevice
``doc/proto.md``; only simple replies (structured replies are refused politely,
which QEMU and libnbd accept).

TLS (``tls=True``): NBD_OPT_STARTTLS is acknowledged and yields ``StartTls``; the
driver upgrades the socket and calls ``tls_started()``.  Until then every other
option but ABORT is answered NBD_REP_ERR_TLS_REQD (EXPORT_NAME, which cannot be
answered, closes), as the spec and QEMU's ``tls-creds`` server do.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC_OPT = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = 2**31 + 1, 2**31 + 2, 2**31 + 3
REP_ERR_UNKNOWN = 2**31 + 6
REP_ERR_TLS_REQD = 2**31 + 5
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA = 1, 2, 4, 8
TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_CAN_MULTI_CONN, TF_SEND_CACHE = 32, 64, 256, 1024

CMD_FLAG_FUA, CMD_FLAG_NO_HOLE = 1, 2

EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108

MAX_REQUEST = 32 << 20
MAX_OPTION = 64 << 10
MAX_NAME = 4096

_OPT_HDR = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6


_ALLOWED_FLAGS = {
    Command.READ: 0,
    Command.WRITE: CMD_FLAG_FUA,
    Command.FLUSH: 0,
    Command.TRIM: CMD_FLAG_FUA,
    Command.CACHE: 0,
    Command.WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
}


@dataclass(frozen=True, slots=True)
class ExportInfo:
    name: str
    size: int
    read_only: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class ExportChosen:
    """Handshake done: transmission on ``export`` starts."""

    export: ExportInfo


@dataclass(frozen=True, slots=True)
class Request:
    """A valid request; reply with ``reply(handle, ...)``.  ``data`` only for WRITE."""

    command: Command
    flags: int
    handle: int
    offset: int
    length: int
    data: bytes = b""

    @property
    def fua(self) -> bool:
        return bool(self.flags & CMD_FLAG_FUA)


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection must close; ``error`` is empty for a clean DISC/ABORT."""

    error: str = ""


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS acknowledged: upgrade the socket, then call ``tls_started()``."""


Event = ExportChosen | Request | Closed | StartTls


class _State(enum.Enum):
    CLIENT_FLAGS = 0
    OPTIONS = 1
    TRANSMISSION = 2
    CLOSED = 3
    TLS_HANDSHAKE = 4


class NbdServerConnection:
    """One client connection, from greeting to close."""

    def __init__(self, exports: dict[str, ExportInfo], default: str | None = None,
                 tls: bool = False) -> None:
        self.exports = exports
        self.default = default
        self.tls_required = tls
        self.tls_active = False
        self.export: ExportInfo | None = None
        self._state = _State.CLIENT_FLAGS
        self._buf = bytearray()
        self._out = bytearray(struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                          FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        self._no_zeroes = False
        self._fixed = False
        self._need = 0  # payload bytes still to come for ``_pending``
        self._pending: Request | None = None
        self._chunks: list[bytes | memoryview] = []

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @staticmethod
    def reply(handle: int, error: int = 0, data: bytes = b"") -> bytes:
        """Bytes of a simple reply (data only on success)."""
        head = _REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
        return head + data if data and not error else head

    # -- input ----------------------------------------------------------------------
    @property
    def buffered(self) -> int:
        """Bytes received and kept until a request (or option) is complete."""
        return len(self._buf) + sum(len(c) for c in self._chunks)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed received bytes; returns the events they complete."""
        events: list[Event] = []
        if self._need:
            # Payload chunks are kept by reference until complete: they must not change.
            if not isinstance(data, bytes):
                data = bytes(data)
            data = self._collect(memoryview(data), events)
            if self._need or not data:
                return events
        # Parse straight out of the caller's buffer when nothing is pending (no copy).
        buf: bytes | bytearray | memoryview
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data
        pos = 0
        while self._state is not _State.CLOSED:
            if self._state is _State.TLS_HANDSHAKE:
                if pos < len(buf):
                    self._close(events, "data after NBD_OPT_STARTTLS before the TLS handshake")
                break
            if self._state is _State.TRANSMISSION:
                used = self._parse_request(buf, pos, events)
            elif self._state is _State.OPTIONS:
                used = self._parse_option(buf, pos, events)
            else:
                used = self._parse_client_flags(buf, pos, events)
            if used == 0:
                break
            pos += used
        if self._state is _State.CLOSED:
            self._buf = bytearray()
        elif buf is self._buf:
            del self._buf[:pos]
        else:
            self._buf = bytearray(buf[pos:])
        return events

    def _collect(self, data: memoryview, events: list[Event]) -> memoryview:
        """Gather a large WRITE payload chunk by chunk; return what follows it."""
        take = min(self._need, len(data))
        self._chunks.append(data[:take])
        self._need -= take
        if not self._need:
            req = self._pending
            assert req is not None
            payload = b"".join(self._chunks)
            self._chunks = []
            self._pending = None
            err = self._check(Command.WRITE, req.flags, req.offset, req.length)
            if err:
                self._out += self.reply(req.handle, err)
            else:
                events.append(Request(Command.WRITE, req.flags, req.handle, req.offset,
                                      req.length, payload))
        return data[take:]

    def _close(self, events: list[Event], error: str = "") -> None:
        self._state = _State.CLOSED
        events.append(Closed(error))

    def _parse_client_flags(self, buf: bytes | bytearray | memoryview, pos: int,
                            events: list[Event]) -> int:
        if len(buf) - pos < 4:
            return 0
        (flags,) = struct.unpack_from(">I", buf, pos)
        if flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            self._close(events, f"unknown client flags {flags:#x}")
            return 4
        self._fixed = bool(flags & FLAG_FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & FLAG_NO_ZEROES)
        self._state = _State.OPTIONS
        return 4

    def _opt_reply(self, opt: int, rtype: int, payload: bytes = b"") -> None:
        self._out += _OPT_REPLY.pack(REPLY_MAGIC_OPT, opt, rtype, len(payload))
        self._out += payload

    def _opt_error(self, opt: int, rtype: int, message: str) -> None:
        self._opt_reply(opt, rtype, message.encode())

    def _parse_option(self, buf: bytes | bytearray | memoryview, pos: int,
                      events: list[Event]) -> int:
        if len(buf) - pos < _OPT_HDR.size:
            return 0
        fields: tuple[int, int, int] = _OPT_HDR.unpack_from(buf, pos)
        magic, opt, length = fields
        if magic != IHAVEOPT:
            self._close(events, "bad option magic")
            return _OPT_HDR.size
        if length > MAX_OPTION:
            self._close(events, f"option {opt} too long ({length} bytes)")
            return _OPT_HDR.size
        if len(buf) - pos < _OPT_HDR.size + length:
            return 0
        payload = bytes(buf[pos + _OPT_HDR.size:pos + _OPT_HDR.size + length])
        self._handle_option(opt, payload, events)
        return _OPT_HDR.size + length

    def _lookup(self, name: str) -> ExportInfo | None:
        if name == "" and self.default is not None:
            name = self.default
        return self.exports.get(name)

    def tls_started(self) -> None:
        """The driver finished the TLS handshake: option haggling goes on inside it."""
        self.tls_active = True
        self._state = _State.OPTIONS

    def _handle_option(self, opt: int, payload: bytes, events: list[Event]) -> None:
        if self.tls_required and not self.tls_active and opt not in (OPT_STARTTLS, OPT_ABORT):
            if opt == OPT_EXPORT_NAME or not self._fixed:
                self._close(events, "client did not start TLS")
            else:
                self._opt_error(opt, REP_ERR_TLS_REQD, "TLS is required")
            return
        if opt == OPT_EXPORT_NAME:
            exp = self._lookup(payload.decode("utf-8", "replace"))
            if exp is None:
                self._close(events, "unknown export requested with NBD_OPT_EXPORT_NAME")
                return
            self._out += struct.pack(">QH", exp.size, self._tflags(exp))
            if not self._no_zeroes:
                self._out += bytes(124)
            self._start(exp, events)
        elif not self._fixed:
            self._close(events, f"option {opt} needs fixed newstyle")
        elif opt == OPT_ABORT:
            self._opt_reply(opt, REP_ACK)
            self._close(events)
        elif opt == OPT_LIST:
            if payload:
                self._opt_error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return
            for name in self.exports:
                raw = name.encode()
                self._opt_reply(opt, REP_SERVER, struct.pack(">I", len(raw)) + raw)
            self._opt_reply(opt, REP_ACK)
        elif opt in (OPT_INFO, OPT_GO):
            self._info_or_go(opt, payload, events)
        elif opt == OPT_STARTTLS:
            if not self.tls_required:
                self._opt_error(opt, REP_ERR_POLICY, "TLS is not offered")
            elif self.tls_active:
                self._opt_error(opt, REP_ERR_INVALID, "TLS is already active")
            elif payload:
                self._opt_error(opt, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            else:
                self._opt_reply(opt, REP_ACK)
                self._state = _State.TLS_HANDSHAKE
                events.append(StartTls())
        else:
            self._opt_error(opt, REP_ERR_UNSUP, f"option {opt} not supported")

    def _info_or_go(self, opt: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) < 6:
            self._opt_error(opt, REP_ERR_INVALID, "truncated NBD_OPT_INFO/GO")
            return
        (nlen,) = struct.unpack_from(">I", payload, 0)
        if nlen > MAX_NAME or 4 + nlen + 2 > len(payload):
            self._opt_error(opt, REP_ERR_INVALID, "bad export name length")
            return
        name = payload[4:4 + nlen].decode("utf-8", "replace")
        (count,) = struct.unpack_from(">H", payload, 4 + nlen)
        if len(payload) != 4 + nlen + 2 + 2 * count:
            self._opt_error(opt, REP_ERR_INVALID, "information request count mismatch")
            return
        wanted = set(struct.unpack_from(f">{count}H", payload, 6 + nlen))
        exp = self._lookup(name)
        if exp is None:
            self._opt_error(opt, REP_ERR_UNKNOWN, f"export {name!r} not found")
            return
        self._opt_reply(opt, REP_INFO,
                        struct.pack(">HQH", INFO_EXPORT, exp.size, self._tflags(exp)))
        if INFO_NAME in wanted:
            self._opt_reply(opt, REP_INFO, struct.pack(">H", INFO_NAME) + exp.name.encode())
        if INFO_DESCRIPTION in wanted:
            self._opt_reply(opt, REP_INFO,
                            struct.pack(">H", INFO_DESCRIPTION) + exp.description.encode())
        if INFO_BLOCK_SIZE in wanted:
            self._opt_reply(opt, REP_INFO,
                            struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_REQUEST))
        self._opt_reply(opt, REP_ACK)
        if opt == OPT_GO:
            self._start(exp, events)

    @staticmethod
    def _tflags(exp: ExportInfo) -> int:
        flags = (TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM
                 | TF_SEND_WRITE_ZEROES | TF_CAN_MULTI_CONN | TF_SEND_CACHE)
        return flags | TF_READ_ONLY if exp.read_only else flags

    def _start(self, exp: ExportInfo, events: list[Event]) -> None:
        self.export = exp
        self._state = _State.TRANSMISSION
        events.append(ExportChosen(exp))

    # -- transmission -------------------------------------------------------------------
    def _parse_request(self, buf: bytes | bytearray | memoryview, pos: int,
                       events: list[Event]) -> int:
        avail = len(buf) - pos
        if avail < _REQ.size:
            return 0
        fields: tuple[int, int, int, int, int, int] = _REQ.unpack_from(buf, pos)
        magic, flags, ctype, handle, offset, length = fields
        if magic != REQUEST_MAGIC:
            self._close(events, f"bad request magic {magic:#x}")
            return _REQ.size
        if ctype == Command.WRITE:
            if length > MAX_REQUEST:
                self._out += self.reply(handle, EOVERFLOW)
                self._close(events, f"write of {length} bytes exceeds {MAX_REQUEST}")
                return _REQ.size
            start = pos + _REQ.size
            if avail < _REQ.size + length:
                # Collect the rest of the payload without re-buffering it.
                self._pending = Request(Command.WRITE, flags, handle, offset, length)
                with memoryview(buf) as view:
                    self._chunks = [bytes(view[start:])]
                self._need = length - (avail - _REQ.size)
                return avail
            err = self._check(Command.WRITE, flags, offset, length)
            if err:
                self._out += self.reply(handle, err)
            else:
                with memoryview(buf) as view:
                    payload = bytes(view[start:start + length])
                events.append(Request(Command.WRITE, flags, handle, offset, length, payload))
            return _REQ.size + length
        if ctype == Command.DISC:
            self._close(events)
            return _REQ.size
        try:
            cmd = Command(ctype)
        except ValueError:
            self._out += self.reply(handle, EINVAL)
            return _REQ.size
        err = self._check(cmd, flags, offset, length)
        if err:
            self._out += self.reply(handle, err)
        else:
            events.append(Request(cmd, flags, handle, offset, length))
        return _REQ.size

    def _check(self, cmd: Command, flags: int, offset: int, length: int) -> int:
        """The NBD error for a malformed or impossible request, or 0."""
        exp = self.export
        assert exp is not None
        if flags & ~_ALLOWED_FLAGS[cmd]:
            return EINVAL
        writes = cmd in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)
        if writes and exp.read_only:
            return EPERM
        if cmd is Command.FLUSH:
            return 0
        if cmd is Command.READ and length > MAX_REQUEST:
            return EOVERFLOW
        if offset + length > exp.size:
            return ENOSPC if cmd in (Command.WRITE, Command.WRITE_ZEROES) else EINVAL
        return 0
