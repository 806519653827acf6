"""The one retry policy of the mesh: bounded attempts, exponential backoff with full jitter,
and an optional deadline that no pause may cross.

Why not stamina: a vote's retries share the decision's deadline with the other voters and pick
another replica on each attempt; JetStream redeliveries need the same schedule as a number
(`nak(delay)`) rather than an in-process loop; and the decision core's unit tests drive time
and randomness themselves. A 60-line value object serves all of these; stamina would serve one.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` in all (the first try included). The pause after the n-th failed attempt is
    uniform in [0, min(max_s, base_s * 2**(n-1))] ("full jitter", AWS architecture blog), or
    exactly that bound with `jitter=False`."""

    attempts: int = 3
    base_s: float = 0.05
    max_s: float = 1.0
    jitter: bool = True
    rand: Callable[[float, float], float] = field(default=random.uniform, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_s < 0 or self.max_s < 0:
            raise ValueError("attempts must be ≥ 1 and pauses ≥ 0")

    def delay(self, failed_attempt: int) -> float:
        """The pause after attempt `failed_attempt` (1-based) failed."""
        bound = min(self.max_s, self.base_s * 2 ** max(0, failed_attempt - 1))
        return self.rand(0.0, bound) if self.jitter else bound

    def allows(self, failed_attempt: int) -> bool:
        """May another attempt follow attempt `failed_attempt`?"""
        return failed_attempt < self.attempts

    def pause(
        self, failed_attempt: int, *, deadline: float | None = None, now: float | None = None
    ) -> float | None:
        """The pause before the next attempt, or None when there is none: attempts used up,
        or the pause would reach past `deadline` (same clock as `now`, monotonic by default)."""
        if not self.allows(failed_attempt):
            return None
        wait = self.delay(failed_attempt)
        if deadline is not None:
            current = time.monotonic() if now is None else now
            if current + wait >= deadline:
                return None
        return wait

    async def sleep(self, failed_attempt: int, *, deadline: float | None = None) -> bool:
        """Sleep before the next attempt; False (at once) when there is no next attempt."""
        wait = self.pause(failed_attempt, deadline=deadline)
        if wait is None:
            return False
        await asyncio.sleep(wait)
        return True
