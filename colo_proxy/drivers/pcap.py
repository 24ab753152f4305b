"""Reading and writing capture files (pcap and pcapng) with dpkt.

Every link type we accept is turned into Ethernet frames, because the core
parses Ethernet: a synthetic 14-byte header is put in front of raw IP,
Linux cooked (SLL, SLL2) and BSD loopback records.  Anything unreadable is
an InputError with a one-line message, never a traceback.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import dpkt

from colo_proxy.errors import InputError

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_RAW_ALT = (12, 14)
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

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


def _read_pcap(path: Path, stream: BinaryIO) -> Iterator[tuple[float, bytes]]:
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
        frame = _to_ethernet(linktype, buf)
        if frame is not None:
            yield sec + frac * scale, frame


def _read_pcapng(path: Path, stream: BinaryIO) -> Iterator[tuple[float, bytes]]:
    try:
        reader = dpkt.pcapng.Reader(stream)
    except (ValueError, dpkt.dpkt.Error, struct.error, EOFError, OSError) as err:
        raise InputError(f"{path}: not a valid pcapng capture ({err})") from err
    linktype = reader.datalink()
    if linktype not in SUPPORTED_LINKTYPES:
        raise InputError(f"{path}: unsupported link type {linktype}")
    count = 0
    try:
        for ts, buf in reader:
            count += 1
            frame = _to_ethernet(linktype, bytes(buf))
            if frame is not None:
                yield float(ts), frame
    except (ValueError, dpkt.dpkt.Error, struct.error, EOFError, OSError) as err:
        raise InputError(f"{path}: truncated or corrupt after record {count} ({err})") from err


def read_frames(path: str | Path) -> Iterator[tuple[float, bytes]]:
    """Yield (timestamp, Ethernet frame) from a pcap or pcapng file (optionally gzipped).

    Records of a link type without IP are skipped; a truncated file or one
    that is not a capture raises InputError naming the file and the record.
    """
    path = Path(path)
    with _open(path) as stream:
        try:
            magic = stream.read(4)
            stream.seek(0)
        except (OSError, EOFError) as err:
            raise InputError(f"{path}: cannot read: {err}") from err
        if magic == b"\x0a\x0d\x0d\x0a":
            yield from _read_pcapng(path, stream)
        elif magic in _PCAP_MAGICS:
            try:
                yield from _read_pcap(path, stream)
            except (OSError, EOFError) as err:
                raise InputError(f"{path}: truncated or corrupt ({err})") from err
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
        self._writer = dpkt.pcap.Writer(
            self._file, snaplen=SNAPLEN, linktype=LINKTYPE_ETHERNET, nano=True
        )

    def write(self, ts: float, frame: bytes) -> None:
        """Append one frame stamped with `ts` (seconds)."""
        self._writer.writepkt(frame, ts=ts)

    def close(self) -> None:
        """Flush and close the file."""
        self._writer.close()
