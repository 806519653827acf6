"""The pull loop's fetch on a real nats-server: a message is handed over as it arrives, never
held back for one published after it, and a backlog still goes in batches."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from mesh._internal.consume import JetStreamFetch, PullLoop
from mesh.bus import Bus
from tests.support.waits import eventually


class Reader:
    """A pull loop over the test stream, recording what it asked for and what each pull gave,
    with an event per handled message so a test waits on it."""

    def __init__(self, bus: Bus, stream: str) -> None:
        self.bus, self.stream = bus, stream
        self.asked: list[int] = []
        self.pulls: list[list[Msg]] = []
        self.handled: list[bytes] = []
        self.changed = asyncio.Event()
        self._running: asyncio.Task[object] | None = None
        self._fetch: JetStreamFetch | None = None

    async def start(self, pull_s: float) -> None:
        psub = await self.bus.js.pull_subscribe(
            f"{self.stream.lower()}.>",
            durable="reader",
            stream=self.stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
        )
        pull = psub.fetch

        async def recording(batch: int = 1, timeout: float | None = 5, **_: object) -> list[Msg]:
            self.asked.append(batch)
            msgs = await pull(batch, timeout=timeout)
            self.pulls.append(msgs)
            return msgs

        psub.fetch = recording  # type: ignore[method-assign,assignment]
        self._fetch = JetStreamFetch(psub)
        loop = PullLoop(
            self._fetch, self.handle, concurrency=64, name="t", drain_s=5, fetch_timeout_s=pull_s
        )
        self._running = asyncio.create_task(loop.run(asyncio.Event()))

    async def handle(self, msg: Msg) -> None:
        self.handled.append(msg.data)
        self.changed.set()
        await msg.ack()

    async def until(self, n: int) -> None:
        async with asyncio.timeout(20):
            while len(self.handled) < n:
                self.changed.clear()
                await self.changed.wait()

    async def stop(self) -> None:
        if self._running is not None:
            self._running.cancel()  # a long pull would otherwise run out its life
            with contextlib.suppress(asyncio.CancelledError):
                await self._running
        if self._fetch is not None:
            await self._fetch.psub.unsubscribe()

    async def publish(self, data: bytes) -> None:
        await self.bus.js.publish(f"{self.stream.lower()}.x", data)


@pytest.fixture
async def reader(bus: Bus) -> AsyncIterator[Reader]:
    name = f"PULLFETCH{uuid.uuid4().hex[:8].upper()}"
    await bus.js.add_stream(StreamConfig(name=name, subjects=[f"{name.lower()}.>"]))
    r = Reader(bus, name)
    try:
        yield r
    finally:
        await r.stop()
        with contextlib.suppress(Exception):
            await bus.js.delete_stream(name)


async def test_no_message_waits_for_one_published_after_it(reader: Reader) -> None:
    """Events at 20/s after a quiet spell, as the coordinator sees them between bursts. With
    nats-py's fetch of 64 as it is, a pull handed over pairs: the first of each had been the
    last message ready (nothing pending behind it) and waited ~50 ms for the next publish."""
    await reader.start(pull_s=0.5)
    await eventually(lambda: len(reader.asked) >= 4, "a few pulls expire on an idle stream")
    t0 = time.perf_counter()
    for i in range(40):  # paced: the workload, not a wait
        await asyncio.sleep(max(0.0, t0 + i / 20 - time.perf_counter()))
        await reader.publish(f"m{i}".encode())
    await reader.until(40)
    held = [
        [m.data for m in pull]
        for pull in reader.pulls
        if any(m.metadata.num_pending == 0 for m in pull[:-1])
    ]
    assert not held, f"messages held back for later ones: {held}"


async def test_a_lone_message_is_not_held_for_the_pull_s_life(reader: Reader) -> None:
    await reader.start(pull_s=60.0)  # a pull that held its message would miss every bound below
    for i in range(3):  # each published only once the one before was handled
        await reader.publish(f"m{i}".encode())
        await reader.until(i + 1)
    assert reader.handled == [b"m0", b"m1", b"m2"]


async def test_a_backlog_is_fetched_in_batches(reader: Reader) -> None:
    for i in range(20):
        await reader.publish(f"b{i}".encode())
    await reader.start(pull_s=0.5)
    await reader.until(20)
    assert sorted(reader.handled) == sorted(f"b{i}".encode() for i in range(20))
    assert reader.asked[:2] == [1, 19]  # one to learn what is ready, then the rest in one pull
