"""A bounded pool of asyncio tasks: the one way the mesh runs concurrent work per message.

Used wherever messages arrive faster than they may be worked on (the coordinator's events,
event-driven agents, JetStream advisories, A2A requests over NATS). The pool says how many
slots are free without reaching into `asyncio.Semaphore`'s private counter, and drains on stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskPool:
    """At most `size` tasks at once. `spawn` waits for a slot; `drain` waits for the rest."""

    def __init__(self, size: int, *, name: str = "tasks") -> None:
        if size < 1:
            raise ValueError("a task pool needs at least one slot")
        self.size = size
        self.name = name
        self._slots = asyncio.Semaphore(size)
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        """Tasks running now."""
        return len(self._tasks)

    @property
    def free(self) -> int:
        """Slots free right now (a task holds its slot until it has finished)."""
        return self.size - len(self._tasks)

    async def wait_free(self, timeout: float) -> bool:
        """Until at least one slot is free (True), or `timeout` passed (False)."""
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout)
        except TimeoutError:
            return False
        self._slots.release()
        return True

    async def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Start `coro` in its own task once a slot is free; the slot is freed when it ends."""
        try:
            await self._slots.acquire()
        except BaseException:
            coro.close()  # never started: do not leave a "never awaited" coroutine behind
            raise
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            # Work is expected to handle its own errors; one that escapes is a bug to see.
            log.error("%s: a task failed", self.name, exc_info=task.exception())

    async def drain(self, timeout: float) -> set[asyncio.Task[Any]]:
        """Wait (bounded) for running tasks; returns the ones still running at the end."""
        if not self._tasks:
            return set()
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        return pending

    async def cancel(self) -> None:
        """Cancel what still runs and wait for it to unwind."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
