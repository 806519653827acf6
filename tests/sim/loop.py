"""A deterministic asyncio event loop with virtual time, for the simulation.

How asyncio is made deterministic here:
- Time is virtual: `loop.time()` returns a number that moves only when nothing is ready to
  run. `BaseEventLoop._run_once` asks its selector to wait until the next timer; this loop's
  "selector" does not wait, it moves the virtual clock to that timer. So `asyncio.sleep`,
  `wait_for`, `call_later` and every `Clock` built on the loop run in simulated time, instantly.
  A loop with nothing ready and no timer is stuck: `Stuck` is raised (a run that deadlocks).
- Order is FIFO, as in asyncio, and nothing depends on memory addresses: asyncio's `wait`
  keeps futures in sets, whose iteration order follows their hash, which for a plain Task is
  its address. Every task and future this loop makes hashes by a creation counter instead.
- No I/O, no threads, no real clocks: every source of randomness is the run's one
  `random.Random(seed)` (the world draws from it; the code under test draws nothing).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine, Generator
from typing import Any


class Stuck(RuntimeError):
    """Nothing can run and nothing is scheduled: every task waits on something that never comes."""


class _Task(asyncio.Task[Any]):
    _sim_id = 0

    def __hash__(self) -> int:
        return self._sim_id


class _Future(asyncio.Future[Any]):
    _sim_id = 0

    def __hash__(self) -> int:
        return self._sim_id


class _VirtualSelector:
    """Stands in for the selector: "waiting" `timeout` seconds moves the virtual clock."""

    def __init__(self, loop: SimLoop) -> None:
        self.loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        if timeout is None:
            raise Stuck("no task is ready and no timer is due")
        if timeout > 0:
            self.loop.now += timeout
        return []

    def close(self) -> None:
        pass


class SimLoop(asyncio.BaseEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self._selector = _VirtualSelector(self)  # type: ignore[attr-defined]
        self._ids = itertools.count(1)
        self.set_task_factory(self._make_task)

    def time(self) -> float:
        return self.now

    def create_future(self) -> asyncio.Future[Any]:
        fut = _Future(loop=self)
        fut._sim_id = next(self._ids)
        return fut

    def _make_task(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Generator[Any, None, Any] | Coroutine[Any, Any, Any],
        **kw: Any,
    ) -> asyncio.Task[Any]:
        task = _Task(coro, loop=loop, **kw)
        task._sim_id = next(self._ids)
        return task

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass
