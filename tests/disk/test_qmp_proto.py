"""The sans-IO QMP session: negotiation, QEMU's error wording, malformed input, splitting."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from colo_proxy.disk.qmp_proto import (
    MAX_DEPTH,
    MAX_MESSAGE,
    Closed,
    CommandSpec,
    Execute,
    Param,
    QmpSession,
    event_message,
)

SPECS = {"colo-disk-checkpoint": CommandSpec({"epoch": Param("int")}),
         "opt": CommandSpec({"flag": Param("bool", required=False)})}


def msgs(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def session(negotiate: bool = True) -> QmpSession:
    s = QmpSession(SPECS)
    greeting = msgs(s.data_to_send())
    assert list(greeting[0]) == ["QMP"] and greeting[0]["QMP"]["capabilities"] == []
    if negotiate:
        assert s.receive_data(b'{"execute": "qmp_capabilities"}') == []
        assert msgs(s.data_to_send()) == [{"return": {}}]
    return s


def error_of(s: QmpSession, data: bytes) -> tuple[str, str, Any]:
    assert s.receive_data(data) == []
    (reply,) = msgs(s.data_to_send())
    return reply["error"]["class"], reply["error"]["desc"], reply.get("id", "<none>")


def test_commands_need_negotiation_first() -> None:
    s = session(negotiate=False)
    cls, desc, id_ = error_of(s, b'{"execute": "opt", "id": 5}')
    assert cls == "CommandNotFound" and "qmp_capabilities" in desc and id_ == 5
    assert error_of(s, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')[0] \
        == "GenericError"
    s.receive_data(b'{"execute": "qmp_capabilities", "id": "a"}')
    assert msgs(s.data_to_send()) == [{"return": {}, "id": "a"}]
    assert error_of(s, b'{"execute": "qmp_capabilities"}')[0] == "CommandNotFound"


def test_execute_and_replies_carry_the_id() -> None:
    s = session()
    (ex,) = s.receive_data(b'{"execute": "colo-disk-checkpoint", "arguments": {"epoch": 3},'
                           b' "id": {"x": [1]}}\n')
    assert ex == Execute("colo-disk-checkpoint", {"epoch": 3}, True, {"x": [1]})
    assert json.loads(s.result(ex, {"epoch": 3})) == {"return": {"epoch": 3}, "id": {"x": [1]}}
    assert json.loads(s.error(ex, "GenericError", "no")) == {
        "error": {"class": "GenericError", "desc": "no"}, "id": {"x": [1]}}
    (ex2,) = s.receive_data(b'{"execute": "opt"}')
    assert not ex2.has_id and "id" not in json.loads(s.result(ex2, {}))


def test_qemu_error_wording() -> None:
    s = session()
    cases = [
        (b'{"execute": "nope", "id": 1}', "CommandNotFound", "The command nope has not been found"),
        (b'{"execute": "colo-disk-checkpoint"}', "GenericError", "Parameter 'epoch' is missing"),
        (b'{"execute": "colo-disk-checkpoint", "arguments": {"epoch": "1"}}', "GenericError",
         "Invalid parameter type for 'epoch', expected: integer"),
        (b'{"execute": "colo-disk-checkpoint", "arguments": {"epoch": true}}', "GenericError",
         "Invalid parameter type for 'epoch', expected: integer"),
        (b'{"execute": "opt", "arguments": {"zzz": 1}}', "GenericError",
         "Parameter 'zzz' is unexpected"),
        (b'{"execute": 5}', "GenericError", "QMP input member 'execute' must be a string"),
        (b'{"execute": "opt", "arguments": []}', "GenericError",
         "QMP input member 'arguments' must be an object"),
        (b'{"exe": "opt"}', "GenericError", "QMP input lacks member 'execute'"),
        (b'{"execute": "opt", "extra": 1}', "GenericError",
         "QMP input member 'extra' is unexpected"),
        (b'[1, 2]', "GenericError", "QMP input must be a JSON object"),
    ]
    for data, cls, desc in cases:
        got = error_of(s, data)
        assert got[:2] == (cls, desc), data


def test_garbage_gets_errors_and_session_survives() -> None:
    s = session()
    for junk in (b"hello\n", b'{"execute": "opt",}', b'{"a": tru}', b"}"):
        s.receive_data(junk)
        replies = msgs(s.data_to_send())
        assert replies and all("JSON parse error" in r["error"]["desc"] for r in replies)
    assert s.receive_data(b'{"execute": "opt"}') == [Execute("opt", {}, False, None)]


def test_oversized_or_deep_input_closes() -> None:
    s = session()
    ev = s.receive_data(b'{"a": "' + b"x" * (MAX_MESSAGE + 1))
    assert len(ev) == 1 and isinstance(ev[0], Closed)
    assert "error" in msgs(s.data_to_send())[0]
    s = session()
    ev = s.receive_data(b"[" * (MAX_DEPTH + 1))
    assert len(ev) == 1 and isinstance(ev[0], Closed)
    assert s.receive_data(b'{"execute": "opt"}') == []


def test_event_shape() -> None:
    ev = json.loads(event_message("COLO_DISK_EPOCH_APPLIED", {"epoch": 4}, 12.5))
    assert ev == {"event": "COLO_DISK_EPOCH_APPLIED", "data": {"epoch": 4},
                  "timestamp": {"seconds": 12, "microseconds": 500000}}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    b'{"execute": "opt", "id": "}{\\"\\\\"}', b'{"execute": "colo-disk-checkpoint", '
    b'"arguments": {"epoch": 2}}', b'{"execute": "nope"}', b"junk ", b'{"bad": [}', b"\n",
]), max_size=10), st.data())
def test_any_split_gives_the_same_result(parts: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(parts)
    whole = session()
    want = whole.receive_data(stream), whole.data_to_send()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    split = session()
    got: list[Execute | Closed] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got += split.receive_data(stream[prev:cut])
        prev = cut
    assert (got, split.data_to_send()) == want
