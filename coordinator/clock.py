"""The clocks the decision core reads, as a protocol, so unit tests can drive time themselves."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall clock (seconds since the epoch): what the ledger stores, shared by processes."""
        ...

    def monotonic(self) -> float:
        """This process's clock for timeouts (never jumps)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clocks."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """Clocks that move only when told (`advance`): for driving the decision core in tests.

    `sleep` waits until `advance` has moved the monotonic clock past its end; the wall clock
    moves with it. Two coordinators with a clock each can be given different times, which is
    how a test stalls one of them.
    """

    def __init__(self, wall: float = 1_700_000_000.0) -> None:
        self._wall0 = wall
        self._now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self._wall0 + self._now

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)  # still a point where other tasks run, as with asyncio's
            return
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), wake))
        await wake

    async def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, waking sleepers in the order they are due, and let
        whatever they set in motion run before time moves on."""
        until = self._now + seconds
        await settle()
        while self._sleepers and self._sleepers[0][0] <= until:
            due, _, wake = heapq.heappop(self._sleepers)
            self._now = max(self._now, due)
            if not wake.done():  # a cancelled sleeper is simply gone
                wake.set_result(None)
            await settle()
        self._now = until
        await settle()


async def settle(rounds: int = 100) -> None:
    """Let every task that is ready run until each waits on something else (a bounded number of
    event-loop turns, not a sleep: nothing here waits for real time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)
