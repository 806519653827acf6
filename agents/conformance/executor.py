"""What the conformance agent does with a message: the A2A TCK's scenarios, by messageId prefix.

The TCK (a2aproject/a2a-tck, branch 1.0-dev, `scenarios/*.feature`) drives behaviour in band:
a message whose `messageId` starts with `tck-complete-task` completes its task, one with
`tck-input-required` parks it in INPUT_REQUIRED, and so on. Everything else (ids, contexts,
history, errors, push delivery) is the protocol's and is left to a2a-sdk and the mesh's server.
Any other messageId completes the task with an echo of the text, so the agent is also a plain
echo agent for our own wire tests; `mesh-internal-error` makes it raise (an agent bug).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

from a2a.helpers import (
    get_message_text,
    new_data_part,
    new_raw_part,
    new_task,
    new_url_part,
)
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types import Part, TaskState

log = logging.getLogger(__name__)

# The TCK's TCK_STREAMING_TIMEOUT (seconds); the resubscribe scenario must outlive 2x it.
DEFAULT_STREAMING_TIMEOUT_S = 2.0

Step = Callable[[TaskUpdater, RequestContext, EventQueue], Awaitable[None]]


def streaming_timeout() -> float:
    try:
        return float(os.environ.get("TCK_STREAMING_TIMEOUT", DEFAULT_STREAMING_TIMEOUT_S))
    except ValueError:
        return DEFAULT_STREAMING_TIMEOUT_S


class ConformanceExecutor(AgentExecutor):  # type: ignore[misc]
    """Routes each message to its scenario by messageId prefix (longest prefix first)."""

    def __init__(self, *, long_task_s: float | None = None) -> None:
        self.long_task_s = long_task_s if long_task_s is not None else 2 * streaming_timeout()
        # Long-running tasks wait on these, so a cancel ends them at once.
        self._stops: dict[str, asyncio.Event] = {}
        self._scenarios: list[tuple[str, Step]] = sorted(
            [
                ("tck-complete-task", self._complete_with_message),
                ("tck-artifact-text", _artifact(Part(text="Generated text content"))),
                ("tck-artifact-file-url", _artifact(_file_url())),
                ("tck-artifact-file", _artifact(_file())),
                ("tck-artifact-data", _artifact(new_data_part({"key": "value", "count": 42}))),
                ("tck-message-response", self._message_response),
                ("tck-input-required", self._input_required),
                ("tck-reject-task", self._reject),
                ("tck-stream-001", _streamed(Part(text="Stream hello from TCK"))),
                ("tck-stream-002", self._complete),
                ("tck-stream-003", _streamed(Part(text="Stream task lifecycle"))),
                ("tck-stream-ordering-001", _streamed(Part(text="Ordered output"))),
                ("tck-stream-artifact-text", _streamed(Part(text="Streamed text content"))),
                ("tck-stream-artifact-file", _streamed(_file())),
                ("tck-stream-artifact-chunked", self._chunked),
                ("test-resubscribe-message-id", self._long_running),
                # Not a TCK scenario: an agent that fails unexpectedly (-32603 on the wire).
                ("mesh-internal-error", self._raise),
            ],
            key=lambda pair: -len(pair[0]),
        )

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message = context.message
        if message is None or context.task_id is None or context.context_id is None:
            return
        # A follow-up that names only the task gets a fresh context id from the SDK; the
        # task's own is the real one (see REFERENCE.md, a2a-sdk pitfalls).
        context_id = context.current_task.context_id if context.current_task else context.context_id
        updater = TaskUpdater(event_queue, context.task_id, context_id)
        step = self._step(message.message_id)
        if context.current_task is None and step != self._message_response:
            # a2a-sdk wants the Task itself before any update about it.
            await event_queue.enqueue_event(
                new_task(
                    context.task_id,
                    context_id,
                    TaskState.TASK_STATE_SUBMITTED,
                    history=[message],
                )
            )
        elif context.current_task is not None and any(
            m.message_id == message.message_id for m in context.current_task.history
        ):
            # The TCK sends several follow-ups under one messageId (tck_id() is per session),
            # and a2a-sdk skips appending a message whose id the history already holds. So
            # the agent records the follow-up itself, as the message of a WORKING status; the
            # next status moves it into the history, in order.
            await updater.update_status(TaskState.TASK_STATE_WORKING, message=message)
        await step(updater, context, event_queue)

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        task = context.current_task
        task_id = task.id if task is not None else context.task_id
        if task_id is None:
            return
        stop = self._stops.get(task_id)
        if stop is not None:
            stop.set()
        context_id = task.context_id if task is not None else (context.context_id or "")
        await TaskUpdater(event_queue, task_id, context_id).cancel()

    def _step(self, message_id: str) -> Step:
        for prefix, step in self._scenarios:
            if message_id.startswith(prefix):
                return step
        return self._echo

    # -- scenarios ------------------------------------------------------------------------------
    async def _complete_with_message(
        self, updater: TaskUpdater, context: RequestContext, queue: EventQueue
    ) -> None:
        await updater.complete(updater.new_agent_message([Part(text="Hello from TCK")]))

    async def _complete(self, updater: TaskUpdater, context: RequestContext, q: EventQueue) -> None:
        await updater.complete()

    async def _message_response(
        self, updater: TaskUpdater, context: RequestContext, queue: EventQueue
    ) -> None:
        await queue.enqueue_event(updater.new_agent_message([Part(text="Direct message response")]))

    async def _input_required(
        self, updater: TaskUpdater, context: RequestContext, queue: EventQueue
    ) -> None:
        await updater.requires_input(
            updater.new_agent_message([Part(text="Input required: send a follow-up message")])
        )

    async def _reject(self, updater: TaskUpdater, context: RequestContext, q: EventQueue) -> None:
        await updater.reject(updater.new_agent_message([Part(text="rejected")]))

    async def _chunked(self, updater: TaskUpdater, context: RequestContext, q: EventQueue) -> None:
        await updater.start_work()
        artifact_id = f"{updater.task_id}-chunked"
        await updater.add_artifact([Part(text="chunk-1 ")], artifact_id=artifact_id, append=False)
        await updater.add_artifact(
            [Part(text="chunk-2")], artifact_id=artifact_id, append=True, last_chunk=True
        )
        await updater.complete()

    async def _long_running(
        self, updater: TaskUpdater, context: RequestContext, queue: EventQueue
    ) -> None:
        stop = self._stops.setdefault(updater.task_id, asyncio.Event())
        try:
            await updater.start_work()
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.long_task_s)
            except TimeoutError:
                await updater.complete()
            # Set: cancelled meanwhile; `cancel` already wrote the final status.
        finally:
            self._stops.pop(updater.task_id, None)

    async def _raise(self, updater: TaskUpdater, context: RequestContext, q: EventQueue) -> None:
        raise RuntimeError("the conformance agent was asked to fail")

    async def _echo(self, updater: TaskUpdater, context: RequestContext, q: EventQueue) -> None:
        text = get_message_text(context.message) if context.message else ""
        await updater.complete(updater.new_agent_message([Part(text=f"echo: {text}")]))


def _file() -> Part:
    return new_raw_part(b"tck", media_type="text/plain", filename="output.txt")


def _file_url() -> Part:
    return new_url_part(
        "https://example.com/output.txt", media_type="text/plain", filename="output.txt"
    )


def _artifact(part: Part) -> Step:
    async def step(updater: TaskUpdater, context: RequestContext, queue: EventQueue) -> None:
        await updater.add_artifact([part])
        await updater.complete()

    return step


def _streamed(part: Part) -> Step:
    async def step(updater: TaskUpdater, context: RequestContext, queue: EventQueue) -> None:
        await updater.start_work()
        await updater.add_artifact([part])
        await updater.complete()

    return step
