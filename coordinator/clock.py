"""The clocks the decision core reads, as a protocol, so unit tests can drive time themselves."""

from __future__ import annotations

import asyncio
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
