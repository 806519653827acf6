"""Bounded waits: one `eventually` for coroutines, `wait_for` for plain functions.

A wait ends when the condition holds (its value is returned), when `alive()` raises (a process
under test died: no point waiting on), or at the bound, which is a failure with what was last
seen, never a timing measurement. `wake` lets an event end the pause between two looks early, so
a wait driven by a subscription (see `outcomes.Outcomes`) reacts when something arrives instead
of on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable
from typing import Any

from mesh.dev.launcher import Child


class _Bound:
    """One wait's deadline and its failure message (shared by the async and sync forms)."""

    def __init__(
        self,
        what: str,
        timeout: float,
        alive: Callable[[], None] | None,
        detail: Callable[[], Any] | None,
    ) -> None:
        self.what = what or "condition"
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.alive = alive
        self.detail = detail

    def check_alive(self) -> None:
        if self.alive is not None:
            self.alive()

    def over(self) -> bool:
        return time.monotonic() >= self.deadline

    def failure(self) -> AssertionError:
        seen = f"; last seen: {self.detail()}" if self.detail is not None else ""
        return AssertionError(f"{self.what}: not within {self.timeout:.1f}s{seen}")


async def eventually(
    check: Callable[[], Any],
    what: str = "",
    *,
    timeout: float = 10.0,
    every: float = 0.05,
    alive: Callable[[], None] | None = None,
    detail: Callable[[], Any] | None = None,
    wake: asyncio.Event | None = None,
) -> Any:
    """Call `check()` (a plain or async function) until it returns something truthy, and return
    that; an AssertionError naming `what` once `timeout` seconds pass without it."""
    bound = _Bound(what, timeout, alive, detail)
    while True:
        bound.check_alive()
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        if bound.over():
            raise bound.failure()
        pause = max(0.0, min(every, bound.deadline - time.monotonic()))
        if wake is None:
            await asyncio.sleep(pause)
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), pause)
        wake.clear()


def wait_for(
    check: Callable[[], Any],
    what: str = "",
    *,
    timeout: float = 10.0,
    every: float = 0.1,
    alive: Callable[[], None] | None = None,
    detail: Callable[[], Any] | None = None,
) -> Any:
    """`eventually` for code that is not async (a sync test driving OS processes)."""
    bound = _Bound(what, timeout, alive, detail)
    while True:
        bound.check_alive()
        got = check()
        if got:
            return got
        if bound.over():
            raise bound.failure()
        time.sleep(max(0.0, min(every, bound.deadline - time.monotonic())))


def all_alive(*children: Child) -> Callable[[], None]:
    """An `alive` check for a wait: raises as soon as one of these processes has exited,
    with the end of its log."""

    def check() -> None:
        for c in children:
            if not c.alive:
                try:
                    tail = c.log_path.read_text(errors="replace")[-1500:]
                except OSError:
                    tail = "(no log)"
                raise AssertionError(f"{c.name} exited with code {c.proc.returncode}:\n{tail}")

    return check
