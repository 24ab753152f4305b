"""Reading and writing capture files (pcap and pcapng) with dpkt.

Every link type we accept is turned into Ethernet frames, because the core
parses Ethernet: a synthetic 14-byte header is put in front of raw IP,
Linux cooked (SLL, SLL2) and BSD loopback records.  Anything unreadable is
an InputError with a one-line message naming the records read before it
(a corrupted gzip stream included), never a traceback.

Timestamps are floats of seconds, which are exact to a microsecond only up to
about 2**33 s: a pcapng ``if_tsoffset`` beyond that (a hostile or broken file)
would make every later time the same float.  Such an offset is dropped (the
differences between that interface's frames stay exact), logged and reported
in ``ReadInfo``; any timestamp still out of range is counted there too.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from colo_proxy.errors import InputError

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_RAW_ALT = (12, 14)
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

log = logging.getLogger(__name__)

MAX_SANE_TIME: Final = float(1 << 33)
"""Seconds (year 2242): a float keeps microseconds below this; beyond it, absurd."""

_STREAM_ERRORS = (OSError, EOFError, zlib.error)
"""What a file or a gzip stream raises when it is cut or corrupt."""


@dataclass(slots=True)
class ReadInfo:
    """What a reader noticed about a capture besides its frames."""

    records: int = 0
    absurd_tsoffset: int = 0
    """The pcapng if_tsoffset that was dropped (0: none)."""
    absurd_timestamps: int = 0
    """Frames whose timestamp is negative, not finite or beyond MAX_SANE_TIME."""

    def check(self, path: Path, ts: float) -> None:
        if not (0.0 <= ts < MAX_SANE_TIME):
            if not self.absurd_timestamps:
                log.warning("%s: record %d has an absurd timestamp (%r s)",
                            path, self.records, ts)
            self.absurd_timestamps += 1


_FAKE_MACS = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"
_ETH_IPV4 = _FAKE_MACS + b"\x08\x00"
_ETH_IPV6 = _FAKE_MACS + b"\x86\xdd"


def _open(path: Path) -> BinaryIO:
    try:
        raw = path.open("rb")
    except OSError as err:
        raise InputError(f"{path}: cannot open: {err.strerror or err}") from err
    magic = raw.read(2)
    raw.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.open(raw)  # type: ignore[return-value]
    return raw


def _to_ethernet(linktype: int, buf: bytes) -> bytes | None:
    """The record as an Ethernet frame, or None when it carries no IP/Ethernet."""
    if linktype == LINKTYPE_ETHERNET:
        return buf
    if linktype == LINKTYPE_RAW or linktype in LINKTYPE_RAW_ALT:
        if not buf:
            return None
        version = buf[0] >> 4
        return (_ETH_IPV4 if version == 4 else _ETH_IPV6) + buf if version in (4, 6) else None
    if linktype == LINKTYPE_IPV4:
        return _ETH_IPV4 + buf
    if linktype == LINKTYPE_IPV6:
        return _ETH_IPV6 + buf
    if linktype == LINKTYPE_LINUX_SLL and len(buf) >= 16:
        return _FAKE_MACS + buf[14:16] + buf[16:]
    if linktype == LINKTYPE_LINUX_SLL2 and len(buf) >= 20:
        return _FAKE_MACS + buf[0:2] + buf[20:]
    if linktype == LINKTYPE_NULL and len(buf) >= 4:
        family = struct.unpack("<I", buf[:4])[0]
        if family > 0xFFFF:
            family = struct.unpack(">I", buf[:4])[0]
        if family == 2:
            return _ETH_IPV4 + buf[4:]
        if family in (10, 24, 28, 30):
            return _ETH_IPV6 + buf[4:]
    return None


SUPPORTED_LINKTYPES = frozenset(
    (
        LINKTYPE_NULL,
        LINKTYPE_ETHERNET,
        LINKTYPE_RAW,
        *LINKTYPE_RAW_ALT,
        LINKTYPE_LINUX_SLL,
        LINKTYPE_IPV4,
        LINKTYPE_IPV6,
        LINKTYPE_LINUX_SLL2,
    )
)


_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
MAX_RECORD = 1 << 20


def _read_pcap(path: Path, stream: BinaryIO, info: ReadInfo) -> Iterator[tuple[float, bytes]]:
    """Classic pcap, read with struct: unlike dpkt's reader it notices a cut record."""
    head = stream.read(24)
    order, scale = _PCAP_MAGICS[head[:4]]
    if len(head) < 24:
        raise InputError(f"{path}: truncated pcap header")
    linktype = struct.unpack(order + "I", head[20:24])[0] & 0x0FFFFFFF
    if linktype not in SUPPORTED_LINKTYPES:
        raise InputError(f"{path}: unsupported link type {linktype}")
    rec = struct.Struct(order + "IIII")
    count = 0
    while True:
        hdr = stream.read(16)
        if not hdr:
            return
        if len(hdr) < 16:
            raise InputError(f"{path}: truncated after record {count} (cut record header)")
        sec, frac, caplen, _ = rec.unpack(hdr)
        if caplen > MAX_RECORD:
            raise InputError(f"{path}: corrupt record {count + 1} (length {caplen})")
        buf = stream.read(caplen)
        if len(buf) < caplen:
            raise InputError(f"{path}: truncated after record {count} (cut record data)")
        count += 1
        info.records = count
        frame = _to_ethernet(linktype, buf)
        if frame is not None:
            yield sec + frac * scale, frame


def _read_pcapng(path: Path, stream: BinaryIO, info: ReadInfo) -> Iterator[tuple[float, bytes]]:
    import dpkt  # here, not at the top: dpkt imports all its protocols (a third of `run`'s
    # start-up CPU), and `run` imports this module for PcapWriter whether it writes or not

    pcapng_errors = (ValueError, dpkt.dpkt.Error, struct.error, *_STREAM_ERRORS)
    try:
        reader = dpkt.pcapng.Reader(stream)
    except pcapng_errors as err:
        raise InputError(f"{path}: not a valid pcapng capture ({err})") from err
    linktype = reader.datalink()
    if linktype not in SUPPORTED_LINKTYPES:
        raise InputError(f"{path}: unsupported link type {linktype}")
    offset = getattr(reader, "_tsoffset", 0)
    if isinstance(offset, int) and abs(offset) >= MAX_SANE_TIME:
        log.warning("%s: if_tsoffset of %d s is absurd; ignored (times relative to it)",
                    path, offset)
        info.absurd_tsoffset = offset
        reader._tsoffset = 0
    count = 0
    try:
        for ts, buf in reader:
            count += 1
            info.records = count
            frame = _to_ethernet(linktype, bytes(buf))
            if frame is not None:
                t = float(ts)
                if not (0.0 <= t < MAX_SANE_TIME):
                    info.check(path, t)
                    if not math.isfinite(t):
                        t = 0.0
                yield t, frame
    except pcapng_errors as err:
        raise InputError(f"{path}: truncated or corrupt after record {count} ({err})") from err


def read_frames(path: str | Path, info: ReadInfo | None = None) -> Iterator[tuple[float, bytes]]:
    """Yield (timestamp, Ethernet frame) from a pcap or pcapng file (optionally gzipped).

    Records of a link type without IP are skipped; a truncated file, a corrupt
    gzip stream or one that is not a capture raises InputError naming the file
    and the records read before it (those were yielded).  `info`, when given,
    collects what else was noticed (absurd timestamps).
    """
    path = Path(path)
    info = info if info is not None else ReadInfo()
    with _open(path) as stream:
        try:
            magic = stream.read(4)
            stream.seek(0)
        except _STREAM_ERRORS as err:
            raise InputError(f"{path}: cannot read: {err}") from err
        if magic == b"\x0a\x0d\x0d\x0a":
            yield from _read_pcapng(path, stream, info)
        elif magic in _PCAP_MAGICS:
            try:
                yield from _read_pcap(path, stream, info)
            except _STREAM_ERRORS as err:
                raise InputError(f"{path}: truncated or corrupt after record "
                                 f"{info.records} ({err})") from err
        elif not magic:
            raise InputError(f"{path}: empty file, not a capture")
        else:
            raise InputError(f"{path}: not a pcap or pcapng capture")


SNAPLEN = 262144
"""Written captures' snaplen: covers any frame, GSO super-frames included."""


class PcapWriter:
    """Writes Ethernet frames with nanosecond timestamps to a classic pcap file."""

    def __init__(self, path: str | Path) -> None:
        try:
            self._file = Path(path).open("wb")  # noqa: SIM115 - closed by close()
        except OSError as err:
            raise InputError(f"{path}: cannot write: {err.strerror or err}") from err
        import dpkt  # see _read_pcapng

        self._writer = dpkt.pcap.Writer(
            self._file, snaplen=SNAPLEN, linktype=LINKTYPE_ETHERNET, nano=True
        )

    def write(self, ts: float, frame: bytes) -> None:
        """Append one frame stamped with `ts` (seconds)."""
        self._writer.writepkt(frame, ts=ts)

    def close(self) -> None:
        """Flush and close the file."""
        self._writer.close()
