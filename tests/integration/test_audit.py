import asyncio

import msgspec
import pytest
from nats.js.errors import ServerError

from mesh import subjects
from mesh.audit import GENESIS, AuditLog, read, verify
from mesh.bus import Bus

pytestmark = pytest.mark.integration


async def test_records_chain_per_tenant_and_verify(bus: Bus) -> None:
    log = AuditLog(bus, actor="test")
    first = await log.append("acme", "decision", "e1", {"outcome": "approved"})
    await log.append("other", "decision", "e2", {"outcome": "rejected"})
    second = await log.append("acme", "vote", "e1", {"agent": "a"})
    assert first.prev == GENESIS
    assert second.prev == first.hash
    records = await read(bus)
    assert [r.ref for _, r in records] == ["e1", "e2", "e1"]
    result = verify(records)
    assert result.ok and result.count == 3
    assert str(result) == "verified 3 records"


async def test_altering_one_record_in_a_copy_is_named(bus: Bus) -> None:
    log = AuditLog(bus, actor="test")
    for i in range(5):
        await log.append("acme", "decision", f"e{i}", {"outcome": "approved"})
    records = await read(bus)
    seq, victim = records[2]
    forged = msgspec.structs.replace(victim, data={"outcome": "rejected"})
    result = verify([*records[:2], (seq, forged), *records[3:]])
    assert not result.ok and result.bad_seq == seq
    assert "hash" in str(result)
    # Re-hashing the forgery moves the break to the next record, which still names the old one.
    forged.hash = forged.digest()
    result = verify([*records[:2], (seq, forged), *records[3:]])
    assert not result.ok and result.bad_seq == records[3][0]
    # Dropping a record breaks the chain at its successor.
    result = verify([*records[:2], *records[3:]])
    assert not result.ok and result.bad_seq == records[3][0]


async def test_server_refuses_delete_and_purge_of_the_audit_stream(bus: Bus) -> None:
    await AuditLog(bus, actor="test").append("acme", "decision", "e1", {})
    with pytest.raises(ServerError, match="not permitted"):
        await bus.js.delete_msg(subjects.AUDIT_STREAM, 1)
    with pytest.raises(ServerError, match="not permitted"):
        await bus.js.purge_stream(subjects.AUDIT_STREAM)
    assert len(await read(bus)) == 1


async def test_concurrent_writers_never_fork_a_chain(bus: Bus) -> None:
    writers = [AuditLog(bus, actor=f"w{i}") for i in range(3)]

    async def write(log: AuditLog, n: int) -> None:
        for i in range(n):
            await log.append("acme", "vote", f"{log.actor}-{i}", {})

    await asyncio.gather(*(write(w, 15) for w in writers))
    records = await read(bus, "acme")
    assert len(records) == 45
    assert verify(records).ok
    assert len({r.prev for _, r in records}) == 45  # no two records share a parent
