"""A desk race the simulation found once (seed 1938 of an earlier world) and that its short run
no longer reaches within budget (tests/sim/mutants.py RARE): held here by hand, with the
stale read that makes it, so the fix cannot silently go."""

from __future__ import annotations

from coordinator.clock import ManualClock
from coordinator.humans import Refused, Settled
from coordinator.ledger import Entry, MemoryStore
from tests.sim import mutants
from tests.unit.test_decide import KEY
from tests.unit.test_humans import CSO, People, agents_vote, desk, human_policy, request_now


class StaleOnce:
    """The store, whose next read answers an older entry once (a KV replica behind)."""

    def __init__(self, store: MemoryStore, old: Entry) -> None:
        self.store = store
        self.old: Entry | None = old

    async def get(self, key: str) -> Entry | None:
        old, self.old = self.old, None
        return old if old is not None else await self.store.get(key)

    async def create(self, key: str, value: bytes) -> int:
        return await self.store.create(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        return await self.store.update(key, value, last)


async def _redelivered_answer_after_a_stale_read() -> object:
    """Alice's answer decides; the desk's publish of it fails (so the vote message comes
    round again). Past the expiry, the redelivery's first read is stale: on that state the
    expiry is due and her answer refused ("expired"), but that write loses to the decision."""
    store, clock = MemoryStore(), ManualClock()
    people = People()
    people.add("alice", CSO.role)
    await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "approve"), "s2": (0.1, "approve")}
    )
    waiting = await store.get(KEY)
    assert waiting is not None
    vote = people.answer("alice", await request_now(store), yes=True)
    settled = await desk(store, clock, trust=people.trust).answer(KEY, vote)
    assert isinstance(settled, Settled)
    await clock.advance(CSO.wait_s + 1.0)
    again = desk(store, clock, trust=people.trust)
    again.ledger.store = StaleOnce(store, waiting)
    outcome = await again.answer(KEY, vote)
    assert isinstance(outcome, Refused), outcome
    return outcome.decided == settled.decision


async def test_an_answer_redelivered_after_its_decision_publishes_it_again() -> None:
    """The answer is refused as "already decided", with the decision to publish again (the
    inbox does), not with the refusal of the attempt whose write lost the race."""
    assert await _redelivered_answer_after_a_stale_read()
    with mutants.applied("answer-refused-by-lost-attempt"):
        assert not await _redelivered_answer_after_a_stale_read()
