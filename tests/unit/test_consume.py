"""The one pull-consume loop, with a scripted fetch: it asks only for what it can start, rides
out fetch errors, and drains on stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from mesh._internal.consume import PullLoop


class Source:
    """A fetch that hands out queued messages; each call's batch size is remembered."""

    def __init__(self, *, fail: int = 0) -> None:
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        self.batches: list[int] = []
        self.fail = fail  # how many calls raise before it works
        self.called = asyncio.Event()

    async def fetch(self, batch: int, timeout: float) -> list[int]:
        self.called.set()
        self.batches.append(batch)
        if self.fail:
            self.fail -= 1
            raise ConnectionError("leader changed")
        try:
            first = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise TimeoutError from None  # what nats-py raises when nothing came
        out = [first]
        while len(out) < batch and not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out


class Handler:
    """Starts, then waits for `release` (so the test decides when slots free up)."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.finished: list[int] = []
        self.release = asyncio.Event()
        self.changed = asyncio.Event()

    async def __call__(self, msg: int) -> None:
        self.started.append(msg)
        self.changed.set()
        await self.release.wait()
        self.finished.append(msg)
        self.changed.set()


async def until(check: Callable[[], bool], changed: asyncio.Event) -> None:
    """Wait (bounded) for the handler or source to make `check` true."""
    async with asyncio.timeout(5):
        while not check():
            changed.clear()
            await changed.wait()


def loop_for(source: Source, handler: Handler, size: int, **kw: float) -> PullLoop[int]:
    return PullLoop(
        source.fetch,
        handler,
        concurrency=size,
        name="test",
        drain_s=5.0,
        fetch_timeout_s=kw.get("fetch_timeout_s", 0.05),
        error_pause_s=kw.get("error_pause_s", 0.01),
    )


async def test_fetches_no_more_than_the_free_slots() -> None:
    source, handler = Source(), Handler()
    for i in range(5):
        source.queue.put_nowait(i)
    loop = loop_for(source, handler, size=2)
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    await until(lambda: len(handler.started) == 2, handler.changed)
    assert source.batches == [2] and loop.inflight == 2
    assert source.queue.qsize() == 3  # left in the "stream", not fetched and waiting here
    handler.release.set()
    await until(lambda: len(handler.finished) == 5, handler.changed)
    assert all(b <= 2 for b in source.batches)
    stop.set()
    assert await running == set()


async def test_fetch_errors_are_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    source, handler = Source(fail=2), Handler()
    handler.release.set()
    source.queue.put_nowait(1)
    stop = asyncio.Event()
    running = asyncio.create_task(loop_for(source, handler, size=4).run(stop))
    await until(lambda: handler.finished == [1], handler.changed)
    stop.set()
    await running
    assert caplog.text.count("test: fetch failed: leader changed") == 2


async def test_stop_drains_what_was_started() -> None:
    source, handler = Source(), Handler()
    source.queue.put_nowait(1)
    loop = loop_for(source, handler, size=4)
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    await until(lambda: handler.started == [1], handler.changed)
    stop.set()
    handler.release.set()
    # Nothing handed back: the loop waited for the handler instead of dropping it.
    assert await running == set()
    assert handler.finished == [1]


async def test_what_outlives_the_drain_is_handed_back_to_the_caller() -> None:
    source, handler = Source(), Handler()
    source.queue.put_nowait(1)
    loop = loop_for(source, handler, size=4)
    loop.drain_s = 0.01  # may change until the loop stops
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    await until(lambda: handler.started == [1], handler.changed)
    stop.set()
    late = await running
    assert len(late) == 1
    await loop.pool.cancel()
    assert handler.finished == []


def test_an_event_handlers_backoff_is_its_redelivery_policy() -> None:
    """`@agent.on_event(backoff=...)` stays a list of explicit pauses; the policy object turns an
    attempt into a pause, and says when there is no next delivery."""
    from mesh.events import Redelivery

    policy = Redelivery(attempts=5, pauses=(0.5, 2.0))
    assert [policy.pause(n) for n in (1, 2, 3, 4)] == [0.5, 2.0, 2.0, 2.0]  # the last repeats
    assert policy.pause(5) is None  # the last delivery failed: nak at once, JetStream gives up
    assert Redelivery(attempts=3).pause(1) == 0.0  # no pauses: redeliver at once
