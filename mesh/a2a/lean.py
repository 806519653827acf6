"""The lean SendMessage: a blocking SendMessage over NATS without a2a-sdk's per-request machinery.

a2a-sdk answers SendMessage through an active task, an event queue with its locks, a consumer
and one task-store write per event (submitted, artifact, completed): ~55% of an agent's CPU per
request and three KV round trips on the reply's path (bench/README.md). For the requests that
need none of it — a new task, answered at once by a deterministic handler — `LeanSend` runs the
agent's answer directly, builds the final Task once, writes it to the task store once, and
returns its JSON (made once, for the reply and the stored record alike); `mesh.a2a.dispatch`
frames it exactly as it frames the SDK's Task.

Eligibility (`eligible`), everything else goes to the SDK's handler unchanged:

* the method is `SendMessage` (never streaming) and the request came over NATS (only
  `NatsBinding` hands a `LeanSend` to the dispatch; HTTP, REST and gRPC never use it);
* the request has no `configuration` (so no push config, no `returnImmediately`, no
  `historyLength`, no output modes), no `metadata` and no `tenant`;
* its message has no `taskId` (no follow-up to a task the SDK must load) and no
  `referenceTaskIds` or `extensions`, is from `ROLE_USER`, and has at least one part and no empty
  text part (what the SDK's `new_task_from_user_message` requires);
* the handler does not validate input modes (the SDK's default);
* the answerer says it answers at once (`Answerer.immediate`, given the message's metadata:
  the agent's rules brain, an events-only agent's rejection, or a model call the tenant's quota
  refuses at once). A model brain takes seconds, so the SDK's `working` state and its store
  writes are worth keeping there.

A request whose JSON is in the one canonical form (camelCase members, the role by name, numbers
a double holds: what every mesh client sends) is read straight from its JSON (`LeanSend.parse`,
`LeanRequest`): no protobuf message is made of it, and the agent decodes the handler's typed
input from the JSON (mesh.agent; where a protobuf map's member order could show, in the handler's
input or an error's text, the data is put in the SDK path's order first). Any other eligible
request is parsed into protobuf first, as before.

What it keeps from the SDK path, by running the same code: JSON-RPC validation, the A2A-Version
check, params parsing and the error mapping (`dispatch`); authentication (the binding, before the
dispatch); required extensions and messageId idempotency (`MeshRequestHandler.send_once`, the
same de-duplication map both paths share); the agent's answer and its vote signature
(`mesh.agent`, the same function the SDK executor calls). The SDK's required-field check runs
at the same point as on the SDK path, on a cached plan of the fields that can fail it (the SDK's
walks every Struct value by reflection); when something is missing, the SDK's own check raises
its error.

What differs, by design: the task store gets one write (the final task) instead of one per
state, and no `TaskEvent` rides with it; a2a-sdk's own request-handler spans (its
`trace_class`) are not made, the agent's `invoke_agent` span is; the reply is sent after that
write is acknowledged (docs/bindings.md, "What is durable when"). MESH_A2A_LEAN=0
(`Settings.a2a_lean`) turns the lean path off.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from a2a.helpers import get_data_parts, get_message_text
from a2a.server.cluster import TaskVersion, VersionedEvent
from a2a.server.context import ServerCallContext
from a2a.types import (
    Artifact,
    Message,
    Part,
    Role,
    SendMessageRequest,
    Task,
    TaskState,
    TaskStatus,
)
from a2a.utils.proto_utils import validate_proto_required_fields
from google.api.field_behavior_pb2 import (  # type: ignore[import-untyped]
    FieldBehavior,
    field_behavior,
)
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.struct_pb2 import Struct, Value

from mesh.a2a.dispatch import PARAMS_JSON
from mesh.a2a.taskstore import JetStreamTaskStore
from mesh.a2a.wire import struct_value

if TYPE_CHECKING:
    from mesh.a2a.handler import MeshRequestHandler


@dataclass(slots=True)
class Outcome:
    """What the agent answered a message: the task's final state, the parts of the status
    message (a rejection's or failure's reason; none on success) and the artifact, if any."""

    state: TaskState
    reason: list[Part] = field(default_factory=list)
    artifact_parts: list[Part] = field(default_factory=list)
    artifact_name: str = ""
    artifact_metadata: dict[str, Any] | None = None


# `LeanMessage.data` when the message has no data part.
NO_DATA: Any = object()


@dataclass(slots=True)
class LeanMessage:
    """What the agent reads of a new task's user message, in the forms the SDK path reads them:
    `metadata` as `dict(message.metadata)` gives it (numbers floats, nested objects `Struct`s),
    `data` the first data part as `a2a.helpers.get_data_parts` gives it (or `NO_DATA`), `text`
    the text parts as `get_message_text` joins them."""

    message_id: str
    context_id: str
    task_id: str
    metadata: Mapping[str, Any]
    data: Any
    text: str
    # Whether `data`'s objects keep the request's member order. A protobuf Struct is a map: the
    # SDK path's objects come in its hash order instead (which the agent must reproduce where
    # the order can show: `in_protobuf_order`).
    json_order: bool = False

    def in_protobuf_order(self) -> Any:
        """`data` with its objects' members in the order the SDK path's `get_data_parts` gives."""
        if not self.json_order or self.data is NO_DATA:
            return self.data
        return MessageToDict(ParseDict(self.data, Value()))

    @classmethod
    def of(cls, message: Message) -> LeanMessage:
        """The view of a protobuf message (the SDK path's, and a lean request parsed by it)."""
        found = get_data_parts(message.parts)
        return cls(
            message_id=message.message_id,
            context_id=message.context_id,
            task_id=message.task_id,
            metadata=dict(message.metadata),
            data=found[0] if found else NO_DATA,
            text=get_message_text(message),
        )


class Answerer(Protocol):
    """The agent side of the lean path (mesh.agent implements it)."""

    def immediate(self, metadata: Mapping[str, Any]) -> bool:
        """Whether a message with this metadata is answered at once (no intermediate task
        states)."""
        ...

    def answer(self, message: LeanMessage, context: ServerCallContext) -> Awaitable[Outcome]:
        """The outcome of `message` (its taskId and contextId set), under the same span and
        with the same signature as the SDK path."""
        ...


@dataclass(slots=True)
class LeanRequest:
    """A SendMessage's params taken straight from the request's JSON (`LeanSend.parse`), for
    the requests whose JSON is in the one canonical form this reads exactly as json_format's
    `ParseDict` would: no protobuf message is made of it (the data part's `Struct` was most of
    the request's parse cost, bench/README.md)."""

    tenant: ClassVar[str] = ""  # eligible requests have none (dispatch reads it)
    message_id: str
    context_id: str  # as given ("" for a new context)
    metadata: dict[str, Any] | None  # struct-valued (`wire.struct_value`), None when absent
    parts: list[dict[str, Any]]  # as `MessageToDict` prints them (`_part_json`)

    def skeleton(self) -> SendMessageRequest:
        """The fields the messageId de-duplication reads (`MeshRequestHandler.send_once`)."""
        message = Message(
            message_id=self.message_id, context_id=self.context_id, role=Role.ROLE_USER
        )
        return SendMessageRequest(message=message)

    def view(self, task_id: str, context_id: str) -> LeanMessage:
        data = NO_DATA
        texts = []
        for part in self.parts:
            if "data" in part:
                if data is NO_DATA:
                    data = part["data"]
            else:
                texts.append(part["text"])
        metadata: dict[str, Any] = {}
        if self.metadata:
            struct = Struct()
            struct.update(self.metadata)
            metadata = dict(struct)
        text = "\n".join(texts)
        return LeanMessage(self.message_id, context_id, task_id, metadata, data, text, True)

    def history(self, task_id: str, context_id: str) -> dict[str, Any]:
        """`MessageToDict` of the message with the task's ids set."""
        out: dict[str, Any] = {
            "messageId": self.message_id,
            "contextId": context_id,
            "taskId": task_id,
            "role": "ROLE_USER",
            "parts": self.parts,
        }
        if self.metadata is not None:
            out["metadata"] = self.metadata
        return out


class LeanSend:
    """The lean blocking SendMessage of one server (see the module doc)."""

    def __init__(self, handler: MeshRequestHandler, answerer: Answerer) -> None:
        self.handler = handler
        self.answerer = answerer
        # The JSON of the tasks `_run` made, until `send` replies with it (made once, for the
        # store and the reply).
        self._rendered: dict[str, dict[str, Any]] = {}

    def parse(self, params: Any) -> LeanRequest | None:
        """The lean request of a SendMessage's JSON `params`, when it is eligible (the module
        doc's rules) and in the canonical form `LeanRequest` reads exactly as `ParseDict`
        would (camelCase members, the role's name, no null where a message goes, numbers a
        double holds); None: parse it into protobuf as every other request."""
        if type(params) is not dict or params.keys() != {"message"}:
            return None
        if self.handler.validates_input_modes:
            return None
        message = params["message"]
        if type(message) is not dict or not message.keys() <= _MESSAGE_KEYS:
            return None
        message_id, parts = message.get("messageId"), message.get("parts")
        context_id = message.get("contextId", "")
        if type(message_id) is not str or not message_id or message.get("role") != "ROLE_USER":
            return None
        if type(context_id) is not str or type(parts) is not list or not parts:
            return None
        metadata = message.get("metadata")
        if metadata is not None and type(metadata) is not dict:
            return None
        if not self.answerer.immediate(metadata or {}):
            return None
        try:
            rendered = [_part_json(part) for part in parts]
            if metadata is not None:
                metadata = struct_value(metadata)
        except (ValueError, TypeError):
            return None
        return LeanRequest(message_id, context_id, metadata, rendered)

    def eligible(self, params: SendMessageRequest | LeanRequest) -> bool:
        """Whether `params` may take the lean path (the module doc lists the rules)."""
        if isinstance(params, LeanRequest):
            return True  # `parse` checked it
        if (
            params.HasField("configuration")
            or params.HasField("metadata")
            or params.tenant
            or self.handler.validates_input_modes
        ):
            return False
        message = params.message
        if (
            message.task_id
            or message.reference_task_ids
            or message.extensions
            or message.role != Role.ROLE_USER
            or not message.parts
        ):
            return False
        for part in message.parts:
            if part.HasField("text") and not part.text:
                return False
        return self.answerer.immediate(dict(message.metadata))

    async def send(
        self, params: SendMessageRequest | LeanRequest, context: ServerCallContext
    ) -> dict[str, Any]:
        """SendMessage for an eligible request, as the JSON-RPC `result`: idempotent by messageId
        exactly as the SDK path (one map for both), then `_run`."""
        if isinstance(params, LeanRequest):
            request = params

            async def run(_: SendMessageRequest, context: ServerCallContext) -> Task:
                return await self._run_json(request, context)

            sent = await self.handler.send_once(params.skeleton(), context, run)
        else:
            sent = await self.handler.send_once(params, context, self._checked)
        if isinstance(sent, Message):  # a repeat of a message the SDK path answered with one
            return {"message": MessageToDict(sent)}
        rendered = self._rendered.pop(sent.id, None)
        if rendered is not None:
            return {"task": rendered}
        if not sent.history:
            # A concurrent repeat of a lean JSON request: its Task carries no history (the
            # store's record has it, as a repeat that comes later reads it).
            stored = await self.handler.task_store.get(sent.id, context)
            latest = getattr(stored, "task", stored)  # a versioned store wraps it
            if isinstance(latest, Task):
                sent = latest
        return {"task": MessageToDict(sent)}

    async def _checked(self, params: SendMessageRequest, context: ServerCallContext) -> Task:
        # Where the SDK checks them (its `validate_request_params`, inside `on_message_send`):
        # after the required extensions and the de-duplication, so a request broken twice gets
        # the same error on both paths.
        if not _required_fields_set(params):
            validate_proto_required_fields(params)  # raises the SDK's own error for it
        return await self._run(params, context)

    async def _run(self, params: SendMessageRequest, context: ServerCallContext) -> Task:
        task_id = str(uuid.uuid4())
        context_id = params.message.context_id or str(uuid.uuid4())
        message = Message()
        message.CopyFrom(params.message)
        message.task_id = task_id
        message.context_id = context_id
        outcome = await self.answerer.answer(LeanMessage.of(message), context)
        task = _task(task_id, context_id, outcome)
        # The task's JSON, made once: the reply and the stored record both carry it. Its
        # history is the request's message: rendered from the request's own JSON where that
        # prints as `MessageToDict` would (`_history_json`), as the largest part of the reply
        # (it echoes the payload) was most of the printing's cost (bench/README.md).
        rendered = MessageToDict(task)
        rendered["history"] = [
            _history_json(context.state.get(PARAMS_JSON), task_id, context_id)
            or MessageToDict(message)
        ]
        task.history.append(message)
        return await self._store(task, rendered, context)

    async def _run_json(self, request: LeanRequest, context: ServerCallContext) -> Task:
        task_id = str(uuid.uuid4())
        context_id = request.context_id or str(uuid.uuid4())
        outcome = await self.answerer.answer(request.view(task_id, context_id), context)
        task = _task(task_id, context_id, outcome)
        rendered = MessageToDict(task)
        history = request.history(task_id, context_id)
        rendered["history"] = [history]
        if not isinstance(self.handler.versioned_store, JetStreamTaskStore):
            # Other stores keep the protobuf task: give it its history (JetStream's stores the
            # JSON, history included, and a repeat reads it from there).
            task.history.append(ParseDict(history, Message()))
        return await self._store(task, rendered, context)

    async def _store(
        self, task: Task, rendered: dict[str, Any], context: ServerCallContext
    ) -> Task:
        store = self.handler.versioned_store
        # One write, the final task, acknowledged before the reply goes (docs/bindings.md).
        if isinstance(store, JetStreamTaskStore):
            version = await store.create(task, rendered, context)
        else:
            version = await store.save(
                task, event=None, prev=None, prev_version=TaskVersion.MISSING, context=context
            )
        stream = self.handler.event_stream
        if stream is not None:  # SubscribeToTask on other replicas (a no-op for JetStream's)
            await stream.publish(task.id, VersionedEvent(event=task, version=version))
        if len(self._rendered) >= _RENDERED_MAX:  # only a caller cancelled mid-way leaves one
            self._rendered.clear()
        self._rendered[task.id] = rendered
        return task


def _task(task_id: str, context_id: str, outcome: Outcome) -> Task:
    """The final task of `outcome`, without its history."""
    status = TaskStatus(state=outcome.state)
    if outcome.reason:
        status.message.CopyFrom(
            Message(
                role=Role.ROLE_AGENT,
                task_id=task_id,
                context_id=context_id,
                message_id=str(uuid.uuid4()),
                parts=outcome.reason,
            )
        )
    # As a2a-sdk's TaskUpdater stamps it (`FromDatetime(datetime.now(UTC))`): microseconds,
    # UTC; without protobuf's `timegm` of a time tuple.
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    status.timestamp.seconds = seconds
    status.timestamp.nanos = micros * 1000
    task = Task(id=task_id, context_id=context_id, status=status)
    if outcome.artifact_parts:
        task.artifacts.append(
            Artifact(
                artifact_id=str(uuid.uuid4()),
                name=outcome.artifact_name,
                parts=outcome.artifact_parts,
                metadata=outcome.artifact_metadata,
            )
        )
    return task


_RENDERED_MAX = 1024

# What `MessageToDict` prints of a new task's user message, in its order (field numbers), and of
# its parts: a request whose message has anything else is printed from protobuf instead.
_MESSAGE_KEYS = frozenset({"messageId", "contextId", "role", "parts", "metadata"})
_PART_KEYS = ("text", "data", "metadata", "filename", "mediaType")


def _history_json(params: Any, task_id: str, context_id: str) -> dict[str, Any] | None:
    """`MessageToDict` of the request's message with `task_id` and `context_id` set, made from
    the request's JSON `params` (numbers as doubles, as protobuf's Struct holds them); None when
    the JSON is not in the one canonical form this reproduces exactly (then print the message)."""
    message = params.get("message") if isinstance(params, dict) else None
    if not isinstance(message, dict) or not message.keys() <= _MESSAGE_KEYS:
        return None
    message_id, role, parts = message.get("messageId"), message.get("role"), message.get("parts")
    if not isinstance(message_id, str) or not message_id or role != "ROLE_USER":
        return None
    if not isinstance(parts, list) or not parts:
        return None
    given_context = message.get("contextId", "")
    if not isinstance(given_context, str) or (given_context and given_context != context_id):
        return None
    out: dict[str, Any] = {
        "messageId": message_id,
        "contextId": context_id,
        "taskId": task_id,
        "role": role,
    }
    try:
        out["parts"] = [_part_json(part) for part in parts]
        if "metadata" in message and message["metadata"] is not None:
            if not isinstance(message["metadata"], dict):
                return None
            out["metadata"] = struct_value(message["metadata"])
    except (ValueError, TypeError):
        return None
    return out


def _part_json(part: Any) -> dict[str, Any]:
    if not isinstance(part, dict) or not part.keys() <= set(_PART_KEYS):
        raise ValueError("not a part this renders")
    if ("text" in part) == ("data" in part):  # exactly one content (eligible: no raw, no url)
        raise ValueError("not one content")
    out: dict[str, Any] = {}
    for key in _PART_KEYS:
        if key not in part:
            continue
        value = part[key]
        if key == "data":
            out[key] = struct_value(value)
        elif key == "metadata":
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ValueError("metadata not an object")
            out[key] = struct_value(value)
        elif isinstance(value, str):
            if value:  # an empty string is the default: not printed
                out[key] = value
            elif key == "text":
                raise ValueError("empty text")
        else:
            raise ValueError(f"{key} not a string")
    return out


@functools.cache
def _plan(desc: Descriptor) -> tuple[tuple[FieldDescriptor, ...], tuple[FieldDescriptor, ...]]:
    """(the REQUIRED fields of `desc`, its message fields whose type has REQUIRED fields
    somewhere below): a2a-sdk's `validate_proto_required_fields` walks every field of every
    message, the data parts' Structs included, by reflection; the answer only depends on these."""
    required = tuple(
        f
        for f in desc.fields
        if FieldBehavior.REQUIRED in f.GetOptions().Extensions[field_behavior]
    )
    below = tuple(
        f
        for f in desc.fields
        if f.type == FieldDescriptor.TYPE_MESSAGE and _reaches_required(f.message_type, set())
    )
    return required, below


def _reaches_required(desc: Descriptor, seen: set[str]) -> bool:
    if desc.full_name in seen:
        return False
    seen.add(desc.full_name)
    for f in desc.fields:
        if FieldBehavior.REQUIRED in f.GetOptions().Extensions[field_behavior]:
            return True
        if f.type == FieldDescriptor.TYPE_MESSAGE and _reaches_required(f.message_type, seen):
            return True
    return False


def _required_fields_set(msg: ProtoMessage) -> bool:
    """True when `validate_proto_required_fields(msg)` would find nothing to complain about
    (the same rules, on the fields `_plan` keeps); False: let it say what is missing."""
    required, below = _plan(msg.DESCRIPTOR)
    for f in required:
        value = getattr(msg, f.name)
        if _repeated(f):
            if not value:
                return False
        elif f.has_presence:
            if not msg.HasField(f.name):
                return False
        elif value == f.default_value:
            return False
    for f in below:
        value = getattr(msg, f.name)
        if not _repeated(f):
            if msg.HasField(f.name) and not _required_fields_set(value):
                return False
        elif f.message_type.GetOptions().map_entry:
            items = [v for v in value.values() if isinstance(v, ProtoMessage)]
            if not all(_required_fields_set(v) for v in items):
                return False
        elif not all(_required_fields_set(v) for v in value):
            return False
    return True


def _repeated(field: FieldDescriptor) -> bool:
    is_repeated = getattr(field, "is_repeated", None)  # protobuf >= 6.31
    if is_repeated is not None:
        return bool(is_repeated)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)
