"""The request handler both transports share: a2a-sdk's, plus two things it leaves out."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from a2a.server.agent_execution import AgentExecutor
from a2a.server.cluster import TaskEventStream, VersionedTaskStore
from a2a.server.context import ServerCallContext
from a2a.server.owner_resolver import resolve_user_scope
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.tasks import TaskStore
from a2a.types import AgentCard, Message, SendMessageRequest, Task
from a2a.utils.errors import ExtensionSupportRequiredError

from mesh import subjects

_Key = tuple[str, str, str]  # (owner, messageId, contextId)


class MeshRequestHandler(DefaultRequestHandler):  # type: ignore[misc]
    """a2a-sdk's `DefaultRequestHandler`, with required extensions checked and SendMessage
    de-duplicated by messageId.

    Required extensions: a message that does not declare (in `A2A-Extensions`) an extension
    the card marks `required` gets ExtensionSupportRequiredError (A2A 1.0 §3.3.4, a MUST that
    a2a-sdk 1.3.0 does not check). Checked after the version and the params have been
    validated, and only for the methods that send a message.

    Idempotency: SendMessage with a messageId already seen returns the task it made, without
    running the agent again — so a caller's retry (or a coordinator that took over an event)
    is safe. Remembered per replica, bounded (LRU); a repeat that lands on another replica
    runs again there, which is harmless for deterministic reviewers. The key is
    (owner, messageId, contextId): the same message sent into another conversation is a new
    message there, not a repeat; and a repeat is one only from the caller who sent it first —
    another caller re-using a messageId (by chance or to fish for someone's task) gets a task
    of its own and never sees the first one. `idempotent=False` turns it off.
    """

    MAX_REMEMBERED = 10_000

    def __init__(
        self,
        executor: AgentExecutor,
        task_store: TaskStore | VersionedTaskStore,
        *,
        card: AgentCard,
        idempotent: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(executor, task_store, card, **kwargs)
        self.card = card  # our own reference: the SDK keeps its copy private
        self.idempotent = idempotent
        # Repeats of a request still running wait for it; a finished one is remembered by task
        # id only (a Task can be kilobytes, and ten thousand of them add up).
        self._running: dict[_Key, asyncio.Future[Task | Message]] = {}
        self._seen: OrderedDict[_Key, str | Message] = OrderedDict()
        self.required_extensions = [
            e.uri for e in card.capabilities.extensions if e.required and e.uri
        ]

    def _check_extensions(self, context: ServerCallContext) -> None:
        missing = [u for u in self.required_extensions if u not in context.requested_extensions]
        if missing:
            raise ExtensionSupportRequiredError(
                message=f"this agent requires the extension(s) {', '.join(missing)}: "
                f"declare them in the {subjects.H_A2A_EXTENSIONS} header"
            )

    async def on_message_send_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Any, None]:
        if self.card.capabilities.streaming:  # else the SDK answers -32004 first
            self._check_extensions(context)
        events = super().on_message_send_stream(params, context)
        try:
            async for event in events:
                yield event
        finally:
            # A stream stopped early (a caller that hung up) closes the SDK's stream at once.
            await events.aclose()

    # The lean SendMessage (mesh.a2a.lean) needs three things a2a-sdk keeps private: read here,
    # in the one subclass that adapts the SDK's handler, and nowhere else.
    @property
    def versioned_store(self) -> VersionedTaskStore:
        """The store the SDK writes tasks through (a plain store wrapped in a versioned one)."""
        return self._versioned_store  # type: ignore[no-any-return]

    @property
    def event_stream(self) -> TaskEventStream | None:
        return self._event_stream  # type: ignore[no-any-return]

    @property
    def validates_input_modes(self) -> bool:
        return bool(self._validate_input_modes)

    async def on_message_send(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> Task | Message:
        return await self.send_once(params, context, super().on_message_send)

    async def send_once(
        self,
        params: SendMessageRequest,
        context: ServerCallContext,
        run: Callable[[SendMessageRequest, ServerCallContext], Awaitable[Task | Message]],
    ) -> Task | Message:
        """SendMessage through `run` (the SDK's handler, or the lean path over NATS: one
        de-duplication map for both, so a repeat finds the first answer whichever path either
        took), after the required extensions are checked."""
        self._check_extensions(context)
        mid = params.message.message_id
        # Follow-ups to a task are never repeats.
        if not self.idempotent or not mid or params.message.task_id:
            return await run(params, context)
        # The owner, as the task stores see it (a2a-sdk's owner resolver).
        key = (resolve_user_scope(context), mid, params.message.context_id)
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        seen = self._seen.get(key)
        if seen is not None:
            self._seen.move_to_end(key)
            if isinstance(seen, Message):
                return seen
            stored = await self.task_store.get(seen, context)
            # A versioned (cluster) store wraps the task with its version.
            latest = getattr(stored, "task", stored)
            if isinstance(latest, Task):
                return latest
            # The task is gone from the store (expired): treat the message as new.
        future: asyncio.Future[Task | Message] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            result: Task | Message = await run(params, context)
        except BaseException as e:
            # A failed first attempt is not remembered: the repeat may succeed.
            future.set_exception(e)
            future.exception()  # mark retrieved; waiters re-raise it themselves
            raise
        else:
            future.set_result(result)
            self._seen[key] = result.id if isinstance(result, Task) else result
            while len(self._seen) > self.MAX_REMEMBERED:
                self._seen.popitem(last=False)
            return result
        finally:
            self._running.pop(key, None)
