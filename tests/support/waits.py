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
from dataclasses import dataclass
from typing import Any

from mesh.dev.launcher import Child


@dataclass
class _Bound:
    """One wait's bound, what it waits for, and how it fails (shared by both forms)."""

    what: str
    timeout: float
    every: float
    alive: Callable[[], None] | None = None
    detail: Callable[[], Any] | None = None

    def __post_init__(self) -> None:
        self.what = self.what or "condition"
        self.deadline = time.monotonic() + self.timeout

    def check_alive(self) -> None:
        if self.alive is not None:
            self.alive()

    def pause(self) -> float:
        """After a look that found nothing: how long to wait before the next one; the failure
        (what was last seen) once the bound has passed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            seen = f"; last seen: {self.detail()}" if self.detail is not None else ""
            raise AssertionError(f"{self.what}: not within {self.timeout:.1f}s{seen}")
        return min(self.every, left)


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
    bound = _Bound(what, timeout, every, alive, detail)
    while True:
        bound.check_alive()
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        pause = bound.pause()
        if wake is None:
            await asyncio.sleep(pause)
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), pause)
        wake.clear()


def wait_for(check: Callable[[], Any], what: str = "", **bounds: Any) -> Any:
    """`eventually` for code that is not async (a sync test driving OS processes); the same
    keywords but `wake`: timeout (default 10 s), every (0.1 s), alive, detail."""
    bound = _Bound(what, **{"timeout": 10.0, "every": 0.1, **bounds})
    while True:
        bound.check_alive()
        if got := check():
            return got
        time.sleep(bound.pause())


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
