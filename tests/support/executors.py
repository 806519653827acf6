"""A2A executors that tests serve: what an agent does, reduced to what a test needs to hold."""

from __future__ import annotations

import asyncio

from a2a.helpers import new_task_from_user_message, new_text_artifact
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater


class Gated(AgentExecutor):
    """Completes each task once `gate` is open (shut at first unless `open`), with one text
    artifact `text` if given; counts the tasks it started, so a test can tell a request that
    reached the handler from one refused before it."""

    def __init__(self, *, open: bool = False, text: str | None = None) -> None:
        self.gate = asyncio.Event()
        if open:
            self.gate.set()
        self.text = text
        self.started = 0

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        self.started += 1
        assert context.message is not None
        task = context.current_task or new_task_from_user_message(context.message)
        await event_queue.enqueue_event(task)
        await self.gate.wait()
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        if self.text is not None:
            await updater.add_artifact(new_text_artifact("echo", self.text).parts)
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        return None
