import asyncio

import msgspec
import pytest
from nats.js.errors import ServerError

from mesh import subjects
from mesh.audit import GENESIS, AuditLog, AuditRecord, read, subject, verify
from mesh.bus import Bus
from mesh.identity import IdentityDir

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


async def test_records_are_signed_by_the_identity_and_verify_against_the_trust_file(
    bus: Bus,
) -> None:
    from mesh.identity import resolve_trust

    log = AuditLog(bus, actor="instance-7")
    record = await log.append("acme", "decision", "e1", {})
    assert bus.identity is not None and log.signer is not None
    assert record.actor == bus.identity.principal and record.instance == "instance-7"
    assert record.signer == log.signer.kid and record.signature
    trust = resolve_trust(bus.settings)
    assert verify(await read(bus), trust=trust).ok
    # Signed by a trusted key, under a name that is not that key's: a lie, named as such.
    forged = msgspec.structs.replace(record, actor="coordinator:someone-else")
    forged.hash = forged.digest()
    forged.signature = bus.identity.signer().sign("audit", forged.hash.encode())
    check = verify([(1, forged)], trust=trust)
    assert not check.ok and "names actor" in check.problem


async def test_the_last_record_of_a_kind_is_believed_only_if_it_belongs(bus: Bus) -> None:
    """A forged `policy_change` on top must not make a coordinator think its policy set is
    already recorded."""
    log = AuditLog(bus, actor="test")
    await log.append("_mesh", "policy_change", "p", {"sha256": "a"})
    fake = AuditRecord("_mesh", "policy_change", "p", "operator:operator", 0, {"sha256": "b"}, "")
    fake.hash = fake.digest()  # unsigned
    await bus.publish(subject("_mesh", "policy_change"), msgspec.json.encode(fake))
    assert await log.last("_mesh", "policy_change") is None
    record = await log.append("_mesh", "policy_change", "p", {"sha256": "b"})
    assert record.index == 2  # chained onto the genuine first record, past the fake
    latest = await log.last("_mesh", "policy_change")
    assert latest is not None and latest.data == {"sha256": "b"} and latest.hash == record.hash


async def test_a_writer_whose_key_the_trust_file_does_not_list_is_refused(
    bus: Bus, identities: IdentityDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its records would be foreign to every reader: refused at once, with what to do."""
    from mesh.errors import ConfigError
    from mesh.identity import load_identity

    reader = load_identity(identities.issue("reader", "audit-reader", tenant="acme"))
    monkeypatch.setattr(bus, "identity", reader)
    with pytest.raises(ConfigError, match=r"needs an identity with a signing key|not trusted"):
        AuditLog(bus, actor="x")
