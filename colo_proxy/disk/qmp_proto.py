"""Sans-IO QMP server session: the wire protocol QEMU speaks, for our own commands.

Greeting, capabilities negotiation, ``execute`` with optional ``id``, ``return`` /
``error`` replies with QEMU's error classes and wording, and events.  Input is a
stream of JSON objects (newlines optional), split here by a small scanner so a
message may arrive whole, byte by byte or several at once.  Malformed input gets
an error reply like QEMU's; only an oversized or over-deep message closes the
session.  Argument checking follows the command table, so handlers only ever see
well-typed arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_MESSAGE = 1 << 20
MAX_DEPTH = 64

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "number": (int, float),
    "str": (str,),
    "bool": (bool,),
    "array": (list,),
    "object": (dict,),
}
_TYPE_WORDS = {"int": "integer", "number": "number", "str": "string", "bool": "boolean",
               "array": "array", "object": "object"}


@dataclass(frozen=True, slots=True)
class Param:
    type: str
    required: bool = True


@dataclass(frozen=True, slots=True)
class CommandSpec:
    params: dict[str, Param] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Execute:
    """A valid command for the driver to run; reply with ``result`` or ``error``."""

    command: str
    arguments: dict[str, Any]
    has_id: bool
    id: Any


@dataclass(frozen=True, slots=True)
class Closed:
    error: str


class _Scanner:
    """Split a byte stream into top-level JSON texts without parsing them."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.stack = bytearray()  # open brackets of the current message
        self.in_str = False
        self.escape = False
        self.junk = False
        self.scanned = 0

    def feed(self, data: bytes) -> list[bytes | None]:
        """Complete messages; None stands for a stray token outside any object."""
        out: list[bytes | None] = []
        self.buf += data
        buf = self.buf
        i = self.scanned
        start = 0
        n = len(buf)
        while i < n:
            c = buf[i]
            if self.in_str:
                if self.escape:
                    self.escape = False
                elif c == 0x5C:  # backslash
                    self.escape = True
                elif c == 0x22:
                    self.in_str = False
            elif not self.stack:
                if c in b"{[":
                    self.stack.append(c)
                    self.junk = False
                    start = i
                elif c in b" \t\r\n":
                    self.junk = False
                    start = i + 1
                elif not self.junk:
                    self.junk = True
                    out.append(None)
                    start = i + 1
                else:
                    start = i + 1
            elif c == 0x22:
                self.in_str = True
            elif c in b"{[":
                self.stack.append(c)
                if len(self.stack) > MAX_DEPTH:
                    raise ValueError("JSON nesting too deep")
            elif c in b"}]":
                opener = self.stack.pop()
                if (opener == 0x7B) != (c == 0x7D):
                    self.stack.clear()  # mismatched: hand it to the parser to reject
                if not self.stack:
                    out.append(bytes(buf[start:i + 1]))
                    start = i + 1
            i += 1
        del buf[:start]
        self.scanned = len(buf)
        if len(buf) > MAX_MESSAGE:
            raise ValueError("QMP message too long")
        return out


def version_info() -> dict[str, Any]:
    return {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "colo-proxy disk-agent"}


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(", ", ": ")).encode() + b"\r\n"


def error_reply(cls: str, desc: str, has_id: bool = False, id_: Any = None) -> bytes:
    msg: dict[str, Any] = {"error": {"class": cls, "desc": desc}}
    if has_id:
        msg["id"] = id_
    return encode(msg)


def event_message(name: str, data: dict[str, Any] | None, now: float) -> bytes:
    """An event, timestamped like QEMU's (seconds + microseconds)."""
    seconds = int(now)
    msg: dict[str, Any] = {"event": name, "timestamp": {
        "seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}}
    if data is not None:
        msg["data"] = data
    return encode(msg)


class QmpSession:
    """One QMP connection: answers negotiation and malformed input itself."""

    def __init__(self, commands: dict[str, CommandSpec]) -> None:
        self.commands = commands
        self.negotiated = False
        self._scanner = _Scanner()
        self._out = bytearray(encode({"QMP": {"version": version_info(), "capabilities": []}}))
        self.closed = False

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> list[Execute | Closed]:
        if self.closed:
            return []
        try:
            texts = self._scanner.feed(data)
        except ValueError as err:
            self._out += error_reply(GENERIC_ERROR, f"JSON parse error, {err}")
            self.closed = True
            return [Closed(str(err))]
        events: list[Execute | Closed] = []
        for text in texts:
            ex = self._message(text)
            if ex is not None:
                events.append(ex)
        return events

    def result(self, ex: Execute, value: Any) -> bytes:
        msg: dict[str, Any] = {"return": value}
        if ex.has_id:
            msg["id"] = ex.id
        return encode(msg)

    def error(self, ex: Execute, cls: str, desc: str) -> bytes:
        return error_reply(cls, desc, ex.has_id, ex.id)

    def _message(self, text: bytes | None) -> Execute | None:
        if text is None:
            self._out += error_reply(GENERIC_ERROR, "JSON parse error, invalid token")
            return None
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError) as err:
            self._out += error_reply(GENERIC_ERROR, f"JSON parse error, {err}")
            return None
        if not isinstance(msg, dict):
            self._out += error_reply(GENERIC_ERROR, "QMP input must be a JSON object")
            return None
        has_id = "id" in msg
        id_ = msg.get("id")
        problem = self._check_envelope(msg)
        if problem is not None:
            self._out += error_reply(GENERIC_ERROR, problem, has_id, id_)
            return None
        name: str = msg["execute"]
        args: dict[str, Any] = msg.get("arguments", {})
        if name == "qmp_capabilities":
            self._negotiate(args, has_id, id_)
            return None
        if not self.negotiated:
            self._out += error_reply(
                COMMAND_NOT_FOUND,
                "Expecting capabilities negotiation with 'qmp_capabilities'", has_id, id_)
            return None
        spec = self.commands.get(name)
        if spec is None:
            self._out += error_reply(COMMAND_NOT_FOUND, f"The command {name} has not been found",
                                     has_id, id_)
            return None
        problem = check_arguments(spec, args)
        if problem is not None:
            self._out += error_reply(GENERIC_ERROR, problem, has_id, id_)
            return None
        return Execute(name, args, has_id, id_)

    @staticmethod
    def _check_envelope(msg: dict[str, Any]) -> str | None:
        if "execute" not in msg:
            if "exec-oob" in msg:
                return "QMP input member 'exec-oob' is unexpected (out-of-band is not enabled)"
            return "QMP input lacks member 'execute'"
        if not isinstance(msg["execute"], str):
            return "QMP input member 'execute' must be a string"
        if "arguments" in msg and not isinstance(msg["arguments"], dict):
            return "QMP input member 'arguments' must be an object"
        for key in msg:
            if key not in ("execute", "arguments", "id"):
                return f"QMP input member '{key}' is unexpected"
        return None

    def _negotiate(self, args: dict[str, Any], has_id: bool, id_: Any) -> None:
        if self.negotiated:
            self._out += error_reply(
                COMMAND_NOT_FOUND, "Capabilities negotiation is already complete, command ignored",
                has_id, id_)
            return
        problem = check_arguments(CommandSpec({"enable": Param("array", False)}), args)
        if problem is None:
            for cap in args.get("enable", []):
                problem = f"Capability '{cap}' not available"
                break
        if problem is not None:
            self._out += error_reply(GENERIC_ERROR, problem, has_id, id_)
            return
        self.negotiated = True
        msg: dict[str, Any] = {"return": {}}
        if has_id:
            msg["id"] = id_
        self._out += encode(msg)


def check_arguments(spec: CommandSpec, args: dict[str, Any]) -> str | None:
    """QEMU's wording for a missing, mistyped or unexpected parameter."""
    for key in args:
        if key not in spec.params:
            return f"Parameter '{key}' is unexpected"
    for key, param in spec.params.items():
        if key not in args:
            if param.required:
                return f"Parameter '{key}' is missing"
            continue
        value = args[key]
        ok = isinstance(value, _JSON_TYPES[param.type])
        if param.type in ("int", "number") and isinstance(value, bool):
            ok = False
        if not ok:
            return f"Invalid parameter type for '{key}', expected: {_TYPE_WORDS[param.type]}"
    return None
