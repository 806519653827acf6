"""`mesh.testing`'s brain override and fault injection, each fault leading to the decision the
policy says: a real nats-server, the real agent runtime and the production coordinator, with
the fault proxy between them (mesh/testing/faults.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from agents.release import ReleaseProposal
from agents.security_review.agent import agent as security
from agents.security_review.rules import review
from mesh import Agent, Bus
from mesh.a2a.client import user_message
from mesh.errors import AgentUnavailableError, ConfigError
from mesh.testing import MeshHarness, ScriptedModel, verdict_of
from mesh.testing.faults import (
    Faults,
    Rule,
    delay,
    drop,
    duplicate,
    forge,
    garbage,
    hang,
)
from mesh.verdict import Verdict

pytestmark = pytest.mark.integration
pytest_plugins = ["mesh.testing.fixtures"]

ROOT = Path(__file__).resolve().parents[2]
CLEAN = json.loads((ROOT / "agents" / "samples" / "release_clean.json").read_text())
SECRET = json.loads((ROOT / "agents" / "samples" / "release_secret.json").read_text())
AGENT = "security-review"


def policies(**fields: Any) -> dict[str, Any]:
    """One voter; a call may stay silent 1 s, the decision takes at most 3 s, one retry."""
    policy = {
        "skills": ["release-security-review"],
        "rule": {"kind": "unanimous"},
        "agent_timeout_s": 1.0,
        "deadline_s": 3.0,
        "retries": 1,
        **fields,
    }
    return {"release.proposed": policy}


async def decide(mesh: MeshHarness, release: dict[str, Any] = CLEAN) -> Any:
    return await mesh.decision(await mesh.publish("release.proposed", release))


# -- the brain, swapped in code -----------------------------------------------------------------
async def test_override_swaps_the_brain_of_a_serving_agent_and_restores_it() -> None:
    async with MeshHarness(security) as mesh:
        assert verdict_of(await mesh.call(AGENT, CLEAN)).vote == "approve"
        with security.override(lambda release: Verdict.reject("overridden")) as brain:
            task = await mesh.call(AGENT, CLEAN)
            assert brain.name == "rules"
        assert verdict_of(task).reasons == ["overridden"]
        assert verdict_of(await mesh.call(AGENT, CLEAN)).vote == "approve"  # restored


async def test_override_with_a_scripted_model_before_serving() -> None:
    async with ScriptedModel("reject", "scripted: no") as model:
        with security.override(model.brain(security)):
            async with MeshHarness(security, policies=policies()) as mesh:
                decision = await decide(mesh)
    assert decision.outcome == "rejected"
    [vote] = decision.votes
    assert vote.outcome == "voted" and vote.brain.startswith("claude:"), vote
    assert vote.verdict is not None and vote.verdict.reasons == ["scripted: no"]
    assert len(model.requests) == 1
    assert model.system_prompts == [security.system_prompt()]


def test_override_needs_a_rules_handler() -> None:
    with pytest.raises(ConfigError, match=r"no @agent\.rules handler"), Agent("x").override(review):
        pass


# -- each fault and the decision it leads to ----------------------------------------------------
@pytest.mark.parametrize(
    ("counts_as", "outcome"), [("reject", "rejected"), ("no_quorum", "no_quorum")]
)
async def test_drop_is_a_timeout_counted_as_the_policy_says(counts_as: str, outcome: str) -> None:
    async with MeshHarness(security, policies=policies(timeout_counts_as=counts_as)) as mesh:
        mesh.faults.inject(AGENT, drop())
        decision = await decide(mesh)
    assert decision.outcome == outcome, decision
    [vote] = decision.votes
    assert (vote.outcome, vote.attempts) == ("timeout", 2), vote  # retried once, then gave up
    assert [c.fault for c in mesh.faults.calls] == [drop(), drop()]
    assert all(c.answers == 0 for c in mesh.faults.calls)


async def test_a_dropped_first_call_is_retried() -> None:
    async with MeshHarness(security, policies=policies()) as mesh:
        mesh.faults.inject(AGENT, drop(), nth=1)
        decision = await decide(mesh)
    assert decision.outcome == "approved", decision
    [vote] = decision.votes
    assert (vote.outcome, vote.attempts) == ("voted", 2), vote
    assert [c.fault for c in mesh.faults.calls] == [drop(), None]


async def test_delay_within_the_timeout_still_votes_and_past_it_times_out() -> None:
    async with MeshHarness(security, policies=policies(retries=0)) as mesh:
        mesh.faults.inject(AGENT, delay(0.2), nth=1)
        mesh.faults.inject(AGENT, delay(5.0), nth=2)
        first = await decide(mesh)
        second = await decide(mesh, {**CLEAN, "id": "rel-2"})
    assert (first.outcome, first.votes[0].outcome) == ("approved", "voted"), first
    assert (second.outcome, second.votes[0].outcome) == ("rejected", "timeout"), second
    assert [c.fault for c in mesh.faults.calls] == [delay(0.2), delay(5.0)]
    assert mesh.faults.calls[0].answers == 1


async def test_duplicate_runs_once_and_counts_once() -> None:
    ran: list[str] = []
    lock = threading.Lock()  # rules run in a thread

    def counting(release: ReleaseProposal) -> Verdict:
        with lock:
            ran.append(release.id)
        return review(release)

    with security.override(counting):
        async with MeshHarness(security, policies=policies()) as mesh:
            mesh.faults.inject(AGENT, duplicate())
            decision = await decide(mesh)
    assert decision.outcome == "approved", decision
    [vote] = decision.votes
    assert (vote.outcome, vote.attempts) == ("voted", 1), vote
    [call] = mesh.faults.calls
    assert call.answers == 2  # both requests were answered, both answers went back
    assert ran == [CLEAN["id"]]  # the agent ran it once (messageId de-duplication)


async def test_garbage_is_an_error_vote_not_retried() -> None:
    async with MeshHarness(security, policies=policies()) as mesh:
        mesh.faults.inject(AGENT, garbage())
        decision = await decide(mesh)
    assert decision.outcome == "rejected", decision
    [vote] = decision.votes
    assert (vote.outcome, vote.counted_as, vote.attempts) == ("error", "reject", 1), vote
    assert "-32006" in vote.error or "JSON" in vote.error, vote.error


async def test_a_forged_answer_is_an_invalid_vote_never_counted_as_what_it_claims() -> None:
    async with MeshHarness(security, policies=policies()) as mesh:
        mesh.faults.inject(AGENT, forge(Verdict.approve("forged on the way")))
        decision = await decide(mesh, SECRET)  # the agent itself rejects this one
    assert decision.outcome == "rejected", decision
    [vote] = decision.votes
    assert (vote.outcome, vote.counted_as) == ("invalid", "reject"), vote
    assert vote.verdict is not None and vote.verdict.vote == "approve"  # what it claimed
    assert mesh.faults.calls[0].answers == 1


async def test_hang_keeps_one_attempt_alive_where_drop_is_retried() -> None:
    # With keep-alives allowed up to the deadline, a hung call holds its one attempt until
    # then; a dropped one goes silent and is retried after agent_timeout_s.
    allowed = policies(agent_timeout_max_s=3.0)
    async with MeshHarness(security, policies=allowed) as mesh:
        mesh.faults.inject(AGENT, hang(), nth=1)
        mesh.faults.inject(AGENT, drop(), nth={2, 3})
        hung = await decide(mesh)
        dropped = await decide(mesh, {**CLEAN, "id": "rel-2"})
    assert (hung.outcome, hung.votes[0].outcome, hung.votes[0].attempts) == (
        "rejected",
        "timeout",
        1,
    ), hung
    assert (dropped.outcome, dropped.votes[0].outcome, dropped.votes[0].attempts) == (
        "rejected",
        "timeout",
        2,
    ), dropped


# -- selection and the proxy on its own ---------------------------------------------------------
def test_a_seeded_probability_picks_the_same_calls() -> None:
    def picked(seed: int) -> list[int]:
        rule = Rule(AGENT, drop(), probability=0.5, seed=seed)
        return [n for n in range(1, 41) if rule.picks(n)]

    assert picked(7) == picked(7)
    assert 0 < len(picked(7)) < 40
    assert picked(7) != picked(8)


def test_inject_refuses_what_means_nothing() -> None:
    faults = Faults()
    with pytest.raises(ValueError, match="not both"):
        faults.inject(AGENT, drop(), nth=1, probability=0.5)
    with pytest.raises(ValueError, match="numbered from 1"):
        faults.inject(AGENT, drop(), nth=0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        faults.inject(AGENT, drop(), probability=2)
    with pytest.raises(ValueError, match="negative"):
        delay(-1)


async def test_through_the_proxy_nobody_listening_is_still_unavailable(mesh_bus: Bus) -> None:
    faults = Faults()
    await faults.start(mesh_bus.nc)
    try:
        with pytest.raises(AgentUnavailableError):
            await faults.client(mesh_bus).send("nobody-here", user_message(data={}), timeout=5)
    finally:
        await faults.aclose()
    [call] = faults.calls
    assert (call.agent, call.answers) == ("nobody-here", 1)
