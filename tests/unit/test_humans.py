"""People in the quorum, driven with no server: the decision core asks them after the agents
(or not), the ledger keeps the wait (`awaiting_human`), and the desk (coordinator.humans) moves
it on by the clock (escalation, final silence) and by signed answers, once."""

from __future__ import annotations

import asyncio
import tomllib
from typing import Any

import msgspec
import pytest

from coordinator import policy as policies
from coordinator.clock import ManualClock
from coordinator.decide import AwaitingHuman, Decided, Decider
from coordinator.humans import Desk, Gone, Refused, Settled, Still, requests
from coordinator.ledger import Ledger, MemoryStore
from coordinator.policy import Escalation, HumanVoter, Policy
from coordinator.quorum import QuorumRule
from mesh import approvals
from mesh.errors import PolicyError
from mesh.identity import Signer, Trust
from tests.unit.test_decide import EVENT, KEY, LEASE_S, Voters, done, job

CSO = HumanVoter(
    role="clinical-safety-officer",
    wait_s=100.0,
    escalate=[Escalation(role="head-of-safety", after_s=30.0)],
)
VOTER = CSO.voter


def human_policy(**overrides: Any) -> Policy:
    fields: dict[str, Any] = {
        "skills": ["s1", "s2"],
        "rule": QuorumRule(kind="unanimous"),
        "agent_timeout_s": 1.0,
        "deadline_s": 5.0,
        "humans": [CSO],
    }
    return Policy(**(fields | overrides))


async def agents_vote(
    store: MemoryStore, clock: ManualClock, pol: Policy, script: dict[str, Any]
) -> Any:
    voters = Voters(clock, script)
    decider = Decider(Ledger(store, "c1", LEASE_S, clock=clock), voters, clock, name="c1")
    run = asyncio.create_task(decider.run(job(pol, clock)))
    await clock.advance(1.0)
    return done(run)


def desk(store: MemoryStore, clock: ManualClock, name: str = "c1", **kw: Any) -> Desk:
    return Desk(Ledger(store, name, LEASE_S, clock=clock), clock, name=name, **kw)


class People:
    """A trust file with people of tenant acme, and their signed answers."""

    def __init__(self) -> None:
        self.trust = Trust()
        self.keys: dict[str, Signer] = {}

    def add(self, name: str, *claims: str, tenant: str = "acme") -> None:
        signer = Signer.generate()
        kid = self.trust.add(signer, "human", name)
        self.trust.keys[kid].tenant = tenant
        self.trust.keys[kid].claims = list(claims)
        self.keys[name] = signer

    def answer(self, name: str, request: approvals.ApprovalRequest, yes: bool) -> Any:
        return approvals.answer(
            self.keys[name],
            request,
            by=name,
            answer="approve" if yes else "reject",
            reason=f"{name} looked at it",
        )


async def request_now(store: MemoryStore) -> approvals.ApprovalRequest:
    state = await Ledger(store, "reader", LEASE_S).read(KEY)
    assert state is not None
    (request,) = requests(state)
    return request


# -- policies --------------------------------------------------------------------------------
def test_a_policy_file_names_people_with_their_chain() -> None:
    raw = tomllib.loads(
        """
        ["med.change"]
        skills = ["a", "b"]
        rule = { kind = "unanimous" }
        humans = [{ role = "clinical-safety-officer", wait_s = 14400, escalate = [
            { role = "head-of-safety", after_s = 3600 } ] }]
        ask_humans = "on_disagreement"
        """
    )
    pol = policies.parse(raw).get("med.change")
    assert pol is not None
    assert pol.voters == ["a", "b", "human:clinical-safety-officer"]
    assert pol.humans[0].roles() == ["clinical-safety-officer", "head-of-safety"]
    assert pol.humans[0].silence == "reject"


@pytest.mark.parametrize(
    ("human", "extra", "match"),
    [
        ({"role": "cso", "silence": "approve"}, {}, "silence"),
        ({"role": "cso", "wait_s": 10, "escalate": [{"role": "hos", "after_s": 10}]}, {}, "before"),
        (
            {"role": "cso", "escalate": [{"role": "a", "after_s": 9}, {"role": "b", "after_s": 5}]},
            {},
            "increasing",
        ),
        ({"role": "Bad Role"}, {}, "lowercase"),
        ({"role": "cso"}, {"ask_humans": "on_low_confidence"}, "confidence_below"),
    ],
)
def test_a_bad_human_voter_is_refused_naming_it(
    human: dict[str, Any], extra: dict[str, Any], match: str
) -> None:
    raw = {"x.y": {"skills": ["a"], "rule": {"kind": "unanimous"}, "humans": [human], **extra}}
    with pytest.raises(PolicyError, match=match):
        policies.parse(raw)


# -- when people are asked -------------------------------------------------------------------
async def test_agents_that_approve_wait_for_the_person_durably() -> None:
    store, clock = MemoryStore(), ManualClock()
    outcome = await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "approve"), "s2": (0.2, "approve")}
    )
    assert isinstance(outcome, AwaitingHuman) and outcome.fresh
    state = await Ledger(store, "reader", LEASE_S).read(KEY)
    assert state is not None and state.state == "awaiting_human"
    wait = state.humans[VOTER]
    asked = clock.time()
    assert wait.roles == ["clinical-safety-officer"]
    assert wait.expires_at == pytest.approx(asked + 100.0)
    assert [(s.role, s.at) for s in wait.next] == [("head-of-safety", pytest.approx(asked + 30.0))]
    # A redelivery of the event (a crash before its ack) asks nobody again and decides nothing.
    again = Voters(clock, {"s1": (0.1, "approve"), "s2": (0.1, "approve")})
    decider = Decider(Ledger(store, "c2", LEASE_S, clock=clock), again, clock, name="c2")
    second = await decider.run(job(human_policy(), clock))
    assert isinstance(second, AwaitingHuman) and not second.fresh
    assert again.asked == []


async def test_a_person_is_not_asked_when_the_agents_settle_it() -> None:
    store, clock = MemoryStore(), ManualClock()
    outcome = await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "reject"), "s2": (0.1, "approve")}
    )
    assert isinstance(outcome, Decided) and outcome.decision.outcome == "rejected"
    assert [v.skill for v in outcome.decision.votes] == ["s1", "s2", VOTER]


@pytest.mark.parametrize(("second", "asked"), [("approve", False), ("reject", True)])
async def test_on_disagreement_asks_only_when_agents_differ(second: str, asked: bool) -> None:
    store, clock = MemoryStore(), ManualClock()
    pol = human_policy(rule=QuorumRule(kind="majority"), ask_humans="on_disagreement")
    outcome = await agents_vote(store, clock, pol, {"s1": (0.1, "approve"), "s2": (0.1, second)})
    assert isinstance(outcome, AwaitingHuman) is asked
    if not asked:
        assert isinstance(outcome, Decided) and outcome.decision.outcome == "approved"
        human = outcome.decision.votes[-1]
        assert (human.skill, human.outcome) == (VOTER, "cancelled")


# -- the clock: escalation and the final silence ----------------------------------------------
async def test_escalation_fires_at_its_time_and_silence_rejects_at_the_end() -> None:
    store, clock = MemoryStore(), ManualClock()
    await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "approve"), "s2": (0.1, "approve")}
    )
    d = desk(store, clock)
    early = await d.wake(KEY)
    assert isinstance(early, Still) and not early.changed
    assert early.next_due == pytest.approx(clock.time() + 30.0)
    await clock.advance(29.0)
    assert not (await d.wake(KEY)).changed  # type: ignore[union-attr]
    await clock.advance(1.0)
    escalated = await d.wake(KEY)
    assert isinstance(escalated, Still) and escalated.changed
    (req,) = escalated.requests
    assert (req.round, req.roles) == (1, ["clinical-safety-officer", "head-of-safety"])
    assert escalated.next_due == pytest.approx(req.expires_at)
    await clock.advance(69.0)
    assert isinstance(await d.wake(KEY), Still)
    await clock.advance(1.0)
    final = await d.wake(KEY)
    assert isinstance(final, Settled)
    decision = final.decision
    assert decision.outcome == "rejected"
    assert "no answer from a person" in decision.reason
    assert [r.status for r in final.closed] == ["closed"]
    assert "silence counted as reject" in final.closed[0].outcome
    assert isinstance(await d.wake(KEY), Gone)  # decided once: nothing more is due


async def test_silence_counted_as_no_quorum_when_the_policy_says_so() -> None:
    store, clock = MemoryStore(), ManualClock()
    quiet = msgspec.structs.replace(CSO, silence="no_quorum")
    pol = human_policy(humans=[quiet])
    await agents_vote(store, clock, pol, {"s1": (0.1, "approve"), "s2": (0.1, "approve")})
    await clock.advance(100.0)
    final = await desk(store, clock).wake(KEY)
    assert isinstance(final, Settled) and final.decision.outcome == "no_quorum"


async def test_two_coordinators_at_the_expiry_decide_it_once() -> None:
    store, clock = MemoryStore(), ManualClock()
    await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "approve"), "s2": (0.1, "approve")}
    )
    await clock.advance(100.0)
    got = await asyncio.gather(
        desk(store, clock, "c1").wake(KEY), desk(store, clock, "c2").wake(KEY)
    )
    assert sum(isinstance(g, Settled) for g in got) == 1
    assert all(isinstance(g, Settled | Gone) for g in got)


# -- answers -----------------------------------------------------------------------------------
async def test_an_approval_by_the_role_asked_decides_once() -> None:
    store, clock = MemoryStore(), ManualClock()
    people = People()
    people.add("alice", "clinical-safety-officer")
    await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "approve"), "s2": (0.1, "approve")}
    )
    request = await request_now(store)
    vote = people.answer("alice", request, yes=True)
    d1, d2 = (
        desk(store, clock, "c1", trust=people.trust),
        desk(store, clock, "c2", trust=people.trust),
    )
    got = await asyncio.gather(d1.answer(KEY, vote), d2.answer(KEY, vote))
    settled = [g for g in got if isinstance(g, Settled)]
    assert len(settled) == 1 and all(isinstance(g, Settled | Refused) for g in got)
    decision = settled[0].decision
    assert decision.outcome == "approved"
    human = decision.votes[-1]
    assert (human.skill, human.agent, human.counted_as) == (VOTER, "human:alice", "approve")
    assert human.verdict is not None and human.verdict.reasons == ["alice looked at it"]
    assert human.signature == vote.signature and human.instance == vote.signer
    state = await Ledger(store, "reader", LEASE_S).read(KEY)
    assert state is not None and state.state == "decided" and state.decision == decision


async def test_a_person_without_the_role_cannot_approve() -> None:
    store, clock = MemoryStore(), ManualClock()
    people = People()
    people.add("mallory", "nurse")
    people.add("hank", "head-of-safety")
    people.add("eve", "clinical-safety-officer", tenant="other")
    await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "approve"), "s2": (0.1, "approve")}
    )
    d = desk(store, clock, trust=people.trust)
    request = await request_now(store)
    refused = await d.answer(KEY, people.answer("mallory", request, yes=True))
    assert isinstance(refused, Refused) and "holds no role" in refused.why
    # The escalation's role may answer only once the escalation is due.
    early_vote = people.answer("hank", request, yes=True)
    early = await d.answer(KEY, early_vote)
    assert isinstance(early, Refused) and "holds no role" in early.why
    wrong_tenant = await d.answer(KEY, people.answer("eve", request, yes=True))
    assert isinstance(wrong_tenant, Refused) and "tenant" in wrong_tenant.why
    state = await Ledger(store, "reader", LEASE_S).read(KEY)
    assert state is not None and state.state == "awaiting_human"  # nothing was recorded
    await clock.advance(30.0)
    # Hank's refused early answer, replayed once his role is asked (anyone of the tenant can
    # read it in the stream), does not count: it answered round 0, before he was asked.
    replayed = await d.answer(KEY, early_vote)
    assert isinstance(replayed, Refused) and "before their role was asked" in replayed.why
    escalated = await request_now(store)
    assert escalated.round == 1
    later = await d.answer(KEY, people.answer("hank", escalated, yes=False))
    assert isinstance(later, Settled) and later.decision.outcome == "rejected"


async def test_a_forged_or_misdirected_answer_is_refused() -> None:
    store, clock = MemoryStore(), ManualClock()
    people = People()
    people.add("alice", "clinical-safety-officer")
    await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "approve"), "s2": (0.1, "approve")}
    )
    d = desk(store, clock, trust=people.trust)
    request = await request_now(store)
    vote = people.answer("alice", request, yes=True)
    forged = msgspec.structs.replace(vote, answer="reject")
    assert "not believed" in (await d.answer(KEY, forged)).why  # type: ignore[union-attr]
    other_evidence = msgspec.structs.replace(request, event_data={"dose": "x10"})
    misled = people.answer("alice", other_evidence, yes=True)
    assert "other evidence" in (await d.answer(KEY, misled)).why  # type: ignore[union-attr]
    stranger = Signer.generate()
    unknown = approvals.answer(stranger, request, by="alice", answer="approve", reason="")
    assert "not believed" in (await d.answer(KEY, unknown)).why  # type: ignore[union-attr]
    await clock.advance(100.0)
    late = await d.answer(KEY, vote)  # the silence came first
    assert isinstance(late, Refused) and isinstance(late.then, Settled)
    state = await Ledger(store, "reader", LEASE_S).read(KEY)
    assert state is not None and state.decision is not None
    assert state.decision.outcome == "rejected"


async def test_an_answer_via_the_console_counts_for_the_person_it_names() -> None:
    store, clock = MemoryStore(), ManualClock()
    people = People()
    people.add("alice", "clinical-safety-officer")
    console = Signer.generate()
    people.trust.add(console, "console", "console")
    await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "approve"), "s2": (0.1, "approve")}
    )
    request = await request_now(store)
    vote = approvals.answer(
        console, request, by="alice", answer="approve", reason="seen", via="console"
    )
    settled = await desk(store, clock, trust=people.trust).answer(KEY, vote)
    assert isinstance(settled, Settled) and settled.decision.outcome == "approved"
    human = settled.decision.votes[-1]
    assert (human.agent, human.brain, human.instance) == (
        "human:alice",
        "human via console",
        console.kid,
    )


async def test_the_console_cannot_invent_people_nor_lend_them_roles() -> None:
    store, clock = MemoryStore(), ManualClock()
    people = People()
    people.add("alice", "clinical-safety-officer")
    people.add("mallory", "nurse")
    people.add("eve", "clinical-safety-officer", tenant="other")
    console, agent = Signer.generate(), Signer.generate()
    people.trust.add(console, "console", "console")
    people.trust.add(agent, "agent", "security-review")
    await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "approve"), "s2": (0.1, "approve")}
    )
    d = desk(store, clock, trust=people.trust)
    request = await request_now(store)

    def via(signer: Signer, by: str, **kw: Any) -> approvals.HumanVote:
        return approvals.answer(signer, request, by=by, answer="approve", reason="ok", **kw)

    async def why(vote: approvals.HumanVote) -> str:
        got = await d.answer(KEY, vote)
        assert isinstance(got, Refused), got
        return got.why

    # A person without the role asked: refused as if they had answered themselves.
    assert "holds no role" in await why(via(console, "mallory", via="console"))
    # Someone the trust file does not know (or of another tenant): the console made them up.
    assert "no trusted person" in await why(via(console, "zed", via="console"))
    assert "no trusted person" in await why(via(console, "eve", via="console"))
    # Signed by a key that is not a console's: a person's own, an agent's, a stranger's.
    for signer in (people.keys["alice"], agent, Signer.generate()):
        assert "not a trusted console" in await why(via(signer, "alice", via="console"))
    # A console key without `via` is no person either; an unknown `via` is refused.
    assert "not trusted to sign approvals" in await why(via(console, "alice"))
    assert "not via 'email'" in await why(via(console, "alice", via="email"))
    # Tampered after signing (the person swapped): does not verify.
    forged = msgspec.structs.replace(via(console, "mallory", via="console"), by="alice")
    assert "does not verify" in await why(forged)
    # A revoked console key answers for nobody.
    people.trust.revoke(console.kid)
    assert "revoked" in await why(via(console, "alice", via="console"))
    state = await Ledger(store, "reader", LEASE_S).read(KEY)
    assert state is not None and state.state == "awaiting_human"  # nothing was recorded


# -- the authorization hook and the webhook ----------------------------------------------------
async def test_cedar_is_asked_when_mesh_authz_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator's second opinion (`cedar_authorize`) over mesh.authz's API: principal
    `human:<name>` in the groups its key holds, action `approve` on the decision type, context
    the role and the event; a deny refuses the answer, naming what Cedar said."""
    import sys
    import types
    from dataclasses import dataclass

    from coordinator.humans import cedar_authorize

    asked: list[tuple[Any, ...]] = []

    @dataclass
    class Said:
        allowed: bool

        def explain(self) -> str:
            return "no policy permits it (denied by default)"

    class Authorizer:
        @classmethod
        def from_settings(cls, settings: Any) -> Authorizer:
            return cls()

        def is_allowed(self, principal: Any, action: str, resource: Any, context: Any) -> Said:
            asked.append((principal, action, resource, context))
            return Said(False)

    fake = types.ModuleType("mesh.authz")
    fake.Authorizer = Authorizer  # type: ignore[attr-defined]
    fake.identity = lambda role, name, tenant, groups: (role, name, tenant, list(groups))  # type: ignore[attr-defined]
    fake.decision_type = lambda tenant, type_: (tenant, type_)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mesh.authz", fake)
    authorize = cedar_authorize(types.SimpleNamespace(profile="regulated"))
    assert authorize is not None
    assert cedar_authorize(types.SimpleNamespace()) is None  # settings without a profile

    store, clock = MemoryStore(), ManualClock()
    people = People()
    people.add("alice", "clinical-safety-officer")
    await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "approve"), "s2": (0.1, "approve")}
    )
    request = await request_now(store)
    d = Desk(
        Ledger(store, "c1", LEASE_S, clock=clock),
        clock,
        name="c1",
        trust=people.trust,
        authorize=authorize,
    )
    got = await d.answer(KEY, people.answer("alice", request, yes=True))
    assert isinstance(got, Refused) and "denied by default" in got.why, got
    assert asked == [
        (
            ("human", "alice", "acme", ["clinical-safety-officer"]),
            "approve",
            ("acme", "vote.decided"),
            {"role": "clinical-safety-officer", "event_id": EVENT.id},
        )
    ]


async def test_a_request_is_posted_to_its_notify_url_through_the_ssrf_guard() -> None:
    import httpx

    from coordinator.inbox import Inbox

    posted: list[bytes] = []

    def hook(request: httpx.Request) -> httpx.Response:
        posted.append(request.content)
        return httpx.Response(204)

    store, clock = MemoryStore(), ManualClock()
    notifying = msgspec.structs.replace(CSO, notify="http://127.0.0.1:9/approvals")
    pol = human_policy(humans=[notifying])
    await agents_vote(store, clock, pol, {"s1": (0.1, "approve"), "s2": (0.1, "approve")})
    request = await request_now(store)
    for allow_private, expected in ((False, 0), (True, 1)):
        inbox = Inbox(
            None,  # type: ignore[arg-type]  # the webhook needs neither bus, audit nor settler
            desk(store, clock),
            None,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            name="c1",
            allow_private=allow_private,
        )
        inbox._http = httpx.AsyncClient(transport=httpx.MockTransport(hook))
        await inbox._notify(request)
        assert len(posted) == expected  # a loopback address is refused unless allowed
    assert approvals.request_decoder.decode(posted[0]).id == request.id
    # Its own client is the pinned webhook client (it connects to the address the guard
    # checked: DNS rebinding), not a plain one (port 9 refuses: the POST fails, logged).
    inbox._http = None
    await inbox._notify(request)
    from mesh.a2a.push import webhook_client

    pinned = webhook_client(inbox.url_policy)
    assert type(inbox._http._transport) is type(pinned._transport)  # type: ignore[union-attr]
    await pinned.aclose()


def test_the_clinic_policy_in_docs_humans_md_is_valid() -> None:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "humans.md").read_text()
    block = re.search(r"```toml\n(.*?)```", text, re.S)
    assert block is not None
    pol = policies.parse(tomllib.loads(block[1])).get("medication.change")
    assert pol is not None and pol.voters[-1] == "human:clinical-safety-officer"
    assert pol.humans[0].escalate[0].role == "head-of-safety"
