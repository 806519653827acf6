"""The client's fast path for a blocking SendMessage over NATS: JSON in and out with msgspec.

The typed path (`AgentClient.send`) prints the request from protobuf and parses the whole reply
into a protobuf `Task` — history included, which echoes the request's payload — with
`json_format`: ~0.9 ms of a coordinator's CPU per 3-voter decision (bench/README.md). This module
builds the same request JSON with msgspec (`OutgoingMessage`, `data_part`) and reads from the
reply only what a caller of `verdict_of`, `artifact_metadata`, `status_time` and
`votes.signed_output` reads (`TaskView`); the protobuf `Task` is parsed only if someone asks for
it (`TaskView.task`).

Same answers as the typed path, by construction:

* numbers in data parts and metadata are doubles on the typed path (protobuf `Value`/`Struct`):
  the view makes every integer a float as `MessageToDict` would, and the request's data part
  carries them the same way, so both paths send and read equal JSON values;
* anything the view does not model exactly — an error answer, a Message instead of a Task, a
  part with two contents, an unknown or numeric state, a bad timestamp, a number that does not
  fit a double or is not finite, a field of the wrong type — makes `read_send_reply` answer
  None, and the caller parses the same bytes on the typed path (same result, same error).

What the view does not check that the typed path did: fields nobody reads (the task's history,
the status message's other fields, artifact names and ids) are skipped, not validated, so a reply
whose history alone is malformed is read here and refused by the typed path.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

import msgspec
from a2a.types import Task, TaskState
from a2a.utils.proto_utils import parse_lenient
from google.protobuf.timestamp_pb2 import Timestamp
from msgspec import UNSET, UnsetType

from mesh.errors import MeshError
from mesh.verdict import Verdict

__all__ = ["OutgoingMessage", "TaskView", "data_part", "read_send_reply", "struct_value"]

_COMPLETED = TaskState.TASK_STATE_COMPLETED
_STATES: dict[str, int] = {name: int(TaskState.Value(name)) for name in TaskState.keys()}  # noqa: SIM118


class OutgoingMessage(msgspec.Struct, omit_defaults=True, rename="camel"):
    """A user Message as the A2A JSON carries it (what `MessageToDict(Message)` prints).

    `parts` holds `data_part` results (pre-encoded JSON) or part objects; `metadata` must hold
    what `struct_value` returns (numbers as doubles)."""

    message_id: str
    role: str
    parts: list[Any]
    metadata: dict[str, Any] | None = None
    task_id: str = ""
    context_id: str = ""


class _Unusual(MeshError):
    """Something the view does not model: the caller takes the typed path (never leaves this
    module; a MeshError all the same, as every exception class here is)."""


def struct_value(value: Any) -> Any:
    """`value` as it comes out of a protobuf `Value` (`MessageToDict(Value(value))`): every
    number a float; ValueError for what a `Value` cannot hold or print (a non-string key, a
    non-finite number, an integer beyond a double, a type JSON lacks)."""
    try:
        return _as_value(value)
    except _Unusual as e:
        raise ValueError(f"not a protobuf Value: {e}") from None


def _as_value(v: Any) -> Any:
    t = type(v)
    if t is str or t is bool or v is None:
        return v
    if t is float:
        if not math.isfinite(v):
            raise _Unusual("a number that is not finite")
        return v
    if t is int:
        try:
            return float(v)
        except OverflowError:
            raise _Unusual("an integer beyond a double") from None
    if t is dict:
        out = {}
        for k, x in v.items():
            if type(k) is not str:
                raise _Unusual("a key that is not a string")
            out[k] = _as_value(x)
        return out
    if t is list:
        return [_as_value(x) for x in v]
    raise _Unusual(f"a {t.__name__}")


_enc = msgspec.json.Encoder()


def data_part(data: Any, media_type: str = "application/json") -> msgspec.Raw:
    """A data Part's JSON, encoded once (to go in many requests' `parts`): what
    `MessageToDict(new_data_part(to_builtins(data), media_type))` prints. ValueError for data a
    protobuf `Value` cannot carry (`struct_value`)."""
    value = struct_value(msgspec.to_builtins(data))
    return msgspec.Raw(_enc.encode({"data": value, "mediaType": media_type}))


# -- the reply ----------------------------------------------------------------------------------
# The form every A2A server stamps (RFC 3339, UTC, up to nanoseconds): read without `strptime`
# (what protobuf's `Timestamp.FromJsonString` uses: ~20 µs a reply).
_UTC_STAMP = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?Z")


def _timestamp(text: Any) -> float:
    """`Timestamp.FromJsonString(text).ToDatetime(tzinfo=UTC).timestamp()`: the same float (the
    datetime holds microseconds, truncated), `_Unusual` where protobuf raises ValueError."""
    match = _UTC_STAMP.fullmatch(text) if isinstance(text, str) else None
    if match is not None:
        y, mo, d, h, mi, sec, frac = match.groups()
        micros = int((frac or "0").ljust(9, "0")) // 1000
        try:
            when = datetime(int(y), int(mo), int(d), int(h), int(mi), int(sec), micros, UTC)
            return float(when.timestamp())
        except ValueError:
            pass  # let protobuf say what it makes of it
    ts = Timestamp()
    try:
        ts.FromJsonString(text)
    except ValueError:
        raise _Unusual("timestamp") from None
    return float(ts.ToDatetime(tzinfo=UTC).timestamp())


class _Part(msgspec.Struct):
    # The four contents of a Part (a oneof): presence matters, not the value (but `text`'s).
    text: str | UnsetType | None = UNSET
    raw: Any = UNSET
    url: Any = UNSET
    data: Any = UNSET


class _Message(msgspec.Struct):
    parts: list[_Part] | None = None


class _Status(msgspec.Struct):
    state: str | int | None = None
    message: _Message | None = None
    timestamp: str | None = None


class _Artifact(msgspec.Struct):
    parts: list[_Part] | None = None
    metadata: dict[str, Any] | None = None


class _Task(msgspec.Struct):
    id: str | None = None
    status: _Status | None = None
    artifacts: list[_Artifact] | None = None


class _Result(msgspec.Struct):
    task: _Task | UnsetType | None = UNSET
    message: Any = UNSET


class _Reply(msgspec.Struct):
    # As jsonrpc.parse_response types the envelope, so a reply it refuses is refused here too.
    jsonrpc: str = "2.0"
    id: str | int | None = None
    result: _Result | None = None
    error: Any = None


_reply_dec = msgspec.json.Decoder(_Reply)


class TaskView:
    """What a SendMessage reply's Task says that the coordinator reads; `task()` is the whole
    protobuf Task (parsed on first use)."""

    __slots__ = (
        "_body",
        "_task",
        "data",
        "data_metadata",
        "first_metadata",
        "id",
        "state",
        "status_texts",
        "status_time",
    )

    def __init__(self, task: _Task, body: bytes) -> None:
        self._body = body
        self._task: Task | None = None
        self.id = task.id or ""
        status = task.status or _Status()
        state = status.state
        if state is None:
            self.state = 0
        elif isinstance(state, str) and state in _STATES:
            self.state = _STATES[state]
        else:
            raise _Unusual("state")
        texts: list[str] = []
        for part in _parts(status.message.parts if status.message is not None else None):
            if isinstance(part.text, str):
                texts.append(part.text)
        self.status_texts = texts
        self.status_time: float | None = None
        if status.timestamp is not None:
            self.status_time = _timestamp(status.timestamp)
        # What MessageToDict(artifact.metadata) gives: the first artifact's, and the one of the
        # artifact whose data part is the first (the answer and its signature).
        self.first_metadata: dict[str, Any] = {}
        self.data: Any = UNSET
        self.data_metadata: dict[str, Any] = {}
        for i, artifact in enumerate(task.artifacts or ()):
            meta = _as_value(artifact.metadata) if artifact.metadata is not None else {}
            if i == 0:
                self.first_metadata = meta
            for part in _parts(artifact.parts):
                if part.data is not UNSET:
                    value = _as_value(part.data)
                    if self.data is UNSET:
                        self.data, self.data_metadata = value, meta

    def task(self) -> Task:
        """The reply's Task as protobuf (what the typed path returns), parsed once."""
        if self._task is None:
            result = msgspec.json.decode(self._body)["result"]
            self._task = parse_lenient(result["task"], Task())
        return self._task

    @property
    def state_name(self) -> str:
        return str(TaskState.Name(self.state))  # type: ignore[arg-type]

    @property
    def status_text(self) -> str:
        return " ".join(self.status_texts)

    def verdict(self) -> Verdict:
        """As `verdict_of` reads a Task."""
        if self.state != _COMPLETED:
            detail = self.status_text
            raise ValueError(f"task ended {self.state_name}" + (f": {detail}" if detail else ""))
        if self.data is UNSET:
            raise ValueError("completed task has no verdict data part")
        return msgspec.convert(self.data, Verdict, strict=False)

    def __repr__(self) -> str:
        return f"TaskView(id={self.id!r}, state={self.state_name})"


def _parts(parts: list[_Part] | None) -> list[_Part]:
    if not parts:
        return []
    for part in parts:
        present = (
            (part.text is not UNSET)
            + (part.raw is not UNSET)
            + (part.url is not UNSET)
            + (part.data is not UNSET)
        )
        if present > 1:
            raise _Unusual("a part with two contents")
    return parts


def read_send_reply(body: bytes) -> TaskView | None:
    """The Task of a SendMessage reply, read without protobuf; None when the reply is anything
    else (an error, a Message, something the view does not model): parse it the typed way."""
    try:
        reply = _reply_dec.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    result = reply.result
    if reply.error is not None or result is None or result.message is not UNSET:
        return None
    if not isinstance(result.task, _Task):
        return None
    try:
        return TaskView(result.task, body)
    except _Unusual:
        return None
