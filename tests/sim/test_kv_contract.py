"""The simulation's KV (tests/sim/world.py SimKV) held to JetStream KV on a real nats-server,
on the operations the ledger uses: get, create, update by last revision (0: only if absent),
one revision sequence per bucket. Stale reads and failed writes are the simulation's faults on
top; they are not part of the contract."""

from __future__ import annotations

import uuid

import pytest

from coordinator.ledger import Entry, KvStore, StateConflict, Store
from mesh.bus import Bus
from tests.sim.world import SimKV

pytestmark = pytest.mark.integration


class SimKVStore:
    """SimKV as a `Store`, with no faults."""

    def __init__(self) -> None:
        self.kv = SimKV()

    async def get(self, key: str) -> Entry | None:
        return self.kv.read(key)

    async def create(self, key: str, value: bytes) -> int:
        return self.kv.create(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        return self.kv.update(key, value, last)


@pytest.fixture(params=["jetstream-kv", "sim"])
async def store(request: pytest.FixtureRequest, bus: Bus) -> Store:
    if request.param == "sim":
        return SimKVStore()
    return KvStore(await bus.kv(f"simcontract_{uuid.uuid4().hex[:8]}"))


async def test_the_sim_kv_keeps_the_jetstream_kv_contract(store: Store) -> None:
    assert await store.get("acme.e1") is None
    r1 = await store.create("acme.e1", b"1")
    with pytest.raises(StateConflict):
        await store.create("acme.e1", b"again")  # create fails if the key exists
    with pytest.raises(StateConflict):
        await store.update("acme.e1", b"2", r1 + 100)
    with pytest.raises(StateConflict):
        await store.update("acme.e1", b"2", 0)  # 0: only if absent
    r2 = await store.update("acme.e1", b"2", r1)
    assert r2 == r1 + 1  # one sequence for the bucket
    assert await store.get("acme.e1") == Entry(b"2", r2)
    with pytest.raises(StateConflict):
        await store.update("acme.e1", b"3", r1)  # a stale revision
    r3 = await store.update("acme.e2", b"x", 0)  # revision 0 on an absent key: a create
    assert r3 == r2 + 1
    r4 = await store.create("acme.e3", b"y")
    assert r4 == r3 + 1  # revisions are the bucket's, not the key's
    with pytest.raises(StateConflict):
        await store.update("acme.e2", b"y", r4)  # another key's revision is not this one's
    assert await store.get("acme.e2") == Entry(b"x", r3)
