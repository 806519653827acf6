"""Poison events: malformed ones and ones a handler always fails on end in the DLQ with the
original body; a replay of a dead letter goes through the coordinator again."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from mesh import envelope, subjects
from mesh.bus import Bus
from mesh.records import DeadLetter
from tests.faults.support import (
    SLOW_AGENT,
    FaultMesh,
    Outcomes,
    advisory_dead_letters,
    assert_alive,
    eventually,
    release_event,
    wait_agents,
    wait_consuming,
    wait_settled,
    write_policy,
    write_slow_card,
)

try:
    from coordinator.dlq import AdvisoryDeadLetters, replay

    HAVE_DLQ = AdvisoryDeadLetters is not None
except ImportError:  # pragma: no cover - only while coordinator/dlq.py is being written
    HAVE_DLQ = False

pytestmark = [
    pytest.mark.faults,
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not HAVE_DLQ,
        reason="coordinator.dlq (AdvisoryDeadLetters, replay) is not importable yet",
    ),
]

LATE_SKILL = "fault-late-review"
ALWAYS_RAISES = "faults-always-raises"
MAX_DELIVER = 3


async def dead_letter(
    outcomes: Outcomes, what: str, pred: Callable[[DeadLetter], bool], *, timeout: float = 30.0
) -> tuple[int, DeadLetter]:
    """The first DLQ record (MESH_DLQ sequence, record) matching `pred`."""

    async def found() -> tuple[int, DeadLetter] | None:
        await outcomes.refresh()
        return next(((s, d) for s, d in outcomes.dead_by_seq.items() if pred(d)), None)

    got: tuple[int, DeadLetter] = await eventually(what, found, timeout=timeout)
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

    async def failed_until_dead_lettered() -> bool:
        nonlocal deliveries
        with contextlib.suppress(TimeoutError):
            for m in await psub.fetch(1, timeout=0.2):
                deliveries += 1
                await m.nak()  # the handler raised
        await outcomes.refresh()
        return any(
            d.reason == "max_deliveries" and d.stream_seq == stream_seq
            for d in outcomes.dead_by_seq.values()
        )

    try:
        await eventually("max_deliveries dead letter", failed_until_dead_lettered, timeout=30)
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
    return deliveries


async def test_poison_events_are_dead_lettered_and_replays_are_decided_again(
    fault_bus: Bus, fault_mesh: FaultMesh, tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path / "policies.toml",
        {
            "fault.late": {
                "skills": [LATE_SKILL],
                "rule": {"kind": "unanimous"},
                "agent_timeout_s": 2.0,
                "deadline_s": 5.0,
                "retries": 1,
                "timeout_counts_as": "reject",
                "decision_type": "fault.late.decided",
            }
        },
        ignore=["fault.poison"],  # the coordinator acks these; another consumer handles them
    )
    coordinator = fault_mesh.coordinator(policy)
    alive = assert_alive(coordinator)
    await wait_consuming(fault_mesh, coordinator)
    run = f"poison-{time.time_ns()}"
    outcomes = Outcomes(fault_bus)
    started = time.monotonic()

    async with advisory_dead_letters(fault_bus) as dlq_listener:
        # 1. Valid JSON, not a CloudEvent (no specversion); odd spacing and a non-ASCII escape,
        #    so "byte-identical" means something.
        no_spec = (
            b'{"id":"' + run.encode() + b'-nospec",  "source":"mesh://faults",'
            b'"type":"release.proposed" ,"data":{"x":"\\u00e9\xc3\xa9"}}'
        )
        no_spec_subject = subjects.event("default", "release.proposed")
        ack = await fault_bus.publish(no_spec_subject, no_spec, msg_id=f"{run}-nospec")
        no_spec_seq = ack.seq

        # 2. A real CloudEvent whose type disagrees with the subject it came on.
        wrong = release_event(f"{run}-wrongtype", {"n": 1}, "release.proposed")
        wrong_body = envelope.encode(wrong)
        wrong_subject = subjects.event("default", "fault.late")
        ack = await fault_bus.publish(wrong_subject, wrong_body, msg_id=f"{run}-wrongtype")
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

        # 3. A handler that always raises: JetStream gives up after MAX_DELIVER deliveries.
        poison = release_event(f"{run}-poison", {"boom": True}, "fault.poison")
        poison_seq = (await fault_bus.publish_event(poison)).seq
        raw_poison = await fault_bus.js.get_msg(subjects.EVENTS_STREAM, poison_seq)
        deliveries = await always_raises(
            fault_bus, subjects.event("default", "fault.poison"), outcomes, poison_seq
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
        late = release_event(f"{run}-late", {"vote": "approve"}, "fault.late")
        await fault_bus.publish_event(late)
        late_dlq_seq, d4 = await dead_letter(
            outcomes, "no_agent dead letter", lambda d: d.event_id == late.id
        )
        assert d4.reason == "no_agent" and LATE_SKILL in d4.error

        # 5. Replay the malformed one: still malformed, dead-lettered again, same body.
        await replay(fault_bus, no_spec_dlq_seq)
        _, d5 = await dead_letter(
            outcomes,
            "replayed malformed event dead-lettered again",
            lambda d: d.body == no_spec and d.stream_seq > no_spec_seq,
        )
        assert d5.reason == "malformed" and d5.subject == no_spec_subject

        # 6. Start an agent with the missing skill, then replay the no_agent one: decided.
        cards = tmp_path / "cards"
        write_slow_card(cards, LATE_SKILL)
        agent = fault_mesh.slow_agent(cards)
        alive = assert_alive(coordinator, agent)
        await wait_agents(fault_bus, [SLOW_AGENT], alive=alive)
        # The coordinator sees the agent once a fresh event of that type is decided.
        probe = release_event(f"{run}-probe", {"vote": "approve"}, "fault.late")
        await fault_bus.publish_event(probe)
        assert not await outcomes.wait_all([probe.id], timeout=30, alive=alive)
        assert outcomes.decision(probe.id) is not None, outcomes.dead_letters(probe.id)

        await replay(fault_bus, late_dlq_seq)

        async def late_decided() -> bool:
            await outcomes.refresh()
            return outcomes.decision(late.id) is not None

        await eventually("replayed no_agent event decided", late_decided, timeout=30, alive=alive)
        unsettled = await wait_settled(fault_bus)
        await outcomes.refresh()

    ids = [wrong.id, poison.id, late.id, probe.id]
    decided = outcomes.decided_ids()
    lost = outcomes.missing(ids) | ({no_spec_seq} - {d.stream_seq for _, d in outcomes.dead})
    reasons = sorted(d.reason for _, d in outcomes.dead)
    stall = outcomes.max_stall(ids, started)
    print(
        f"\nFAULTS poison: events=5 replays=2 dead-letters={reasons} "
        f"lost={len(lost)} doubled={sum(1 for n in decided.values() if n > 1)} "
        f"max_stall={stall:.1f}s (advisories handled by the {dlq_listener})"
    )

    alive()
    assert not lost, lost
    assert not unsettled, unsettled
    late_decision = outcomes.decision(late.id)
    assert late_decision is not None
    assert late_decision.outcome == "approved", late_decision
    assert [v.agent for v in late_decision.votes] == [SLOW_AGENT]
    assert decided[late.id] == 1 and decided[probe.id] == 1
    # Nothing malformed or poisoned was ever decided; each fault has its own dead letters.
    assert not decided[wrong.id] and not decided[poison.id]
    assert len(outcomes.dead_letters(late.id)) == 1  # the no_agent one; the replay decided
    assert sum(1 for _, d in outcomes.dead if d.body == no_spec) == 2
    assert [d.reason for d in outcomes.dead_letters(poison.id)] == ["max_deliveries"]
