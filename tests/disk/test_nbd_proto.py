"""The sans-IO NBD server connection: handshake, validation, arbitrary splitting."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from colo_proxy.disk import nbd_proto as p
from colo_proxy.disk.nbd_proto import (
    Closed,
    Command,
    ExportChosen,
    ExportInfo,
    NbdServerConnection,
    Request,
)
from tests.disk.nbdwire import (
    go_payload,
    option,
    parse_option_replies,
    parse_simple_replies,
    request,
)

EXPORTS = {"replication": ExportInfo("replication", 1 << 20),
           "ro": ExportInfo("ro", 4096, read_only=True)}
FLAGS = struct.pack(">I", p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)


def conn() -> NbdServerConnection:
    c = NbdServerConnection(EXPORTS, default="replication")
    greeting = c.data_to_send()
    assert greeting[:16] == struct.pack(">QQ", p.NBDMAGIC, p.IHAVEOPT)
    return c


def in_transmission(name: str = "replication") -> NbdServerConnection:
    c = conn()
    ev = c.receive_data(FLAGS + option(p.OPT_GO, go_payload(name)))
    assert ev == [ExportChosen(EXPORTS[name])]
    c.data_to_send()
    return c


def test_go_reports_size_and_flags() -> None:
    c = conn()
    ev = c.receive_data(FLAGS + option(p.OPT_GO, go_payload("", (p.INFO_BLOCK_SIZE,))))
    assert ev == [ExportChosen(EXPORTS["replication"])]
    replies = parse_option_replies(c.data_to_send())
    assert [r[1] for r in replies] == [p.REP_INFO, p.REP_INFO, p.REP_ACK]
    info_type, size, tflags = struct.unpack(">HQH", replies[0][2])
    assert (info_type, size) == (p.INFO_EXPORT, 1 << 20)
    assert tflags & p.TF_SEND_FLUSH and tflags & p.TF_SEND_FUA and not tflags & p.TF_READ_ONLY
    assert struct.unpack(">HIII", replies[1][2]) == (p.INFO_BLOCK_SIZE, 1, 4096, p.MAX_REQUEST)


def test_export_name_with_and_without_zero_padding() -> None:
    for flags, tail in ((p.FLAG_FIXED_NEWSTYLE, 124), (p.FLAG_FIXED_NEWSTYLE | 2, 0)):
        c = conn()
        ev = c.receive_data(struct.pack(">I", flags) + option(p.OPT_EXPORT_NAME, b"ro"))
        assert ev == [ExportChosen(EXPORTS["ro"])]
        out = c.data_to_send()
        assert len(out) == 10 + tail
        size, tflags = struct.unpack_from(">QH", out)
        assert size == 4096 and tflags & p.TF_READ_ONLY


def test_list_info_unknown_and_abort() -> None:
    c = conn()
    c.receive_data(FLAGS)
    assert c.receive_data(option(p.OPT_LIST)) == []
    names = [r[2][4:] for r in parse_option_replies(c.data_to_send()) if r[1] == p.REP_SERVER]
    assert names == [b"replication", b"ro"]
    c.receive_data(option(p.OPT_LIST, b"x"))
    assert parse_option_replies(c.data_to_send())[0][1] == p.REP_ERR_INVALID
    c.receive_data(option(p.OPT_INFO, go_payload("nope")))
    assert parse_option_replies(c.data_to_send())[0][1] == p.REP_ERR_UNKNOWN
    for bad in (b"", b"\0\0\0\x09ab\0\0", go_payload("ro") + b"\0"):
        c.receive_data(option(p.OPT_GO, bad))
        assert parse_option_replies(c.data_to_send())[0][1] == p.REP_ERR_INVALID
    for unsupported in (8, 9, 10, 99):
        c.receive_data(option(unsupported))
        assert parse_option_replies(c.data_to_send())[0][1] == p.REP_ERR_UNSUP
    c.receive_data(option(p.OPT_STARTTLS))
    assert parse_option_replies(c.data_to_send())[0][1] == p.REP_ERR_POLICY
    assert c.receive_data(option(p.OPT_ABORT)) == [Closed("")]
    assert parse_option_replies(c.data_to_send())[0][1] == p.REP_ACK
    assert c.receive_data(option(p.OPT_LIST)) == []


def test_handshake_violations_close() -> None:
    cases = [
        struct.pack(">I", 0x80),
        FLAGS + struct.pack(">QII", 0x1234, p.OPT_LIST, 0),
        FLAGS + struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, p.MAX_OPTION + 1),
        FLAGS + option(p.OPT_EXPORT_NAME, b"nope"),
        struct.pack(">I", 0) + option(p.OPT_LIST),  # not fixed newstyle
    ]
    for data in cases:
        ev = conn().receive_data(data)
        assert len(ev) == 1 and isinstance(ev[0], Closed) and ev[0].error


def test_requests_are_validated() -> None:
    c = in_transmission()
    size = 1 << 20
    stream = b"".join([
        request(Command.READ, size - 10, 11, handle=1),
        request(Command.WRITE, size - 1, 2, handle=2, data=b"ab"),
        request(Command.WRITE_ZEROES, size, 1, handle=3),
        request(Command.READ, 0, 8, handle=4, flags=p.CMD_FLAG_FUA),
        request(77, handle=5),
        request(Command.READ, 0, p.MAX_REQUEST + 1, handle=6),
        request(Command.WRITE, 0, 3, handle=7, flags=p.CMD_FLAG_FUA, data=b"xyz"),
        request(Command.TRIM, 0, 16, handle=8),
        request(Command.FLUSH, handle=9),
    ])
    events = c.receive_data(stream)
    errors = {h: e for h, e, _ in parse_simple_replies(c.data_to_send(), {})}
    assert errors == {1: p.EINVAL, 2: p.ENOSPC, 3: p.ENOSPC, 4: p.EINVAL, 5: p.EINVAL,
                      6: p.EOVERFLOW}
    assert [(e.command, e.handle) for e in events if isinstance(e, Request)] == [
        (Command.WRITE, 7), (Command.TRIM, 8), (Command.FLUSH, 9)]
    write = events[0]
    assert isinstance(write, Request) and write.data == b"xyz" and write.fua


def test_read_only_export_refuses_writes() -> None:
    c = in_transmission("ro")
    ev = c.receive_data(request(Command.WRITE, 0, 2, handle=3, data=b"zz")
                        + request(Command.READ, 0, 2, handle=4))
    assert [e.handle for e in ev if isinstance(e, Request)] == [4]
    assert parse_simple_replies(c.data_to_send(), {}) == [(3, p.EPERM, b"")]


def test_stream_violations_close() -> None:
    c = in_transmission()
    assert c.receive_data(b"\0" * 28) == [Closed("bad request magic 0x0")]
    c = in_transmission()
    ev = c.receive_data(request(Command.WRITE, 0, p.MAX_REQUEST + 1, handle=9))
    assert len(ev) == 1 and isinstance(ev[0], Closed) and ev[0].error
    assert parse_simple_replies(c.data_to_send(), {}) == [(9, p.EOVERFLOW, b"")]
    c = in_transmission()
    assert c.receive_data(request(Command.DISC)) == [Closed("")]


requests = st.lists(st.one_of(
    st.builds(lambda o, d, h: request(Command.WRITE, o, len(d), h, data=d),
              st.integers(0, 1 << 20), st.binary(max_size=64), st.integers(0, 2**64 - 1)),
    st.builds(lambda c, o, n, f, h: request(c, o, n, h, f),
              st.sampled_from([0, 3, 4, 5, 6, 42]), st.integers(0, 2**64 - 1),
              st.integers(0, 2**32 - 1), st.integers(0, 3), st.integers(0, 2**64 - 1)),
), max_size=12)


@settings(max_examples=200, deadline=None)
@given(requests, st.data())
def test_any_split_gives_the_same_result(reqs: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(reqs)
    whole = in_transmission()
    want = whole.receive_data(stream), whole.data_to_send()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    split = in_transmission()
    events = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        events += split.receive_data(stream[prev:cut])
        prev = cut
    assert (events, split.data_to_send()) == want
    # Every request got exactly one answer: an event or an error reply.
    replies = parse_simple_replies(want[1], {})
    assert len(replies) + len([e for e in want[0] if isinstance(e, Request)]) == len(reqs)
