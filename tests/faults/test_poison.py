"""Poison events: malformed ones and ones a handler always fails on end in the DLQ with the
original body; a replay of a dead letter goes through the coordinator again."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from coordinator.dlq import replay
from mesh import envelope, subjects
from mesh.bus import Bus
from mesh.records import DeadLetter
from tests.support import samples
from tests.support.launcher import ProcessMesh
from tests.support.outcomes import Outcomes, settled
from tests.support.waits import eventually

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(120)]

VOTER = "late-review"
LATE_SKILL = "fault-late-review"
# The no_agent case below waits this long for a voter with LATE_SKILL (the product: 30 s).
NO_AGENT_WAIT_S = 1.0
ALWAYS_RAISES = "faults-always-raises"
MAX_DELIVER = 3


async def dead_letter(
    outcomes: Outcomes, what: str, pred: Callable[[DeadLetter], bool], *, timeout: float = 30.0
) -> tuple[int, DeadLetter]:
    """The first DLQ record (MESH_DLQ sequence, record) matching `pred`."""
    got: tuple[int, DeadLetter] = await outcomes.wait_for(
        what,
        lambda o: next(((s, d) for s, d in o.dead_by_seq.items() if pred(d)), None),
        timeout=timeout,
    )
    return got


async def always_raises(bus: Bus, subject: str, outcomes: Outcomes, stream_seq: int) -> int:
    """A consumer whose handler fails on every delivery (it naks each, no delay), pulling on
    until JetStream gives up and the advisory becomes a DLQ record. Returns the deliveries."""
    psub = await bus.js.pull_subscribe(
        subject,
        durable=ALWAYS_RAISES,
        stream=subjects.EVENTS_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_deliver=MAX_DELIVER),
    )
    deliveries = 0

    async def handler_fails_then_look() -> DeadLetter | None:
        nonlocal deliveries
        try:
            [msg] = await psub.fetch(1, timeout=0.2)
        except TimeoutError:
            pass  # nothing delivered: pulling on is what makes the server give up
        else:
            deliveries += 1
            await msg.nak()  # the handler raised
        await outcomes.refresh()
        records = outcomes.dead_by_seq.values()
        return next(
            (d for d in records if d.reason == "max_deliveries" and d.stream_seq == stream_seq),
            None,
        )

    try:
        await eventually(handler_fails_then_look, "max_deliveries dead letter", timeout=30)
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
    return deliveries


async def test_poison_events_are_dead_lettered_and_replays_are_decided_again(
    bus: Bus, procs: ProcessMesh, advisories: str
) -> None:
    policy = procs.policy(
        {
            "fault.late": samples.policy(
                [LATE_SKILL],
                agent_timeout_s=2.0,
                deadline_s=5.0,
                decision_type="fault.late.decided",
            )
        },
        ignore=["fault.poison"],  # the coordinator acks these; another consumer handles them
    )
    running = await procs.up(bus, policy, reviewers=())
    run = f"poison-{time.time_ns()}"
    outcomes = Outcomes(bus)
    started = time.monotonic()

    # 1. Valid JSON, not a CloudEvent (no specversion); odd spacing and a non-ASCII escape,
    #    so "byte-identical" means something.
    no_spec = (
        b'{"id":"' + run.encode() + b'-nospec",  "source":"mesh://faults",'
        b'"type":"release.proposed" ,"data":{"x":"\\u00e9\xc3\xa9"}}'
    )
    no_spec_subject = subjects.event("default", "release.proposed")
    ack = await bus.publish(no_spec_subject, no_spec, msg_id=f"{run}-nospec")
    no_spec_seq = ack.seq

    # 2. A real CloudEvent whose type disagrees with the subject it came on.
    wrong = samples.release_event(f"{run}-wrongtype", {"n": 1}, "release.proposed")
    wrong_body = envelope.encode(wrong)
    wrong_subject = subjects.event("default", "fault.late")
    ack = await bus.publish(wrong_subject, wrong_body, msg_id=f"{run}-wrongtype")
    wrong_seq = ack.seq

    no_spec_dlq_seq, d1 = await dead_letter(
        outcomes, "no-specversion dead letter", lambda d: d.stream_seq == no_spec_seq
    )
    _, d2 = await dead_letter(
        outcomes, "wrong-type dead letter", lambda d: d.stream_seq == wrong_seq
    )
    for d, body, subject in ((d1, no_spec, no_spec_subject), (d2, wrong_body, wrong_subject)):
        assert d.reason == "malformed", d
        assert d.body == body  # byte-identical
        assert d.subject == subject
        assert d.attempts == 1
    assert d2.event_id == wrong.id and "release.proposed" in d2.error

    # 3. A handler that always raises: JetStream gives up after MAX_DELIVER deliveries. Its
    #    durable is bound before the event comes: an ignored event nobody handles would be
    #    dead-lettered `no_handler` by the coordinator instead.
    await bus.js.add_consumer(
        subjects.EVENTS_STREAM,
        ConsumerConfig(
            durable_name=ALWAYS_RAISES,
            filter_subject=subjects.event("default", "fault.poison"),
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=MAX_DELIVER,
        ),
    )
    poison = samples.release_event(f"{run}-poison", {"boom": True}, "fault.poison")
    poison_seq = (await bus.publish_event(poison)).seq
    raw_poison = await bus.js.get_msg(subjects.EVENTS_STREAM, poison_seq)
    deliveries = await always_raises(
        bus, subjects.event("default", "fault.poison"), outcomes, poison_seq
    )
    _, d3 = await dead_letter(
        outcomes,
        "max_deliveries dead letter",
        lambda d: d.reason == "max_deliveries" and d.stream_seq == poison_seq,
    )
    assert d3.attempts == MAX_DELIVER and deliveries == MAX_DELIVER
    assert d3.body == raw_poison.data
    assert d3.event_id == poison.id
    assert ALWAYS_RAISES in d3.error

    # 4. An event whose policy needs a skill no agent has: no_agent.
    late = samples.release_event(f"{run}-late", {"vote": "approve"}, "fault.late")
    await bus.publish_event(late)
    late_dlq_seq, d4 = await dead_letter(
        outcomes, "no_agent dead letter", lambda d: d.event_id == late.id
    )
    assert d4.reason == "no_agent" and LATE_SKILL in d4.error

    # 5. Replay the malformed one: still malformed, dead-lettered again, same body.
    await replay(bus, no_spec_dlq_seq)
    _, d5 = await dead_letter(
        outcomes,
        "replayed malformed event dead-lettered again",
        lambda d: d.body == no_spec and d.stream_seq > no_spec_seq,
    )
    assert d5.reason == "malformed" and d5.subject == no_spec_subject

    # 6. Start an agent with the missing skill, then replay the no_agent one: decided.
    running.agents[VOTER] = [procs.voter(VOTER, LATE_SKILL)]
    await procs.wait_agents(bus, [VOTER], alive=running.alive)
    # The coordinator sees the agent once a fresh event of that type is decided.
    probe = samples.release_event(f"{run}-probe", {"vote": "approve"}, "fault.late")
    await bus.publish_event(probe)
    assert not await outcomes.wait_all([probe.id], timeout=30, alive=running.alive)
    assert outcomes.decision(probe.id) is not None, outcomes.dead_letters(probe.id)

    await replay(bus, late_dlq_seq)

    await outcomes.wait_for(
        "replayed no_agent event decided", lambda o: o.decision(late.id), timeout=30
    )
    unsettled = await settled(bus)
    await outcomes.refresh()

    ids = [wrong.id, poison.id, late.id, probe.id]
    decided = outcomes.decided_ids()
    lost = outcomes.missing(ids) | ({no_spec_seq} - {d.stream_seq for _, d in outcomes.dead})
    reasons = sorted(d.reason for _, d in outcomes.dead)
    stall = outcomes.max_stall(ids, started)
    print(
        f"\nFAULTS poison: events=5 replays=2 dead-letters={reasons} "
        f"lost={len(lost)} doubled={sum(1 for n in decided.values() if n > 1)} "
        f"max_stall={stall:.1f}s (advisories handled by the {advisories})"
    )

    running.alive()
    assert not lost, lost
    assert not unsettled, unsettled
    late_decision = outcomes.decision(late.id)
    assert late_decision is not None
    assert late_decision.outcome == "approved", late_decision
    assert [v.agent for v in late_decision.votes] == [VOTER]
    assert decided[late.id] == 1 and decided[probe.id] == 1
    # Nothing malformed or poisoned was ever decided; each fault has its own dead letters.
    assert not decided[wrong.id] and not decided[poison.id]
    assert len(outcomes.dead_letters(late.id)) == 1  # the no_agent one; the replay decided
    assert sum(1 for _, d in outcomes.dead if d.body == no_spec) == 2
    assert [d.reason for d in outcomes.dead_letters(poison.id)] == ["max_deliveries"]
