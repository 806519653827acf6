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
- `late_vote_counted`: a counted vote was answered after the deadline in force when it was
  asked (the ledger's, at that moment: a released event's next claim starts a fresh one),
  plus the take-over grace when there was a take-over;
- `stale_deadline`: a released (`waiting`) event was claimed again without a fresh deadline;
- `unreachable_counted`: a decision counted a voter nobody could ask (no responders) as
  silence although its vote could have changed the outcome (the event must wait for it);
- `non_member`: a vote from a skill that is not in the policy, or a skill counted twice;
- `ledger_disagrees`: the ledger's final state is not the published outcome;
- `audit_chain`: the audit stream, checked as `mesh audit verify` checks it
  (`mesh.audit.verify_bundle`: every record chains to its predecessor, no fork, no gap), fails;
- `not_audited`: a published decision or dead letter has no audit record (except when its
  max-deliveries advisory was lost, as for `no_outcome`);
- `audited_twice`: an event's decision, or a dead letter, has two audit records
  (`audited_after_window`: the repeat came after the stream's duplicate window, 120 s);
- `stuck_awaiting_human`: an event still waits for people at the end (no request timer or
  answer will come to move it on: its requests never went out, or their timers were acked);
- people's votes (`_human_votes`): `human_not_said`, `human_role_not_asked`,
  `late_human_vote`, `silence_too_early`, `wrong_silence`, `decided_while_waiting`.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import msgspec

from coordinator.decide import NOBODY_LISTENING, TAKEOVER_GRACE_MAX_S, count
from coordinator.ledger import DecisionState, state_key
from mesh import audit
from tests.sim import people

if TYPE_CHECKING:
    from tests.sim.world import Violation, World

EPS = 1e-6


def check(world: World) -> list[Violation]:
    from tests.sim.world import POLICIES, Violation

    out: list[Violation] = _audit_trail(world)
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
            elif final is not None and final.state == "awaiting_human":
                out.append(Violation("stuck_awaiting_human", eid, "still waits for people"))
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
        pol = POLICIES.get(event.type)
        out += _fresh_deadlines(world, eid, state_key(event.tenant, eid), pol)
        if decision is None:
            continue
        world.bump(f"decided_{decision.outcome}")
        if pol is None:
            out.append(Violation("contradicts_votes", eid, "decided without a policy"))
            continue
        skills = [v.skill for v in decision.votes]
        if sorted(skills) != sorted(pol.voters):
            out.append(Violation("non_member", eid, f"votes from {skills}, policy {pol.voters}"))
            continue
        votes = {v.skill: v for v in decision.votes}
        again = count(pol, votes, final=True).outcome
        if again != decision.outcome:
            out.append(
                Violation("contradicts_votes", eid, f"{decision.outcome}, re-tallied {again}")
            )
        # Judged here, not by decide.unreachable (a mutant may replace that one).
        gone = [
            s
            for s, v in votes.items()
            if v.outcome == "unavailable" and v.error.startswith(NOBODY_LISTENING)
        ]
        rest = {s: v for s, v in votes.items() if s not in gone}
        if gone and count(pol, rest, final=False).outcome == "pending":
            out.append(
                Violation("unreachable_counted", eid, f"{gone} counted as {decision.outcome}")
            )
        key = state_key(event.tenant, eid)
        grace = min(pol.agent_timeout_s, TAKEOVER_GRACE_MAX_S) if decision.takeovers else 0.0
        out += _human_votes(world, eid, key, pol, decision)
        for v in decision.votes:
            if v.outcome != "voted" or pol.human(v.skill) is not None:
                continue  # people's answers: `_human_votes`
            nonce = v.verdict.reasons[0] if v.verdict and v.verdict.reasons else ""
            made = world.made.get(nonce)
            if made is None or (made.event_id, made.skill, made.choice) != (
                eid,
                v.skill,
                v.counted_as,
            ):
                out.append(Violation("not_what_was_said", eid, f"{v.skill}: {v.counted_as}"))
                continue
            deadline = _in_force(world, key, _asked_at(v.verdict.reasons if v.verdict else []))
            # Clocks may be off by up to skew_s each: the claimer's and the decider's.
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


def _states(world: World, key: str) -> list[tuple[float, DecisionState]]:
    """Every version of the key's ledger state, with the world time it landed."""
    return [
        (at, msgspec.json.decode(e.value, type=DecisionState))
        for at, e in zip(world.kv.written[key], world.kv.history[key], strict=True)
    ]


def _asked_at(reasons: list[str]) -> float | None:
    """When the vote was asked (the simulated asker writes it after the nonce)."""
    for r in reasons[1:]:
        if r.startswith("asked at "):
            return float(r.removeprefix("asked at "))
    return None


def _in_force(world: World, key: str, asked_at: float | None) -> float:
    """The deadline the ledger held when the vote was asked: that of the last claim (or vote,
    under it) written by then. A claimer writes its claim before it asks, and a later claim's
    deadline is never earlier (a take-over keeps it, a re-claim or replay starts afresh), so
    this is never earlier than the asker's own."""
    states = _states(world, key)
    deadline = states[0][1].deadline_at
    for at, state in states:
        if asked_at is not None and at > asked_at:
            break
        if state.state == "collecting":
            deadline = state.deadline_at
    return deadline


def _fresh_deadlines(world: World, eid: str, key: str, pol: Any) -> list[Violation]:
    """A claim of a released (`waiting`) event starts a fresh deadline: at least `deadline_s`
    after the release landed (the claimer read it first), give or take its clock's skew."""
    from tests.sim.world import WALL0, Violation

    if pol is None or key not in world.kv.history:
        return []
    out = []
    states = _states(world, key)
    for (released_at, before), (_, after) in itertools.pairwise(states):
        if before.state != "waiting" or after.state != "collecting":
            continue
        fresh = WALL0 + released_at + pol.deadline_s - world.knobs.skew_s - EPS
        if after.deadline_at < fresh:
            out.append(
                Violation(
                    "stale_deadline",
                    eid,
                    f"re-claimed with a deadline {fresh - after.deadline_at:.3f}s too early",
                )
            )
    return out


def _audit_trail(world: World) -> list[Violation]:
    """The audit stream as `mesh audit verify` checks it, and one record per outcome."""
    from tests.sim.world import WALL0, Violation

    stored = [audit.Stored(m.seq, m.subject, m.data) for m in world.audit_stream.msgs]
    bundle = audit.Bundle(exported_at=WALL0, stream=None, records=stored, checkpoints=[])
    verdict = audit.verify_bundle(bundle, None, now=WALL0)
    out = [Violation("audit_chain", "-", problem) for problem in verdict.problems]
    records: dict[tuple[str, str], list[float]] = {}
    for m in world.audit_stream.msgs:
        record = msgspec.json.decode(m.data, type=audit.AuditRecord)
        records.setdefault((record.kind, record.ref), []).append(m.at)
    for (kind, ref), times in sorted(records.items()):
        if len(times) > 1 and kind in ("decision", "dead_letter"):
            # Past the stream's duplicate window the server cannot tell a repeat: apart.
            apart = max(times) - min(times) >= world.audit_stream.window_s
            what = "audited_after_window" if apart else "audited_twice"
            out.append(Violation(what, ref, f"{len(times)} {kind} records at {times}"))
    dead = {r.event_id or f"seq:{r.stream_seq}" for r in world.dlq.values()}
    for kind, refs in (("decision", set(world.decisions)), ("dead_letter", dead)):
        for ref in sorted(refs):
            if (kind, ref) not in records and ref not in world.lost_advisories:
                out.append(Violation("not_audited", ref, f"{kind} published, no audit record"))
    return out


def _human_votes(world: World, eid: str, key: str, pol: Any, decision: Any) -> list[Violation]:
    """People's votes in a decision, held to what coordinator.humans promises (times on the
    ledger's wall clock; each coordinator's clock may be off by `skew_s`):

    - `human_not_said`: a counted answer is not one a person gave (for that voter);
    - `human_role_not_asked`: its person held no role the chain had reached when the answer
      was recorded;
    - `late_human_vote`: recorded at or after the voter's expiry;
    - `silence_too_early` / `wrong_silence`: a voter's silence recorded before its expiry, or
      not counted as its `silence` says;
    - `decided_while_waiting`: a voter still inside its window marked "not needed" although
      its vote could still have changed the outcome.
    """
    from coordinator.decide import HUMAN_SILENT
    from tests.sim.world import WALL0, Violation

    if not pol.humans or key not in world.kv.history:
        return []
    out: list[Violation] = []
    states = _states(world, key)
    asked = next((s for _, s in states if s.state == "awaiting_human"), None)
    skew = world.knobs.skew_s
    votes = {v.skill: v for v in decision.votes}
    for human in pol.humans:
        v = votes.get(human.voter)
        if v is None or asked is None or human.voter not in asked.humans:
            continue  # not asked (the agents' votes settled it): `non_member` covers the rest
        wait = asked.humans[human.voter]
        # When this vote was first in the ledger (world time → wall clock).
        at = next(
            (WALL0 + t for t, s in states if human.voter in s.votes and s.state != "collecting"),
            None,
        )
        if at is None:
            continue
        if v.outcome == "voted":
            said = world.people.answers.get((v.agent.removeprefix("human:"), v.signed_at))
            if said is None or (said.voter, said.answer) != (human.voter, v.counted_as):
                out.append(Violation("human_not_said", eid, f"{human.voter}: {v.counted_as}"))
                continue
            roles = set(wait.roles) | {s.role for s in wait.next if s.at <= at + skew}
            held = set(people.PEOPLE[said.by])
            if not held & roles:
                out.append(
                    Violation(
                        "human_role_not_asked",
                        eid,
                        f"{said.by} ({sorted(held)}) counted for {human.voter}; "
                        f"asked so far: {sorted(roles)}",
                    )
                )
            # Judged by when it was given: the desk judges it later (by its clock), and its
            # write may land later still (a stall), which is no fault of the answer.
            if said.at >= wait.expires_at + skew + EPS:
                out.append(
                    Violation(
                        "late_human_vote",
                        eid,
                        f"{said.by}'s answer given {said.at - wait.expires_at:.3f}s after expiry",
                    )
                )
        elif v.outcome == "timeout" and v.error.startswith(HUMAN_SILENT):
            if at < wait.expires_at - skew - EPS:
                out.append(
                    Violation(
                        "silence_too_early",
                        eid,
                        f"{human.voter}'s silence {wait.expires_at - at:.3f}s before expiry",
                    )
                )
            says = None if human.silence == "no_quorum" else human.silence
            if v.counted_as != says:
                out.append(
                    Violation("wrong_silence", eid, f"{human.voter}: {v.counted_as} for {says}")
                )
        elif v.outcome == "cancelled" and v.error.startswith("not needed"):
            rest = {s: x for s, x in votes.items() if s != human.voter}
            if count(pol, rest, final=False).outcome == "pending":
                out.append(
                    Violation(
                        "decided_while_waiting",
                        eid,
                        f"{human.voter} marked not needed; without it the tally is pending",
                    )
                )
    return out
