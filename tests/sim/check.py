"""The promises, checked after every simulated run (faults have stopped, time has run out).

- `decided_not_published`: the ledger holds a decision that was never published;
- `no_outcome`: an event ends with neither a decision nor a dead letter (except when its
  max-deliveries advisory was lost: core NATS, documented in coordinator.dlq; counted apart);
- `both`: an event has a decision and a dead letter;
- `dead_lettered_twice`: two DLQ records (different message ids) for one delivery;
- `decided_twice`: two different decisions were published for one event (the second is
  refused by the server, but two coordinators each recorded one);
- `contradicts_votes`: re-tallied under the policy, the votes make another outcome;
- `not_what_was_said`: a counted vote is not what the agent answered;
- `late_vote_counted`: a counted vote was answered after the deadline (plus the take-over
  grace when there was a take-over);
- `non_member`: a vote from a skill that is not in the policy, or a skill counted twice;
- `ledger_disagrees`: the ledger's final state is not the published outcome.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from coordinator.decide import TAKEOVER_GRACE_MAX_S, count
from coordinator.ledger import DecisionState, state_key

if TYPE_CHECKING:
    from tests.sim.world import Violation, World

EPS = 1e-6


def check(world: World) -> list[Violation]:
    from tests.sim.world import POLICIES, Violation

    out: list[Violation] = []
    dead: dict[str, list[str]] = {}
    for msg_id, record in world.dlq.items():
        dead.setdefault(record.event_id or "?", []).append(msg_id)
    for event in world.events:
        eid = event.id
        decision = world.decisions.get(eid)
        dls = dead.get(eid, [])
        entry = world.kv.latest(state_key(event.tenant, eid))
        final = msgspec.json.decode(entry.value, type=DecisionState) if entry else None
        if decision is None and not dls:
            if eid in world.lost_advisories:
                world.bump("lost_advisory")  # at most once, documented: see coordinator.dlq
            elif final is not None and final.state == "decided":
                out.append(Violation("decided_not_published", eid, "decided in the ledger only"))
            else:
                out.append(Violation("no_outcome", eid, "neither decided nor dead-lettered"))
        if decision is not None and dls:
            out.append(Violation("both", eid, f"decided {decision.outcome} and DLQ {dls}"))
        if len(dls) > 1:
            out.append(Violation("dead_lettered_twice", eid, f"{dls}"))
        attempts = {body for _, body in world.decision_attempts.get(eid, [])}
        if len(attempts) > 1:
            who = sorted({by for by, _ in world.decision_attempts[eid]})
            out.append(Violation("decided_twice", eid, f"{len(attempts)} decisions by {who}"))
        # The ledger's last word.
        if decision is not None and (final is None or final.state != "decided"):
            out.append(Violation("ledger_disagrees", eid, f"published a decision, ledger: {final}"))
        if dls and final is not None and final.state == "decided":
            out.append(Violation("ledger_disagrees", eid, "dead-lettered, ledger: decided"))
        if decision is None:
            continue
        world.bump(f"decided_{decision.outcome}")
        pol = POLICIES.get(event.type)
        if pol is None:
            out.append(Violation("contradicts_votes", eid, "decided without a policy"))
            continue
        skills = [v.skill for v in decision.votes]
        if sorted(skills) != sorted(pol.skills):
            out.append(Violation("non_member", eid, f"votes from {skills}, policy {pol.skills}"))
            continue
        votes = {v.skill: v for v in decision.votes}
        again = count(pol, votes, final=True).outcome
        if again != decision.outcome:
            out.append(
                Violation("contradicts_votes", eid, f"{decision.outcome}, re-tallied {again}")
            )
        # The first claim fixed the deadline; the ledger's first version holds it.
        first = world.kv.history[state_key(event.tenant, eid)][0]
        deadline = msgspec.json.decode(first.value, type=DecisionState).deadline_at
        grace = min(pol.agent_timeout_s, TAKEOVER_GRACE_MAX_S) if decision.takeovers else 0.0
        for v in decision.votes:
            if v.outcome != "voted":
                continue
            nonce = v.verdict.reasons[0] if v.verdict and v.verdict.reasons else ""
            made = world.made.get(nonce)
            if made is None or (made.event_id, made.skill, made.choice) != (
                eid,
                v.skill,
                v.counted_as,
            ):
                out.append(Violation("not_what_was_said", eid, f"{v.skill}: {v.counted_as}"))
                continue
            # Clocks may be off by up to skew_s each: the first claimer's and the decider's.
            if made.at > deadline + grace + 2 * world.knobs.skew_s + EPS:
                out.append(
                    Violation(
                        "late_vote_counted",
                        eid,
                        f"{v.skill} answered {made.at - deadline:.3f}s after the deadline "
                        f"(grace {grace}s)",
                    )
                )
    return out
