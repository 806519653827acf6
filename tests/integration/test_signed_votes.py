"""Signed votes end to end (real nats-server): a process that is not the security-review agent
cannot get a release approved in its name.

The impostor is its own NATS client. NATS permissions are not what is tested here (it connects
with the run's operator credentials, so the server lets it subscribe and write the registry):
the signature layer alone must stop it. It takes the genuine agent's place after the agent
stops: it keeps re-putting the agent's genuine signed card (still within its lifetime, so the
registry believes it and the coordinator routes to it) and answers on the agent's subjects,
"approve" to every release:
- unsigned;
- signed with its own key, claiming the genuine instance;
- signed with its own key, under an instance id of its own (no card binds it);
- with a genuine signature the agent gave for another event, replayed;
- or, instead of the genuine card, one of its own signed with another agent's trusted key.
Over 20 releases that carry an AWS key each, no approval is counted; every answer is recorded
as an `invalid` vote with the reason (or, for its own card, no agent is found at all)."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from a2a.helpers import new_data_part, new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater

from agents.security_review.agent import agent as security_review
from coordinator import policy
from coordinator.service import Coordinator
from mesh import envelope, subjects
from mesh.a2a.server import A2AServer
from mesh.bus import Bus, tail
from mesh.cards import card_to_dict
from mesh.identity import IdentityDir, Signer, load_identity
from mesh.records import DeadLetter, Decision, Vote, dead_letter_decoder, decision_decoder
from mesh.registry import Registration
from mesh.server import EmbeddedServer
from mesh.settings import Settings
from mesh.signing import BoundCard, CardSigner
from mesh.verdict import Verdict
from mesh.votes import SIGNATURE_KEY, VoteSigner
from tests.support.samples import sample
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

AGENT = "security-review"
SKILL = "release-security-review"
RELEASES = 20
_ONE_VOTER = {
    "skills": [SKILL],
    "rule": {"kind": "unanimous"},
    "agent_timeout_s": 1.5,
    "deadline_s": 4.0,
    "retries": 1,
    "decision_type": "release.decided",
}
POLICIES = {
    # A voter with no usable answer rejects (as release.proposed ships) ...
    "release.proposed": {**_ONE_VOTER, "timeout_counts_as": "reject"},
    # ... or is left out of the tally.
    "release.lenient": {**_ONE_VOTER, "timeout_counts_as": "absent"},
}
EXPECTED = {  # mode → what the coordinator says about the impostor's answer
    "unsigned": "unsigned vote",
    "own-key": "signature does not verify with the key instance",
    "own-instance": "signed by instance 'impostor-1', which has no verified card",
    "replayed": "signature does not verify with the key instance",
}


class Genuine(msgspec.Struct):
    """What the impostor took from the genuine agent: its registry entry and one signed vote."""

    registration: Registration
    vote: Vote


class Forger(AgentExecutor):
    """Answers every question with "approve", signed (or not) as its mode says."""

    def __init__(self, mode: str, genuine: Genuine) -> None:
        self.mode = mode
        self.genuine = genuine
        self.asked: list[str] = []
        self.key = Signer.generate()

    def _forge(self, message_id: str, metadata: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        approve = msgspec.to_builtins(Verdict.approve("looks fine to me"))
        instance = self.genuine.registration.instance
        if self.mode == "unsigned":
            return approve, {"brain": "rules"}
        if self.mode == "replayed":  # the genuine answer to another release, as it was signed
            v = self.genuine.vote
            assert v.verdict is not None and v.verdict.vote == "approve"
            sig = {"instance": v.instance, "at": v.signed_at, "signature": v.signature}
            return msgspec.to_builtins(v.verdict), {SIGNATURE_KEY: sig}
        if self.mode == "own-instance":
            instance = "impostor-1"
        signer = VoteSigner(AGENT, instance, self.key)  # the right payload, the wrong key
        return approve, {SIGNATURE_KEY: signer.sign(signer.question(message_id, metadata), approve)}

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message = context.message
        assert message is not None
        metadata = dict(message.metadata)
        self.asked.append(str(metadata.get("eventId", "")))
        task = context.current_task or new_task_from_user_message(message)
        await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        output, meta = self._forge(message.message_id, metadata)
        await updater.add_artifact([new_data_part(output)], name="verdict", metadata=meta)
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        del context, event_queue


@contextlib.asynccontextmanager
async def coordinating(bus: Bus) -> AsyncIterator[Coordinator]:
    coordinator = Coordinator(bus, policy.parse(POLICIES), name="coordinator-votes")
    stop = asyncio.Event()
    task = asyncio.create_task(coordinator.run(stop))
    try:
        yield coordinator
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def publish(bus: Bus, event_type: str, event_id: str, kind: str) -> str:
    await bus.publish_event(envelope.new_event(event_type, sample(kind), event_id=event_id))
    return event_id


async def decisions(bus: Bus, ids: list[str]) -> dict[str, Decision]:
    found = [decision_decoder.decode(b) for _, _, b in await tail(bus, "MESH_DECISIONS", 1000)]
    return {d.event_id: d for d in found if d.event_id in ids}


async def dead_letters(bus: Bus, ids: list[str]) -> dict[str, DeadLetter]:
    found = [dead_letter_decoder.decode(b) for _, _, b in await tail(bus, "MESH_DLQ", 1000)]
    return {d.event_id: d for d in found if d.event_id in ids}


async def decided(bus: Bus, ids: list[str]) -> dict[str, Decision]:
    async def all_there() -> dict[str, Decision] | None:
        got = await decisions(bus, ids)
        return got if len(got) == len(ids) else None

    result: dict[str, Decision] = await eventually(all_there, timeout=60)
    return result


async def genuine_vote(bus: Bus, settings: Settings, coordinator: Coordinator, run: str) -> Genuine:
    """The genuine agent approves a clean release, with a vote that verifies; then it stops."""
    async with security_review.serve(bus, http=False, settings=settings) as running:
        await eventually(lambda: _true(bool(coordinator.view.instances(AGENT))))
        eid = await publish(bus, "release.proposed", f"{run}-clean", "clean")
        (d,) = (await decided(bus, [eid])).values()
        registration = running.registration
    (vote,) = d.votes
    assert d.outcome == "approved"
    assert vote.outcome == "voted" and vote.counted_as == "approve"
    assert vote.instance == registration.instance
    assert vote.signature and vote.signed_at > 0
    return Genuine(registration=registration, vote=vote)


@contextlib.asynccontextmanager
async def impostor(
    server: EmbeddedServer, settings: Settings, forger: Forger, registration: Registration
) -> AsyncIterator[None]:
    """Another NATS client: keeps `registration` fresh in the registry and answers on the
    agent's shared subject and on the registration's own."""
    async with await Bus.connect(server.url, name="impostor", settings=settings) as bus:
        kv = await bus.kv(subjects.CARDS_BUCKET)
        card = registration.agent_card()
        a2a = A2AServer(card, forger, task_store=InMemoryTaskStore(), idempotent=False)
        serve = a2a.nats_callback(bus.nc)
        subs = [
            await bus.nc.subscribe(subjects.a2a(AGENT), queue=AGENT, cb=serve),
            await bus.nc.subscribe(subjects.a2a_instance(AGENT, registration.instance), cb=serve),
        ]

        async def heartbeat() -> None:
            while True:
                fresh = msgspec.structs.replace(registration, seen_at=time.time())
                await kv.put(fresh.key, msgspec.json.encode(fresh))
                await asyncio.sleep(settings.heartbeat_s)

        beat = asyncio.create_task(heartbeat())
        try:
            yield
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            with contextlib.suppress(Exception):
                await kv.delete(registration.key)
            for sub in subs:
                await sub.unsubscribe()
            await a2a.aclose()


def releases(run: str) -> list[tuple[str, str]]:
    """(event type, event id) of the secret-bearing releases, alternating the two policies."""
    types = ["release.proposed", "release.lenient"]
    return [(types[i % 2], f"{run}-secret-{i:02d}") for i in range(RELEASES)]


def assert_no_approval_counted(ds: dict[str, Decision]) -> None:
    for d in ds.values():
        assert d.outcome != "approved", d
        assert all(v.counted_as != "approve" for v in d.votes), d


@pytest.mark.parametrize("mode", list(EXPECTED))
async def test_an_impostor_answering_as_security_review_gets_no_approval(
    nats_server: EmbeddedServer, bus: Bus, settings: Settings, mode: str
) -> None:
    run = f"imp-{mode}"
    async with coordinating(bus) as coordinator:
        genuine = await genuine_vote(bus, settings, coordinator, run)
        forger = Forger(mode, genuine)
        async with impostor(nats_server, settings, forger, genuine.registration):
            await eventually(lambda: _true(bool(coordinator.view.instances(AGENT))))
            events = releases(run)
            for event_type, eid in events:
                await publish(bus, event_type, eid, "secret")
            ids = [eid for _, eid in events]
            ds = await decided(bus, ids)
    assert sorted(forger.asked) == sorted(ids)  # every question reached the impostor
    assert_no_approval_counted(ds)
    for event_type, eid in events:
        d = ds[eid]
        (vote,) = d.votes
        assert vote.outcome == "invalid", vote
        assert vote.verdict is not None and vote.verdict.vote == "approve"  # what it claimed
        assert EXPECTED[mode] in vote.error, vote.error
        assert vote.attempts == 1  # not retried: the same answer would come again
        assert not vote.instance and not vote.signature and not vote.signed_at
        assert not vote.brain
        if event_type == "release.proposed":
            assert vote.counted_as == "reject" and d.outcome == "rejected"
        else:
            assert vote.counted_as is None and d.outcome == "no_quorum"


async def test_an_impostor_with_its_own_card_is_never_asked(
    nats_server: EmbeddedServer,
    bus: Bus,
    settings: Settings,
    identities: IdentityDir,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Signed with the key of another agent (trusted for that one) or its own: the card is
    refused, so no agent has the skill and every release is dead-lettered, never approved."""
    other = load_identity(identities.issue("agent", "compliance-review-x")).signer()
    async with coordinating(bus) as coordinator:
        genuine = await genuine_vote(bus, settings, coordinator, "imp-own-card")
        for n, signer in enumerate((other, Signer.generate())):
            bound = BoundCard(
                genuine.registration.agent_card(),
                instance=f"impostor-{n}",
                key=Signer.generate(),
                signer=CardSigner(signer),
                direct_subject=subjects.a2a_instance(AGENT, f"impostor-{n}"),
            )
            own = msgspec.structs.replace(
                genuine.registration,
                instance=bound.instance,
                card=card_to_dict(bound.card),
                direct_subject=bound.direct_subject,
            )
            forger = Forger("own-instance", genuine)
            async with impostor(nats_server, settings, forger, own):
                await eventually(lambda: _true(_refused(caplog, own.instance)))  # noqa: B023
                refusal = _refused(caplog, own.instance)
                assert f"no key trusted to sign cards for {AGENT}" in refusal, refusal
                assert coordinator.view.instances(AGENT) == []
                ids = await _dead_lettered(bus, [eid for _, eid in releases(f"imp-card-{n}")[:5]])
            assert forger.asked == []
            assert await decisions(bus, ids) == {}
            assert {d.reason for d in (await dead_letters(bus, ids)).values()} == {"no_agent"}


def _refused(caplog: pytest.LogCaptureFixture, instance: str) -> str:
    """The coordinator registry's refusal of `instance`'s card ("" until it is logged)."""
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "mesh.registry" and f"instance {instance} " in r.getMessage()
    ]
    return lines[0] if lines else ""


async def _dead_lettered(bus: Bus, ids: list[str]) -> list[str]:
    for i, eid in enumerate(ids):
        await publish(bus, ["release.proposed", "release.lenient"][i % 2], eid, "secret")

    async def all_dead() -> bool:
        return len(await dead_letters(bus, ids)) == len(ids)

    await eventually(all_dead, timeout=30)
    return ids


async def _true(v: bool) -> bool:
    return v
