"""A bounded pool of asyncio tasks: the one way the mesh runs concurrent work per message.

Used wherever messages arrive faster than they may be worked on (the coordinator's events,
event-driven agents, JetStream advisories, A2A requests). The pool says how many slots are free
without reaching into `asyncio.Semaphore`'s private counter, and drains on stop.

Two ways in, for two kinds of source: `spawn` waits for a slot (a consumer that pulls, and can
simply pull later), `admit` never waits (a push source, an A2A request: past the slots and a
short `backlog` it says no at once, and the caller answers "busy" instead of piling work up).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)

_SAY_EVERY_S = 10.0  # how often, at most, a pool that turns work away logs it


class TaskPool:
    """At most `size` tasks at once. `spawn` waits for a slot; `admit` takes work only while a
    slot or one of `backlog` waiting places is free; `drain` waits for the rest."""

    def __init__(self, size: int, *, name: str = "tasks", backlog: int = 0) -> None:
        if size < 1 or backlog < 0:
            raise ValueError("a task pool needs at least one slot (and a backlog ≥ 0)")
        self.size = size
        self.backlog = backlog
        self.name = name
        self._slots = asyncio.Semaphore(size)
        self._tasks: set[asyncio.Task[Any]] = set()
        # Admitted work waiting for a slot: coroutines, not tasks, so nothing runs (or holds
        # memory beyond the request) until a slot frees; a finishing task hands its slot on.
        self._waiting: deque[Coroutine[Any, Any, Any]] = deque()
        self.refused = 0  # work `admit` turned away, in all
        self._refused_said = 0  # … of which the log has told
        self._said_at = float("-inf")

    def __len__(self) -> int:
        """Tasks running now."""
        return len(self._tasks)

    @property
    def waiting(self) -> int:
        """Admitted work waiting for a slot."""
        return len(self._waiting)

    @property
    def free(self) -> int:
        """Slots free right now (a task holds its slot until it has finished)."""
        return self.size - len(self._tasks)

    async def wait_free(self, timeout: float) -> bool:
        """Until at least one slot is free (True), or `timeout` passed (False)."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that lands as the
        # slot comes free, and the pull loop that waits here would run on after its stop.
        try:
            async with asyncio.timeout(timeout):
                await self._slots.acquire()
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
        return self._start(coro)

    async def admit(self, coro: Coroutine[Any, Any, Any]) -> bool:
        """Start `coro` now if a slot is free, or queue it behind the running tasks if fewer
        than `backlog` wait; False (and `coro` closed, never run) when neither: the pool is
        full. Never waits (a free slot is taken without suspending)."""
        if self._waiting or self._slots.locked():
            if len(self._waiting) >= self.backlog:
                coro.close()
                self._refusal()
                return False
            self._waiting.append(coro)
            return True
        await self._slots.acquire()  # free: returns at once
        self._start(coro)
        return True

    def _refusal(self) -> None:
        """Count it; say so at most every `_SAY_EVERY_S` (a flood must not flood the log)."""
        self.refused += 1
        now = asyncio.get_running_loop().time()
        if now - self._said_at >= _SAY_EVERY_S:
            log.warning(
                "%s: full (%d running, %d waiting); turned away %d since the last report",
                self.name,
                len(self._tasks),
                len(self._waiting),
                self.refused - self._refused_said,
            )
            self._said_at = now
            self._refused_said = self.refused

    def _start(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` in a slot already taken for it."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if self._waiting:
            # The slot goes straight to the oldest admitted work; tasks waiting in `spawn`
            # queue behind it (a pool is normally fed one way or the other).
            self._start(self._waiting.popleft())
        else:
            self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            # Work is expected to handle its own errors; one that escapes is a bug to see.
            log.error("%s: a task failed", self.name, exc_info=task.exception())

    async def drain(self, timeout: float) -> set[asyncio.Task[Any]]:
        """Wait (bounded) for running tasks and the admitted work queued behind them; returns
        the tasks still running at the end."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._tasks:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            # Work admitted behind these starts as they finish: look again until none is left.
            await asyncio.wait(set(self._tasks), timeout=left)
        return set(self._tasks)

    async def cancel(self) -> None:
        """Drop admitted work that has not started; cancel what still runs and wait for it to
        unwind."""
        while self._waiting:
            self._waiting.popleft().close()
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
