"""One shape for everything the mesh starts and stops: `start()`/`stop()`, and the async
context manager that calls them (`async with X(...) as x:`), written once; and `spawn_tied`,
the one way to start a child process that must die with us (nats-server, coordinators,
agents)."""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Self, cast


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


# -- children that die with us ---------------------------------------------------------------------
def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()
_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Callable[[], None]:
    """The child's hook before exec: when `parent` dies (even by SIGKILL) the kernel sends the
    child SIGTERM (Linux; elsewhere a no-op). A parent already gone by then is caught at once:
    the signal would never come."""

    def hook() -> None:
        if _LIBC is None:
            return
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return hook


class _Spawner:
    """One daemon thread that forks every tied child. PR_SET_PDEATHSIG fires when the *thread*
    that forked the child ends, not the process: forking from a worker thread (asyncio.to_thread,
    a short-lived pool) would kill the child when that thread exits. This thread ends only with
    the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self._owner = 0  # the pid the thread runs in (a forked copy of us has no thread)

    def run(self, job: Callable[[], Any]) -> Any:
        with self._lock:
            if self._owner != os.getpid():
                self._owner = os.getpid()
                self._jobs = queue.SimpleQueue()
                threading.Thread(target=self._loop, args=(self._jobs,), daemon=True).start()
            done: Future[Any] = Future()
            self._jobs.put((done, job))
        return done.result()

    @staticmethod
    def _loop(jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]]) -> None:
        while True:
            done, job = jobs.get()
            try:
                done.set_result(job())
            except BaseException as e:  # handed to the caller, who raises it
                done.set_exception(e)


_SPAWNER = _Spawner()


def spawn_tied(args: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """`subprocess.Popen(args, **popen)` for a child that must not outlive this process: it
    gets SIGTERM when we die, however we die (Linux, `PR_SET_PDEATHSIG`; elsewhere it is an
    ordinary child, stopped only by a clean shutdown). Safe to call from any thread."""
    hook = _die_with(os.getpid())
    # Safe despite PLW1509: the hook makes one syscall through a libc handle loaded before the
    # fork, so the child takes no lock another thread might hold.
    return cast(
        "subprocess.Popen[bytes]",
        _SPAWNER.run(lambda: subprocess.Popen(args, preexec_fn=hook, **popen)),  # noqa: PLW1509
    )
