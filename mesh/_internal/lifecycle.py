"""One shape for everything the mesh starts and stops: `start()`/`stop()`, and the async
context manager that calls them (`async with X(...) as x:`), written once."""

from __future__ import annotations

from typing import Self


class AsyncService:
    """Subclasses implement `start` and `stop`; `async with` runs them around a block."""

    async def start(self) -> None:
        """Acquire what the service needs; the default does nothing."""

    async def stop(self) -> None:
        """Release it; must be safe to call after a failed or partial start."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class ProcessService:
    """The same for things that start synchronously (a child process): `with` and `async with`."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop()
