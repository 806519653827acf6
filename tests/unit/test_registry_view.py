"""RegistryView without a server: its index by agent name, and its bounded waits, which must
let a cancel through even when it lands as the awaited thing completes (Python 3.11's
`asyncio.wait_for` returns the result then and swallows the cancel: commit d7122e0)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from mesh.registry import Registration, Registry, RegistryView


def _view() -> RegistryView:
    nc = SimpleNamespace(is_connected=True)
    fake = SimpleNamespace(heartbeat_s=1.0, bus=SimpleNamespace(nc=nc), verifier=None)
    return RegistryView(cast("Registry", fake))


def _reg(agent: str, instance: str, *, seen_at: float | None = None) -> Registration:
    return Registration(
        agent=agent,
        instance=instance,
        card={},
        skills=["s"],
        seen_at=time.time() if seen_at is None else seen_at,
        ttl_s=30.0,
    )


def test_instances_come_from_the_index() -> None:
    view = _view()
    a1, a2, b1 = _reg("a", "1"), _reg("a", "2"), _reg("b", "1")
    for reg in (a1, a2, b1):
        view._keep(reg.key, reg)
    assert view.instances("a") == [a1, a2]
    assert view.instances("b") == [b1]
    assert view.instances("c") == []
    view._forget(a1.key)
    assert view.instances("a") == [a2]
    view._forget(a2.key)
    assert view.instances("a") == [] and "a" not in view._by_agent
    # An entry replaced under the same key by one naming another agent moves (a wrapper is
    # not checked with MESH_INSECURE=bus).
    moved = _reg("c", "1")
    view._keep(b1.key, moved)
    assert view.instances("b") == [] and view.instances("c") == [moved]
    # Expired entries stay indexed but are not usable.
    old = _reg("d", "1", seen_at=time.time() - 60)
    view._keep(old.key, old)
    assert view.instances("d") == []


async def _cancel_as_it_completes(task: asyncio.Task[Any], complete: Any) -> None:
    """Let `task` reach its wait, then complete what it waits for and cancel it in one step."""
    for _ in range(5):
        await asyncio.sleep(0)
    complete()
    task.cancel()
    await asyncio.wait([task], timeout=5)


async def test_a_cancel_as_the_watcher_stops_is_not_swallowed() -> None:
    view = _view()
    released = asyncio.get_running_loop().create_future()

    class Watcher:
        async def stop(self) -> None:
            await released

    view._watcher = Watcher()
    task = asyncio.create_task(view._unwatch())
    await _cancel_as_it_completes(task, lambda: released.set_result(None))
    assert task.cancelled()


async def test_a_cancel_as_the_replay_ends_is_not_swallowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    view = _view()

    async def watch() -> None:
        return None

    monkeypatch.setattr(view, "_watch", watch)
    task = asyncio.create_task(view.start())
    await _cancel_as_it_completes(task, view._ready.set)
    assert task.cancelled()
    await view.stop()


async def test_a_cancel_as_a_rewatch_lands_is_not_swallowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    view = _view()
    view.stale_after_s = 0.0  # check at once
    released = asyncio.get_running_loop().create_future()
    watching = asyncio.Event()

    async def watch() -> None:
        watching.set()
        await released

    async def unwatch() -> None:
        return None

    monkeypatch.setattr(view, "_watch", watch)
    monkeypatch.setattr(view, "_unwatch", unwatch)
    monkeypatch.setattr(view, "_needs_rewatch", lambda: "ended")
    task = asyncio.create_task(view._supervise())
    async with asyncio.timeout(5):
        await watching.wait()
    await _cancel_as_it_completes(task, lambda: released.set_result(None))
    assert task.cancelled()
