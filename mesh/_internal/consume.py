"""The one bounded pull-consume loop: fetch only what there is room to start, start each message
in a `TaskPool` slot, and drain on stop.

Used by the coordinator (its durable on MESH_EVENTS) and by every `@agent.on_event` handler.
Asking for no more than the free slots matters: a fetched message's ack deadline is already
running, and one left waiting in a local queue could be redelivered to another replica while
this one still holds it. A handler that has to wait for room after the fetch (the coordinator's
admission) keeps its message in progress (+WPI) rather than nak'ing it: a nak spends one of the
message's deliveries, and enough of them end it in the dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from mesh._internal.tasks import TaskPool

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

log = logging.getLogger(__name__)

M = TypeVar("M")

FETCH_TIMEOUT_S = 0.5  # one pull's lifetime: also how long a stop may wait to be noticed
ERROR_PAUSE_S = 0.2  # after a failed fetch (reconnecting, stream leader change)
BATCH_MAX = 64  # the most messages one pull asks for


class PullLoop(Generic[M]):
    """`fetch(batch, timeout)` → messages (TimeoutError: none came); `handle(msg)` is started
    once per message in the pool and must settle (ack/nak/term) the message itself."""

    def __init__(
        self,
        fetch: Callable[[int, float], Awaitable[list[M]]],
        handle: Callable[[M], Coroutine[Any, Any, None]],
        *,
        concurrency: int,
        name: str,
        drain_s: float,
        fetch_timeout_s: float = FETCH_TIMEOUT_S,
        error_pause_s: float = ERROR_PAUSE_S,
        batch_max: int = BATCH_MAX,
    ) -> None:
        self.fetch = fetch
        self.handle = handle
        self.name = name
        self.pool = TaskPool(concurrency, name=name)
        self.drain_s = drain_s  # read when the loop stops, so a caller may change it until then
        self.fetch_timeout_s = fetch_timeout_s
        self.error_pause_s = error_pause_s
        self.batch_max = batch_max

    @property
    def inflight(self) -> int:
        """Messages being handled right now."""
        return len(self.pool)

    async def run(self, stop: asyncio.Event) -> set[asyncio.Task[Any]]:
        """Consume until `stop` is set, then wait (at most `drain_s`) for what was started.

        Returns the handlers still running after the drain; the caller decides whether to
        cancel them or let them finish on their own.
        """
        try:
            await self._consume(stop)
        finally:
            late = await self.pool.drain(self.drain_s)
        if late:
            log.warning(
                "%s: %d handler(s) still running after %.0fs", self.name, len(late), self.drain_s
            )
        return late

    async def _consume(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not await self.pool.wait_free(self.fetch_timeout_s):
                continue  # all busy: look at the stop flag again
            # Only this loop spawns into the pool, so the slots counted here stay free below.
            batch = min(self.batch_max, self.pool.free)
            try:
                msgs = await self.fetch(batch, self.fetch_timeout_s)
            except TimeoutError:  # nothing to do (nats.errors.TimeoutError is one too)
                continue
            except Exception as e:  # reconnecting, leader change: try again shortly
                log.warning("%s: fetch failed: %s", self.name, e)
                # asyncio.timeout: 3.11's wait_for can swallow a cancel landing as `stop` is set.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.error_pause_s):
                        await stop.wait()
                continue
            for msg in msgs:  # started even when stopping: they were already delivered to us
                await self.pool.spawn(self.handle(msg))


class JetStreamFetch:
    """A durable pull subscription's `fetch` for a `PullLoop`: one message when the consumer had
    none ready, a batch of what it has ready otherwise.

    Why not `psub.fetch(batch)` as it is: nats-py's fetch of more than one message whose pull
    began with nothing ready hands back the first message only when a second one comes, the
    batch is full or the pull expires. The first event after a quiet spell waited for the next
    one: at 20 events/s every other event of a burst was ~50 ms late (bench/README.md, "Noisy
    neighbour"). A pull of one returns as its message arrives. Each message says how many the
    consumer held behind it (`num_pending`); when that is more than none, the next pull asks
    for them all at once (up to the loop's room), so a backlog still goes in batches."""

    def __init__(self, psub: JetStreamContext.PullSubscription) -> None:
        self.psub = psub
        self.ready = 0  # what the consumer held behind the last message fetched

    async def __call__(self, batch: int, timeout: float) -> list[Msg]:
        want = min(batch, self.ready) if self.ready else 1
        self.ready = 0  # unknown until a message says (a failed or empty pull says nothing)
        msgs = await self.psub.fetch(want, timeout=timeout)
        if msgs:
            self.ready = msgs[-1].metadata.num_pending or 0
        return msgs
