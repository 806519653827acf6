import asyncio
import time

import pytest

from coordinator.routing import Route, Router
from mesh.registry import Registration


class _View:
    """The one method Router reads from a RegistryView."""

    def __init__(self, *regs: Registration) -> None:
        self.regs = list(regs)

    def instances(self, agent: str) -> list[Registration]:
        return [r for r in self.regs if r.agent == agent]


def _reg(instance: str, direct: bool = True) -> Registration:
    return Registration(
        agent="rev",
        instance=instance,
        card={},
        skills=["s"],
        seen_at=time.time(),
        ttl_s=60,
        direct_subject=f"mesh.a2a.rev.{instance}" if direct else "",
    )


async def _fail(router: Router, key_subject: str, times: int) -> None:
    for _ in range(times):
        route = router.route("rev")
        while route.subject != key_subject:
            route = router.route("rev")
        with pytest.raises(RuntimeError):
            async with await router.breaker(route):
                raise RuntimeError("transport failure")


async def test_without_replica_subjects_the_shared_subject_is_used() -> None:
    route = Router(_View(_reg("a", direct=False))).route("rev")  # type: ignore[arg-type]
    assert route.subject == "mesh.a2a.rev" and route.breaker_key == "rev"


async def test_failed_replicas_are_avoided_within_a_call() -> None:
    router = Router(_View(_reg("a"), _reg("b")))  # type: ignore[arg-type]
    for _ in range(20):
        assert router.route("rev", avoid=frozenset({"rev.a"})).subject == "mesh.a2a.rev.b"
    # Everything avoided: any usable replica still beats giving up.
    assert router.route("rev", avoid=frozenset({"rev.a", "rev.b"})).breaker_key in {
        "rev.a",
        "rev.b",
    }


async def test_breaker_opens_after_threshold_and_routes_around() -> None:
    router = Router(_View(_reg("a"), _reg("b")), threshold=3, ttl_s=60)  # type: ignore[arg-type]
    await _fail(router, "mesh.a2a.rev.a", 3)
    assert router.states()["rev.a"] == "opened"
    assert all(router.route("rev").subject == "mesh.a2a.rev.b" for _ in range(20))


async def test_open_breaker_turns_half_open_after_ttl_and_a_success_closes_it() -> None:
    router = Router(_View(_reg("a")), threshold=1, ttl_s=0.05)  # type: ignore[arg-type]
    await _fail(router, "mesh.a2a.rev.a", 1)
    assert router.is_open("rev.a")
    # Only replica, breaker open: the shared subject is the fallback.
    assert router.route("rev").subject == "mesh.a2a.rev"
    deadline = time.monotonic() + 5
    while router.is_open("rev.a") and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert router.states()["rev.a"] == "half-opened"
    route = router.route("rev")
    assert route.subject == "mesh.a2a.rev.a"
    async with await router.breaker(route):
        pass  # the probe succeeds
    assert router.states()["rev.a"] == "closed"


async def test_the_factorys_breaker_is_what_router_types_it_as() -> None:
    """Router types purgatory's breaker by its public shape (`Breaker`) instead of importing
    the class from purgatory's private package; this pins that shape."""
    from coordinator.routing import Breaker, BreakerOpen

    router = Router(_View(_reg("a")), threshold=1, ttl_s=60)  # type: ignore[arg-type]
    brk = await router.breaker(router.route("rev"))
    assert isinstance(brk, Breaker)
    assert brk.context.state == "closed" and brk.context.ttl == 60
    await _fail(router, "mesh.a2a.rev.a", 1)
    with pytest.raises(BreakerOpen):
        async with await router.breaker(Route("rev", "mesh.a2a.rev.a", "rev.a")):
            pass
