"""The lean SendMessage: a blocking SendMessage over NATS without a2a-sdk's per-request machinery.

a2a-sdk answers SendMessage through an active task, an event queue with its locks, a consumer
and one task-store write per event (submitted, artifact, completed): ~55% of an agent's CPU per
request and three KV round trips on the reply's path (bench/README.md). For the requests that
need none of it — a new task, answered at once by a deterministic handler — `LeanSend` runs the
agent's answer directly, builds the final Task once, writes it to the task store once, and
returns it; `mesh.a2a.dispatch` encodes it exactly as it encodes the SDK's Task.

Eligibility (`eligible`), everything else goes to the SDK's handler unchanged:

* the method is `SendMessage` (never streaming) and the request came over NATS (only
  `NatsBinding` hands a `LeanSend` to the dispatch; HTTP, REST and gRPC never use it);
* the request has no `configuration` (so no push config, no `returnImmediately`, no
  `historyLength`, no output modes), no `metadata` and no `tenant`;
* its message has no `taskId` (no follow-up to a task the SDK must load) and no
  `referenceTaskIds` or `extensions`, is from `ROLE_USER`, and has at least one part and no empty
  text part (what the SDK's `new_task_from_user_message` requires);
* the handler does not validate input modes (the SDK's default);
* the answerer says it answers at once (`Answerer.immediate`: the agent's rules brain, or an
  events-only agent's rejection). A model brain takes seconds, so the SDK's `working` state and
  its store writes are worth keeping there.

What it keeps from the SDK path, by running the same code: JSON-RPC validation, the A2A-Version
check, params parsing and the error mapping (`dispatch`); authentication (the binding, before the
dispatch); required extensions and messageId idempotency (`MeshRequestHandler.send_once`, the
same de-duplication map both paths share); the proto-required-field check; the agent's answer
and its vote signature (`mesh.agent`, the same function the SDK executor calls).

What differs, by design: the task store gets one write (the final task) instead of one per
state, and no `TaskEvent` rides with it; the reply is sent after that write is acknowledged
(docs/bindings.md, "What is durable when"). MESH_A2A_LEAN=0 (`Settings.a2a_lean`) turns the
lean path off.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

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


class Answerer(Protocol):
    """The agent side of the lean path (mesh.agent implements it)."""

    def immediate(self) -> bool:
        """Whether the next message is answered at once (no intermediate task states)."""
        ...

    def answer(self, message: Message, context: ServerCallContext) -> Awaitable[Outcome]:
        """The outcome of `message` (its taskId and contextId already set), under the same
        span and with the same signature as the SDK path."""
        ...


class LeanSend:
    """The lean blocking SendMessage of one server (see the module doc)."""

    def __init__(self, handler: MeshRequestHandler, answerer: Answerer) -> None:
        self.handler = handler
        self.answerer = answerer

    def eligible(self, params: SendMessageRequest) -> bool:
        """Whether `params` may take the lean path (the module doc lists the rules)."""
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
        return self.answerer.immediate()

    async def send(self, params: SendMessageRequest, context: ServerCallContext) -> Task | Message:
        """SendMessage for an eligible request: idempotent by messageId exactly as the SDK path
        (one map for both), then `_run`."""
        validate_proto_required_fields(params)
        return await self.handler.send_once(params, context, self._run)

    async def _run(self, params: SendMessageRequest, context: ServerCallContext) -> Task:
        task_id = str(uuid.uuid4())
        context_id = params.message.context_id or str(uuid.uuid4())
        message = Message()
        message.CopyFrom(params.message)
        message.task_id = task_id
        message.context_id = context_id
        outcome = await self.answerer.answer(message, context)
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
        # As a2a-sdk's TaskUpdater stamps it: microseconds, UTC.
        status.timestamp.FromDatetime(datetime.now(UTC))
        task = Task(id=task_id, context_id=context_id, status=status, history=[message])
        if outcome.artifact_parts:
            task.artifacts.append(
                Artifact(
                    artifact_id=str(uuid.uuid4()),
                    name=outcome.artifact_name,
                    parts=outcome.artifact_parts,
                    metadata=outcome.artifact_metadata,
                )
            )
        store = self.handler.versioned_store
        # One write, the final task, acknowledged before the reply goes (docs/bindings.md).
        version = await store.save(
            task, event=None, prev=None, prev_version=TaskVersion.MISSING, context=context
        )
        stream = self.handler.event_stream
        if stream is not None:  # SubscribeToTask on other replicas (a no-op for JetStream's)
            await stream.publish(task_id, VersionedEvent(event=task, version=version))
        return task
