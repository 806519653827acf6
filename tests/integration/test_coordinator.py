"""The coordinator on a real nats-server with real agents: decisions, timeouts, dead letters."""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from coordinator import policy
from coordinator.ledger import (
    DeadLettered,
    Entry,
    KvStore,
    Ledger,
    MemoryStore,
    StateConflict,
    Store,
    state_key,
)
from coordinator.service import Coordinator
from mesh import Agent, Verdict, envelope, subjects
from mesh.bus import Bus, tail
from mesh.console.data import coordinator_status
from mesh.records import DeadLetter, Decision, dead_letter_decoder, decision_decoder
from mesh.settings import Settings
from tests.support.samples import Proposal, voting_agent, write_card
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

POLICIES = {
    "vote.unanimous": {
        "skills": ["s1", "s2", "s3"],
        "rule": {"kind": "unanimous"},
        "agent_timeout_s": 0.5,
        "deadline_s": 1.5,
        "retries": 1,
        "timeout_counts_as": "reject",
    },
    "vote.majority": {
        "skills": ["s1", "s2", "s3"],
        "rule": {"kind": "majority"},
        "agent_timeout_s": 0.5,
        "deadline_s": 1.5,
        "timeout_counts_as": "absent",
    },
    "vote.orphan": {"skills": ["s1", "nobody-has-this"], "rule": {"kind": "majority"}},
}


@pytest.fixture
async def mesh(bus: Bus, settings: Settings, tmp_path: Path) -> AsyncIterator[Bus]:
    """Three voting agents (s1..s3; a2 honours delay_s) and one coordinator."""
    agents = [voting_agent(tmp_path, f"a{i}", f"s{i}", honour_delay=(i == 2)) for i in (1, 2, 3)]
    async with contextlib.AsyncExitStack() as stack:
        for a in agents:
            await stack.enter_async_context(a.serve(bus, http=False, settings=settings))
        stop = asyncio.Event()
        task = asyncio.create_task(Coordinator(bus, policy.parse(POLICIES)).run(stop))
        try:
            yield bus
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


async def publish(bus: Bus, event_type: str, data: Any, event_id: str | None = None) -> str:
    e = envelope.new_event(event_type, data, event_id=event_id)
    await bus.publish_event(e)
    return e.id


async def decisions(bus: Bus) -> list[Decision]:
    return [decision_decoder.decode(b) for _, _, b in await tail(bus, "MESH_DECISIONS", 500)]


async def dead_letters(bus: Bus) -> list[DeadLetter]:
    return [dead_letter_decoder.decode(b) for _, _, b in await tail(bus, "MESH_DLQ", 500)]


async def decision_for(bus: Bus, event_id: str) -> Decision:
    async def found() -> bool:
        return any(d.event_id == event_id for d in await decisions(bus))

    await eventually(found)
    return next(d for d in await decisions(bus) if d.event_id == event_id)


async def dead_letter_for(bus: Bus, pred: Any) -> DeadLetter:
    async def found() -> bool:
        return any(pred(d) for d in await dead_letters(bus))

    await eventually(found)
    return next(d for d in await dead_letters(bus) if pred(d))


async def test_all_approve_is_approved_with_every_vote(mesh: Bus) -> None:
    d = await decision_for(mesh, await publish(mesh, "vote.unanimous", {"vote": "approve"}))
    assert d.outcome == "approved"
    assert d.decision_type == "vote.decided"
    assert [v.agent for v in d.votes] == ["a1", "a2", "a3"]
    assert all(v.outcome == "voted" and v.counted_as == "approve" for v in d.votes)
    assert all(v.verdict and v.verdict.reasons for v in d.votes)


async def test_one_reject_rejects_under_unanimity(mesh: Bus) -> None:
    d = await decision_for(mesh, await publish(mesh, "vote.unanimous", {"vote": "reject"}))
    assert d.outcome == "rejected"


async def test_slow_agent_times_out_and_counts_per_policy(mesh: Bus) -> None:
    eid = await publish(mesh, "vote.unanimous", {"vote": "approve", "delay_s": 2})
    d = await decision_for(mesh, eid)
    slow = next(v for v in d.votes if v.agent == "a2")
    assert slow.outcome == "timeout" and slow.counted_as == "reject"
    assert slow.attempts == 2  # retries=1, both within the deadline
    assert d.outcome == "rejected"


async def test_absent_timeouts_leave_the_majority_to_the_others(mesh: Bus) -> None:
    eid = await publish(mesh, "vote.majority", {"vote": "approve", "delay_s": 2})
    d = await decision_for(mesh, eid)
    assert d.outcome == "approved"
    slow = next(v for v in d.votes if v.agent == "a2")
    assert slow.outcome == "timeout" and slow.counted_as is None


async def test_malformed_body_is_dead_lettered_with_original_bytes(mesh: Bus) -> None:
    raw = b'{"id": "x", "servi'
    await mesh.publish(subjects.event("default", "vote.unanimous"), raw, msg_id="m-1")
    dl = await dead_letter_for(mesh, lambda d: d.reason == "malformed")
    assert dl.body == raw
    assert dl.subject == "mesh.evt.default.vote.unanimous"
    assert dl.stream_seq > 0 and dl.attempts == 1
    assert "CloudEvent" in dl.error


async def test_unknown_type_is_dead_lettered(mesh: Bus) -> None:
    eid = await publish(mesh, "invoice.created", {"a": 1})
    dl = await dead_letter_for(mesh, lambda d: d.event_id == eid)
    assert dl.reason == "unknown_type"
    assert "invoice.created" in dl.error and "vote.unanimous" in dl.error
    assert msgspec.json.decode(dl.body)["data"] == {"a": 1}


async def test_no_live_agent_for_a_skill_is_dead_lettered(mesh: Bus) -> None:
    eid = await publish(mesh, "vote.orphan", {})
    dl = await dead_letter_for(mesh, lambda d: d.event_id == eid)
    assert dl.reason == "no_agent" and "nobody-has-this" in dl.error


async def test_envelope_disagreeing_with_its_subject_is_malformed(mesh: Bus) -> None:
    e = envelope.new_event("vote.unanimous", {}, tenant="acme")
    await mesh.publish(subjects.event("other", "vote.unanimous"), envelope.encode(e))
    dl = await dead_letter_for(mesh, lambda d: d.event_id == e.id)
    assert dl.reason == "malformed" and "tenant" in dl.error


async def test_an_event_is_never_decided_twice(mesh: Bus) -> None:
    e = envelope.new_event("vote.unanimous", {"vote": "approve"})
    await mesh.publish_event(e)
    await decision_for(mesh, e.id)
    # Re-published past the stream's dedup (another message id): the decision state holds.
    await mesh.publish(
        subjects.event("default", "vote.unanimous"), envelope.encode(e), msg_id="bypass-dedup"
    )
    marker = await publish(mesh, "vote.unanimous", {"vote": "approve"})
    await decision_for(mesh, marker)  # events are handled in parallel; wait past the re-publish
    info = await mesh.js.consumer_info(subjects.EVENTS_STREAM, subjects.COORDINATOR_DURABLE)
    assert info.num_ack_pending == 0
    assert [d.event_id for d in await decisions(mesh)].count(e.id) == 1


async def test_progress_extends_the_call_past_its_timeout(
    bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    """A slow agent that is alive (progress frames) gets up to agent_timeout_max_s; a paused
    one would not (see the fault tests)."""
    slow = voting_agent(tmp_path, "slowpoke", "slow", honour_delay=True)
    policies = policy.parse(
        {
            "vote.slow": {
                "skills": ["slow"],
                "rule": {"kind": "unanimous"},
                "agent_timeout_s": 0.3,
                "agent_timeout_max_s": 3.0,
                "deadline_s": 4.0,
                "retries": 0,
            },
            "vote.strict": {
                "skills": ["slow"],
                "rule": {"kind": "unanimous"},
                "agent_timeout_s": 0.3,
                "deadline_s": 4.0,
                "retries": 0,
            },
        }
    )
    async with slow.serve(bus, http=False, settings=settings):
        stop = asyncio.Event()
        task = asyncio.create_task(Coordinator(bus, policies).run(stop))
        try:
            patient = await decision_for(bus, await publish(bus, "vote.slow", {"delay_s": 1.0}))
            strict = await decision_for(bus, await publish(bus, "vote.strict", {"delay_s": 1.0}))
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    assert patient.outcome == "approved" and patient.votes[0].outcome == "voted"
    assert strict.outcome == "rejected" and strict.votes[0].outcome == "timeout"


async def test_decisions_dead_letters_and_policies_are_audited(mesh: Bus) -> None:
    from mesh.audit import read, summary, verify, votes_of

    eid = await publish(mesh, "vote.unanimous", {"vote": "approve"})
    await decision_for(mesh, eid)
    bad = await publish(mesh, "invoice.created", {})
    await dead_letter_for(mesh, lambda d: d.event_id == bad)

    async def audited() -> bool:
        kinds = [(r.kind, r.ref) for _, r in await read(mesh)]
        return ("dead_letter", bad) in kinds and ("decision", eid) in kinds

    await eventually(audited)
    records = await read(mesh)
    assert verify(records).ok
    mine = [r for _, r in records if r.ref == eid]
    assert [r.kind for r in mine] == ["decision"]  # one record, its votes inside (issue 14)
    assert mine[0].data["outcome"] == "approved"
    assert sorted(v["skill"] for v in votes_of(mine[0])) == ["s1", "s2", "s3"]
    assert all(v["verdict"]["vote"] == "approve" for v in votes_of(mine[0]))
    assert summary(mine[0]).startswith("approved; votes: ")
    assert any(r.kind == "policy_change" and r.tenant == "_mesh" for _, r in records)


# -- the ledger and dead letters ----------------------------------------------------------------
@pytest.fixture(params=["jetstream-kv", "memory"])
async def store(request: pytest.FixtureRequest, bus: Bus) -> Store:
    if request.param == "memory":
        return MemoryStore()
    return KvStore(await bus.kv(f"contract_{uuid.uuid4().hex[:8]}"))


async def test_the_memory_store_keeps_the_kv_contract(store: Store) -> None:
    """The unit tests of the decision core run on MemoryStore: it must behave as JetStream KV."""
    assert await store.get("k") is None
    r1 = await store.create("k", b"1")
    with pytest.raises(StateConflict):
        await store.create("k", b"again")
    with pytest.raises(StateConflict):
        await store.update("k", b"2", r1 + 100)
    r2 = await store.update("k", b"2", r1)
    assert r2 > r1
    assert await store.get("k") == Entry(b"2", r2)
    with pytest.raises(StateConflict):
        await store.update("k", b"3", r1)  # a stale revision
    r3 = await store.update("other", b"x", 0)  # revision 0: only if it does not exist yet
    assert r3 > r2
    with pytest.raises(StateConflict):
        await store.update("other", b"y", 0)


async def test_a_redelivery_of_a_dead_lettered_event_publishes_its_record(
    bus: Bus, tmp_path: Path
) -> None:
    """A coordinator that marked the ledger and died before publishing the dead letter: the
    redelivery finds the mark and publishes the record and its audit entry (once)."""
    from mesh.audit import read

    e = envelope.new_event("vote.orphan", {})
    ack = await bus.publish_event(e)
    # A real coordinator's mark: signed with a trusted key (an unsigned one would be ignored).
    ledger = await Ledger.on_bus(bus, "crashed-coordinator", 2.0)
    marked = await ledger.mark_dead_lettered(
        state_key("default", e.id), stream_seq=ack.seq, reason="no_agent", error="from before"
    )
    assert isinstance(marked, DeadLettered)

    async with running_coordinator(bus, policy.parse(POLICIES)):
        dl = await dead_letter_for(bus, lambda d: d.event_id == e.id)

        async def acked() -> bool:
            info = await bus.js.consumer_info(subjects.EVENTS_STREAM, subjects.COORDINATOR_DURABLE)
            return info.num_ack_pending == 0 and info.num_pending == 0

        await eventually(acked)
    assert (dl.reason, dl.error, dl.stream_seq) == ("no_agent", "from before", ack.seq)
    assert [d.event_id for d in await dead_letters(bus)].count(e.id) == 1
    audited = [r for _, r in await read(bus) if r.kind == "dead_letter" and r.ref == e.id]
    assert len(audited) == 1 and audited[0].data["reason"] == "no_agent"


async def test_a_decided_event_is_never_dead_lettered_too(mesh: Bus) -> None:
    """The same event id again, now of a type nobody decides: its decision stands, and the
    ledger refuses the dead letter (decided or dead-lettered, never both)."""
    e = envelope.new_event("vote.unanimous", {"vote": "approve"})
    await mesh.publish_event(e)
    await decision_for(mesh, e.id)
    again = envelope.new_event("invoice.created", {}, event_id=e.id)
    await mesh.publish_event(again)
    marker = await publish(mesh, "invoice.created", {})
    await dead_letter_for(mesh, lambda d: d.event_id == marker)  # handled after the repeat

    async def acked() -> bool:
        info = await mesh.js.consumer_info(subjects.EVENTS_STREAM, subjects.COORDINATOR_DURABLE)
        return info.num_ack_pending == 0

    await eventually(acked)
    assert all(d.event_id != e.id for d in await dead_letters(mesh))
    kv = await mesh.kv(subjects.DECISIONS_BUCKET)
    state = await Ledger(KvStore(kv), "reader", 2.0).read(state_key("default", e.id))
    assert state is not None and state.state == "decided"


@contextlib.asynccontextmanager
async def running_coordinator(bus: Bus, policies: policy.Policies) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(Coordinator(bus, policies).run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_foreign_audit_message_does_not_stop_auditing_and_stop_checkpoints(
    bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    """Something that is no audit record lands on the tenant's audit subjects (an outside
    client); the coordinator goes on auditing past it, and anchors its chain in a signed
    checkpoint when it stops: verify reports the foreign message and nothing else."""
    from mesh.audit import snapshot, verify_bundle
    from mesh.identity import resolve_trust
    from tests.integration.test_audit_trust import ensure_checkpoints

    await ensure_checkpoints(bus)
    agents = [voting_agent(tmp_path, f"a{i}", f"s{i}") for i in (1, 2, 3)]
    async with contextlib.AsyncExitStack() as stack:
        for a in agents:
            await stack.enter_async_context(a.serve(bus, http=False, settings=settings))
        async with running_coordinator(bus, policy.parse(POLICIES)):
            first = await publish(bus, "vote.unanimous", {"vote": "approve"})
            await decision_for(bus, first)
            ack = await bus.js.publish(subjects.audit("default", "decision"), b"\x00 not a record")
            second = await publish(bus, "vote.unanimous", {"vote": "reject"})
            await decision_for(bus, second)

            async def audited() -> bool:
                from mesh.audit import read

                return any(r.ref == second and r.kind == "decision" for _, r in await read(bus))

            await eventually(audited)
    result = verify_bundle(await snapshot(bus), resolve_trust(bus.settings))
    assert len(result.problems) == 1 and f"record {ack.seq} on" in result.problems[0]
    # two decisions (their votes inside), one policy change, one authorization policy set
    assert result.count == 2 + 2
    assert result.notes == []  # every tenant checkpointed (on stop)


async def test_a_tenant_past_its_events_at_once_is_dead_lettered_before_any_agent_is_asked(
    bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    """`[tenants.noisy] events_at_once = 1`: while one of the tenant's events is being decided,
    its next is dead-lettered `over_quota` at once (its agent never asked), another tenant's is
    decided meanwhile, and once the first is done the tenant's events are decided again."""
    asked: list[str] = []
    release = asyncio.Event()
    agent = Agent("quota-voter", card=write_card(tmp_path, "quota-voter", "sq"))

    async def review(p: Proposal) -> Verdict:
        asked.append(p.id)
        if p.vote == "hold":
            await release.wait()
        return Verdict.approve("ok")

    agent.rules(review)
    policies = policy.parse(
        {
            "vote.quota": {
                "skills": ["sq"],
                "rule": {"kind": "majority"},
                "agent_timeout_s": 20,
                "deadline_s": 30,
            },
            "tenants": {"noisy": {"events_at_once": 1}},
        }
    )

    async def publish_for(tenant: str, eid: str, vote: str = "approve") -> None:
        data = {"id": eid, "vote": vote}
        await bus.publish_event(envelope.new_event("vote.quota", data, event_id=eid, tenant=tenant))

    async with agent.serve(bus, http=False, settings=settings), running_coordinator(bus, policies):
        await publish_for("noisy", "q-held", "hold")
        await eventually(lambda: asked == ["q-held"], "the first event reached its agent")
        await publish_for("noisy", "q-refused")
        refused = await dead_letter_for(bus, lambda d: d.event_id == "q-refused")
        # What `mesh budgets` shows of it: the coordinator's own count against the limit.
        (status,) = await coordinator_status(bus)
        assert status["tenants"] == {"noisy": {"deciding": 1, "eventsAtOnce": 1}}
        await publish_for("quiet", "q-other")
        other = await decision_for(bus, "q-other")
        release.set()
        held = await decision_for(bus, "q-held")
        await publish_for("noisy", "q-after")
        after = await decision_for(bus, "q-after")
    assert refused.reason == "over_quota" and refused.tenant == "noisy"
    assert "tenant noisy already has 1 event(s) being decided" in refused.error
    assert "events_at_once" in refused.error
    assert [d.outcome for d in (held, other, after)] == ["approved"] * 3
    assert asked == ["q-held", "q-other", "q-after"]  # the refused one was never asked
