"""Byte builders for an NBD client, shared by the protocol and agent tests."""

from __future__ import annotations

import struct

from colo_proxy.disk import nbd_proto as p


def option(opt: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", p.IHAVEOPT, opt, len(payload)) + payload


def go_payload(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def request(cmd: int, offset: int = 0, length: int = 0, handle: int = 1, flags: int = 0,
            data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, handle, offset, length) + data


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == p.REPLY_MAGIC_OPT
        out.append((opt, rtype, data[pos + 20:pos + 20 + length]))
        pos += 20 + length
    return out


def parse_simple_replies(data: bytes, read_lengths: dict[int, int]) -> list[tuple[int, int, bytes]]:
    """(handle, error, data); ``read_lengths`` says which handles carry read data."""
    out = []
    pos = 0
    while pos < len(data):
        magic, err, handle = struct.unpack_from(">IIQ", data, pos)
        assert magic == p.SIMPLE_REPLY_MAGIC
        pos += 16
        n = read_lengths.get(handle, 0) if err == 0 else 0
        out.append((handle, err, data[pos:pos + n]))
        pos += n
    return out
