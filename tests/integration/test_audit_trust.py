"""An audit trail an auditor can trust, attacked as an outside client would (plain nats-py and
JetStream API calls on the server's port), on a real nats-server. After each attack
`mesh audit verify` exits 1 and names the problem:

- a record altered (a changed copy re-published; one changed in an exported bundle);
- a record forged with a key nobody trusts, or a message that is no record at all, on
  `mesh.audit.<tenant>.*` (the writer goes on auditing past it, and only it is reported);
- a limits update (max_age, max_msgs_per_subject, max_msgs) that drops records, even when the
  limits are put back afterwards, and the stream emptied ("verified 0 records");
- the stream deleted and re-created: empty, with a forged chain, or with the genuine records
  copied back in order.

`mesh audit export` writes a bundle that `mesh audit verify --bundle` checks without NATS.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError
from typer.testing import CliRunner

from mesh import subjects
from mesh.audit import (
    GENESIS,
    AuditLog,
    AuditRecord,
    Bundle,
    bundle_decoder,
    bundle_encoder,
    read,
    snapshot,
    verify_bundle,
)
from mesh.bus import Bus
from mesh.cli import app
from mesh.identity import Signer, Trust, resolve_trust, save_trust
from mesh.server import EmbeddedServer
from mesh.settings import Settings, get_settings
from tests.support.outsider import outsider
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

TENANT = "acme"
RECORDS = 6  # of TENANT, plus two of another tenant, then a checkpoint of each


async def ensure_checkpoints(bus: Bus) -> None:
    """MESH_CHECKPOINTS as the mesh keeps it (immutable: no delete, no purge)."""
    try:
        await bus.js.stream_info(subjects.CHECKPOINTS_STREAM)
    except NotFoundError:
        await bus.js.add_stream(
            StreamConfig(
                name=subjects.CHECKPOINTS_STREAM,
                subjects=[f"{subjects.CHECKPOINT_ROOT}.>"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                deny_delete=True,
                deny_purge=True,
            )
        )


@pytest.fixture
async def trail(bus: Bus) -> AsyncIterator[AuditLog]:
    """A trail of RECORDS records of TENANT and two of `other`, each tenant checkpointed."""
    await ensure_checkpoints(bus)
    log = AuditLog(bus, "test-writer")
    for i in range(RECORDS):
        await log.append(TENANT, "decision", f"e{i}", {"outcome": "approved"})
        if i % 3 == 0:
            await log.append("other", "vote", f"o{i}", {"agent": "a"})
    assert await log.checkpoint(TENANT) is not None
    assert await log.checkpoint("other") is not None
    yield log


def trust() -> Trust:
    found = resolve_trust(Settings())
    assert found is not None
    return found


def cli(url: str, *args: str) -> Any:
    """`mesh <args>` through the real entry point, against the server at `url`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MESH_NATS_URL", url)
        get_settings.cache_clear()
        try:
            return CliRunner().invoke(app, list(args))
        finally:
            get_settings.cache_clear()


async def verify_cli(url: str, *args: str) -> Any:
    return await asyncio.to_thread(cli, url, "audit", "verify", *args)


async def tip_of(bus: Bus, tenant: str) -> tuple[int, AuditRecord]:
    seq, record = [(s, r) for s, r in await read(bus, tenant)][-1]
    return seq, record


def forged(prev: AuditRecord, signer: Signer | None, **fields: Any) -> AuditRecord:
    """A record that chains onto `prev` as a writer's would, signed by `signer` (or nobody)."""
    record = AuditRecord(
        prev.tenant,
        "decision",
        "e-forged",
        "coordinator:coordinator",
        prev.at + 1,
        {"outcome": "approved"},
        prev.hash,
        index=prev.index + 1,
        **fields,
    )
    if signer is not None:
        record.signer = signer.kid
    record.hash = record.digest()
    if signer is not None:
        record.signature = signer.sign("audit", record.hash.encode())
    return record


# -- the trail as written ------------------------------------------------------------------------
async def test_an_intact_trail_verifies_with_its_checkpoints(
    trail: AuditLog, nats_server: EmbeddedServer
) -> None:
    result = verify_bundle(await snapshot(trail.bus), trust())
    assert result.ok, result.problems
    assert result.count == RECORDS + 2 and result.notes == []
    records = [r for _, r in await read(trail.bus, TENANT)]
    assert [r.index for r in records] == list(range(1, RECORDS + 1))
    assert records[0].prev == GENESIS
    assert {r.actor for r in records} == {"operator:operator"}  # the identity, not a chosen name
    assert {r.instance for r in records} == {"test-writer"}
    ran = await verify_cli(nats_server.url)
    assert ran.exit_code == 0, ran.output
    assert f"verified {RECORDS + 2} records" in ran.output


async def test_a_changed_copy_of_a_record_is_named(
    trail: AuditLog, nats_server: EmbeddedServer
) -> None:
    _, genuine = (await read(trail.bus, TENANT))[1]
    changed = msgspec.structs.replace(genuine, data={"outcome": "rejected"})
    changed.hash = changed.digest()  # re-hashed; the genuine signature is kept
    async with outsider(nats_server.url) as nc:
        ack = await nc.jetstream().publish(
            subjects.audit(TENANT, "decision"), msgspec.json.encode(changed)
        )
    ran = await verify_cli(nats_server.url)
    assert ran.exit_code == 6, ran.output
    assert f"record {ack.seq} was altered: signature does not verify" in ran.output


@pytest.mark.parametrize("forger", ["an untrusted key", "nobody (not a record)"])
async def test_a_forged_record_is_named_and_auditing_goes_on(
    forger: str, trail: AuditLog, nats_server: EmbeddedServer
) -> None:
    _, last = await tip_of(trail.bus, TENANT)
    if forger == "an untrusted key":
        body = msgspec.json.encode(forged(last, Signer.generate()))
    else:
        body = b"not an audit record"
    async with outsider(nats_server.url) as nc:
        ack = await nc.jetstream().publish(subjects.audit(TENANT, "decision"), body)

    # The writer that knew the tip (its append is refused, it re-reads) and a fresh one (whose
    # first read finds the foreign message on top) both chain from the last trusted record.
    await trail.append(TENANT, "decision", "after-1", {})
    fresh = AuditLog(trail.bus, "restarted-writer")
    await fresh.append(TENANT, "decision", "after-2", {})
    await trail.append(TENANT, "vote", "after-3", {})
    await fresh.checkpoint(TENANT)

    result = verify_bundle(await snapshot(trail.bus), trust())
    assert result.problems == [result.problems[0]], result.problems  # the forgery, only
    assert result.problems[0].startswith(f"record {ack.seq} on mesh.audit.{TENANT}.decision")
    assert "does not belong" in result.problems[0]
    assert result.count == RECORDS + 2 + 3
    after = [r for _, r in await read(trail.bus, TENANT) if r.ref.startswith("after-")]
    assert [r.index for r in after] == [RECORDS + 1, RECORDS + 2, RECORDS + 3]
    ran = await verify_cli(nats_server.url)
    assert ran.exit_code == 6
    assert f"record {ack.seq}" in ran.output and "does not belong" in ran.output
    why = "not trusted to sign audits" if forger == "an untrusted key" else "not an audit record"
    assert why in ran.output


# -- limits that drop records --------------------------------------------------------------------
LIMITS = {
    "max_msgs_per_subject": {"max_msgs_per_subject": 1},
    "max_msgs": {"max_msgs": 2},
    "max_age (emptied)": {"max_age": 1.0, "duplicate_window": 1.0},
}


def lost(output: str) -> bool:
    """Whether verify says records are missing: a chain that starts after its first record, or
    a checkpoint the stream no longer holds."""
    return "the records before it are gone" in output or "the stream holds" in output


@pytest.mark.parametrize("limit", LIMITS)
async def test_a_limits_update_that_drops_records_fails_verify(
    limit: str, trail: AuditLog, nats_server: EmbeddedServer
) -> None:
    async with outsider(nats_server.url) as nc:
        js = nc.jetstream()
        original = (await js.stream_info(subjects.AUDIT_STREAM)).config
        await js.update_stream(dataclasses.replace(original, **LIMITS[limit]))

        async def dropped() -> bool:
            state = (await js.stream_info(subjects.AUDIT_STREAM)).state
            return state.messages < RECORDS + 2 and (
                limit != "max_age (emptied)" or not state.messages
            )

        await eventually(dropped, "records dropped by the new limits")
        ran = await verify_cli(nats_server.url)
        assert ran.exit_code == 6, ran.output
        name = next(iter(LIMITS[limit]))
        assert name in ran.output  # the configuration itself is named
        assert lost(ran.output), ran.output
        # Limits put back afterwards: what is gone stays missing.
        await js.update_stream(original)
    ran = await verify_cli(nats_server.url)
    assert ran.exit_code == 6, ran.output
    assert lost(ran.output) and name not in ran.output, ran.output
    if limit == "max_age (emptied)":
        assert "verified 0 records" not in ran.output
        assert "the stream holds 0 of them" in ran.output
        # The writer goes on in the emptied stream; its next checkpoint keeps the loss evident.
        await trail.append(TENANT, "decision", "after", {})
        await trail.checkpoint(TENANT)
        result = verify_bundle(await snapshot(trail.bus), trust())
        assert any("the chain has 1 records" in p for p in result.problems), result.problems


# -- a deleted and re-created stream -------------------------------------------------------------
@pytest.mark.parametrize("refill", ["empty", "forged chain", "genuine records copied back"])
async def test_a_deleted_and_recreated_stream_fails_verify(
    refill: str, trail: AuditLog, nats_server: EmbeddedServer
) -> None:
    async with outsider(nats_server.url) as nc:
        js = nc.jetstream()
        info = await js.stream_info(subjects.AUDIT_STREAM)
        copies = [
            await js.get_msg(subjects.AUDIT_STREAM, seq)
            for seq in range(1, info.state.last_seq + 1)
        ]
        await js.delete_stream(subjects.AUDIT_STREAM)
        await js.add_stream(info.config)
        if refill == "genuine records copied back":
            for m in copies:
                await js.publish(m.subject or "", m.data or b"")
        elif refill == "forged chain":
            prev = AuditRecord(TENANT, "decision", "", "", 0, {}, "", hash=GENESIS)
            for i in range(RECORDS):
                record = forged(prev, None)  # a tidy hash chain, signed by nobody
                record.ref = f"e{i}"
                await js.publish(subjects.audit(TENANT, "decision"), msgspec.json.encode(record))
                prev = record
    ran = await verify_cli(nats_server.url)
    assert ran.exit_code == 6, ran.output
    assert f"{subjects.AUDIT_STREAM} was re-created" in ran.output
    if refill == "forged chain":
        assert "does not belong: unsigned" in ran.output
    # The writer goes on in the new stream: its checkpoints now say the stream was re-created.
    fresh = AuditLog(trail.bus, "restarted-writer")
    await fresh.append(TENANT, "decision", "after", {})
    cp = await fresh.checkpoint(TENANT)
    assert cp is not None and "re-created" in cp.broken
    ran = await verify_cli(nats_server.url, "--tenant", TENANT)
    assert ran.exit_code == 6 and "re-created" in ran.output


# -- export, and verify offline ------------------------------------------------------------------
async def test_an_exported_bundle_verifies_offline_and_names_an_altered_record(
    trail: AuditLog, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    file = tmp_path / "audit.json"
    ran = await asyncio.to_thread(cli, nats_server.url, "audit", "export", str(file))
    assert ran.exit_code == 0, ran.output
    assert f"exported {RECORDS + 2} record(s) and 2 checkpoint(s)" in ran.output
    nowhere = "nats://127.0.0.1:1"  # no NATS: the bundle is all it reads
    ran = await verify_cli(nowhere, "--bundle", str(file))
    assert ran.exit_code == 0, ran.output
    assert f"verified {RECORDS + 2} records" in ran.output
    ran = await verify_cli(nowhere, "--bundle", str(file), "--tenant", TENANT)
    assert ran.exit_code == 0 and f"verified {RECORDS} records" in ran.output

    # One record changed in the file: named.
    bundle = bundle_decoder.decode(file.read_bytes())
    victim = bundle.records[3]
    doc = msgspec.json.decode(victim.data)
    doc["data"]["outcome"] = "rejected"
    victim.data = msgspec.json.encode(doc)
    altered = tmp_path / "altered.json"
    altered.write_bytes(bundle_encoder.encode(bundle))
    ran = await verify_cli(nowhere, "--bundle", str(altered))
    assert ran.exit_code == 6
    assert f"record {victim.seq} was altered: its content does not match its hash" in ran.output

    # Another mesh's trust file believes none of it.
    other = save_trust(Trust(keys={}), tmp_path / "other-trust.json")
    ran = await verify_cli(nowhere, "--bundle", str(file), "--trust", str(other))
    assert ran.exit_code == 6 and "is not trusted to sign audits" in ran.output


def test_verify_needs_a_trust_file_or_says_how(tmp_path: Path) -> None:
    bundle = Bundle(exported_at=0.0, stream=None, records=[], checkpoints=[])
    file = tmp_path / "empty.json"
    file.write_bytes(bundle_encoder.encode(bundle))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MESH_TRUST")
        mp.setenv("MESH_HOME", str(tmp_path / ".mesh"))
        get_settings.cache_clear()
        ran = CliRunner().invoke(app, ["audit", "verify", "--bundle", str(file)])
    get_settings.cache_clear()
    assert ran.exit_code == 3
    assert "trust file" in ran.output and "MESH_TRUST" in ran.output
