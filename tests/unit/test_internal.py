"""The private building blocks every loop in the mesh shares: the task pool and retry policy."""

from __future__ import annotations

import asyncio

import pytest

from mesh._internal.retry import RetryPolicy
from mesh._internal.tasks import TaskPool


async def test_pool_never_runs_more_than_its_size() -> None:
    pool = TaskPool(2)
    gate = asyncio.Event()
    running = 0
    most = 0

    async def work() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await gate.wait()
        running -= 1

    await pool.spawn(work())
    await pool.spawn(work())
    assert pool.free == 0
    third = asyncio.create_task(pool.spawn(work()))
    assert not await pool.wait_free(timeout=0.01)
    assert not third.done()
    gate.set()
    await third
    assert await pool.drain(timeout=5) == set()
    assert most == 2
    assert pool.free == 2 and len(pool) == 0


async def test_drain_returns_what_is_still_running_and_cancel_unwinds_it() -> None:
    pool = TaskPool(1)
    never = asyncio.Event()
    await pool.spawn(never.wait())
    late = await pool.drain(timeout=0.01)
    assert len(late) == 1
    await pool.cancel()
    assert pool.free == 1


async def test_a_failing_task_frees_its_slot(caplog: pytest.LogCaptureFixture) -> None:
    pool = TaskPool(1, name="t")

    async def boom() -> None:
        raise RuntimeError("bug")

    await pool.spawn(boom())
    await pool.drain(timeout=5)
    assert pool.free == 1
    assert "t: a task failed" in caplog.text


def test_full_jitter_stays_within_the_exponential_bound() -> None:
    seen: list[tuple[float, float]] = []

    def rand(lo: float, hi: float) -> float:
        seen.append((lo, hi))
        return hi / 2

    policy = RetryPolicy(attempts=6, base_s=0.1, max_s=0.5, rand=rand)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [0.05, 0.1, 0.2, 0.25]
    assert seen == [(0.0, 0.1), (0.0, 0.2), (0.0, 0.4), (0.0, 0.5)]
    assert RetryPolicy(base_s=0.1, jitter=False).delay(2) == 0.2


def test_no_pause_past_the_attempts_or_the_deadline() -> None:
    policy = RetryPolicy(attempts=3, base_s=1.0, max_s=1.0, jitter=False)
    assert policy.pause(1, deadline=10.0, now=0.0) == 1.0
    assert policy.pause(3, deadline=10.0, now=0.0) is None  # attempts used up
    assert policy.pause(1, deadline=10.0, now=9.5) is None  # would cross the deadline
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


async def test_sleep_says_whether_another_attempt_follows() -> None:
    policy = RetryPolicy(attempts=2, base_s=0.0, max_s=0.0)
    assert await policy.sleep(1) is True
    assert await policy.sleep(2) is False


async def test_admit_runs_then_queues_then_refuses_never_waiting() -> None:
    pool = TaskPool(1, backlog=1)
    gate = asyncio.Event()
    ran: list[str] = []

    async def work(name: str) -> None:
        await gate.wait()
        ran.append(name)

    assert await pool.admit(work("first"))
    assert await pool.admit(work("second"))
    third = work("third")
    assert not await pool.admit(third)  # full: refused at once
    assert third.cr_frame is None  # closed, never run: no "never awaited" warning
    assert len(pool) == 1 and pool.waiting == 1
    gate.set()
    assert await pool.drain(timeout=5) == set()  # the queued one ran too
    assert ran == ["first", "second"]
    assert pool.free == 1 and pool.waiting == 0
    assert await pool.admit(work("again"))  # room again
    await pool.drain(timeout=5)


async def test_cancel_drops_admitted_work_that_has_not_started() -> None:
    pool = TaskPool(1, backlog=2)
    never = asyncio.Event()
    ran: list[int] = []

    async def work(i: int) -> None:
        ran.append(i)
        await never.wait()

    for i in range(3):
        assert await pool.admit(work(i))
    await asyncio.sleep(0)
    await pool.cancel()
    assert ran == [0] and pool.waiting == 0 and pool.free == 1


async def test_refusals_are_counted_and_logged_sparingly(caplog: pytest.LogCaptureFixture) -> None:
    pool = TaskPool(1, name="full pool")
    never = asyncio.Event()
    assert await pool.admit(never.wait())
    for _ in range(100):
        assert not await pool.admit(never.wait())
    assert pool.refused == 100
    said = [r for r in caplog.records if "full pool: full" in r.getMessage()]
    assert len(said) == 1  # not one line per refusal
    await pool.cancel()
