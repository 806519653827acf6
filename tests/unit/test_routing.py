import asyncio
import time
from typing import Any

import msgspec
import pytest
from a2a.helpers import new_data_part
from a2a.types import Artifact, Message, Task, TaskState, TaskStatus

from coordinator import dispatch
from coordinator.decide import Ask
from coordinator.policy import Policy
from coordinator.quorum import QuorumRule
from coordinator.routing import Route, Router
from mesh import envelope
from mesh.identity import Signer, b64
from mesh.registry import Registration
from mesh.signing import Binding
from mesh.verdict import Verdict
from mesh.votes import SIGNATURE_KEY, VoteSigner


class _View:
    """The one method Router reads from a RegistryView."""

    def __init__(self, *regs: Registration) -> None:
        self.regs = list(regs)

    def instances(self, agent: str) -> list[Registration]:
        return [r for r in self.regs if r.agent == agent]


def _reg(instance: str, direct: bool = True) -> Registration:
    return Registration(
        agent="rev",
        instance=instance,
        card={},
        skills=["s"],
        seen_at=time.time(),
        ttl_s=60,
        direct_subject=f"mesh.a2a.rev.{instance}" if direct else "",
    )


async def _fail(router: Router, key_subject: str, times: int) -> None:
    for _ in range(times):
        route = router.route("rev")
        while route.subject != key_subject:
            route = router.route("rev")
        with pytest.raises(RuntimeError):
            async with await router.breaker(route):
                raise RuntimeError("transport failure")


async def test_without_replica_subjects_the_shared_subject_is_used() -> None:
    route = Router(_View(_reg("a", direct=False))).route("rev")  # type: ignore[arg-type]
    assert route.subject == "mesh.a2a.rev" and route.breaker_key == "rev"


async def test_failed_replicas_are_avoided_within_a_call() -> None:
    router = Router(_View(_reg("a"), _reg("b")))  # type: ignore[arg-type]
    for _ in range(20):
        assert router.route("rev", avoid=frozenset({"rev.a"})).subject == "mesh.a2a.rev.b"
    # Everything avoided: any usable replica still beats giving up.
    assert router.route("rev", avoid=frozenset({"rev.a", "rev.b"})).breaker_key in {
        "rev.a",
        "rev.b",
    }


async def test_breaker_opens_after_threshold_and_routes_around() -> None:
    router = Router(_View(_reg("a"), _reg("b")), threshold=3, ttl_s=60)  # type: ignore[arg-type]
    await _fail(router, "mesh.a2a.rev.a", 3)
    assert router.states()["rev.a"] == "opened"
    assert all(router.route("rev").subject == "mesh.a2a.rev.b" for _ in range(20))


async def test_open_breaker_turns_half_open_after_ttl_and_a_success_closes_it() -> None:
    router = Router(_View(_reg("a")), threshold=1, ttl_s=0.05)  # type: ignore[arg-type]
    await _fail(router, "mesh.a2a.rev.a", 1)
    assert router.is_open("rev.a")
    # Only replica, breaker open: the shared subject is the fallback.
    assert router.route("rev").subject == "mesh.a2a.rev"
    deadline = time.monotonic() + 5
    while router.is_open("rev.a") and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert router.states()["rev.a"] == "half-opened"
    route = router.route("rev")
    assert route.subject == "mesh.a2a.rev.a"
    async with await router.breaker(route):
        pass  # the probe succeeds
    assert router.states()["rev.a"] == "closed"


async def test_the_factorys_breaker_is_what_router_types_it_as() -> None:
    """Router types purgatory's breaker by its public shape (`Breaker`) instead of importing
    the class from purgatory's private package; this pins that shape."""
    from coordinator.routing import Breaker, BreakerOpen

    router = Router(_View(_reg("a")), threshold=1, ttl_s=60)  # type: ignore[arg-type]
    brk = await router.breaker(router.route("rev"))
    assert isinstance(brk, Breaker)
    assert brk.context.state == "closed" and brk.context.ttl == 60
    await _fail(router, "mesh.a2a.rev.a", 1)
    with pytest.raises(BreakerOpen):
        async with await router.breaker(Route("rev", "mesh.a2a.rev.a", "rev.a")):
            pass


# -- dispatch: only a vote signed for the question counts ------------------------------------------
class _SignedView(_View):
    """A view that knows one instance's binding (or checks nothing, like MESH_INSECURE=bus)."""

    def __init__(self, binding: Binding | None, *, checks: bool = True) -> None:
        super().__init__(_reg("i1"))
        self.bound = binding
        self.checks_votes = checks

    def binding(self, agent: str, instance: str) -> Binding | None:
        b = self.bound
        return b if b is not None and (b.agent, b.instance) == (agent, instance) else None


class _Client:
    """Answers every SendMessage with the task `answer(message)` builds; counts the calls."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[Message] = []

    async def send(self, agent: str, message: Message, **kw: Any) -> Task:
        self.calls.append(message)
        result: Task = self.answer(message)
        return result


def _answer(signer: VoteSigner | None, vote: str = "approve", *, meta: Any = None) -> Any:
    def build(message: Message) -> Task:
        output = msgspec.to_builtins(Verdict(vote))  # type: ignore[arg-type]
        artifact = Artifact(artifact_id="a", parts=[new_data_part(output)])
        if signer is not None:
            question = signer.question(message.message_id, dict(message.metadata))
            artifact.metadata.update({SIGNATURE_KEY: meta or signer.sign(question, output)})
        return Task(
            id="t",
            context_id="c",
            status=TaskStatus(state=TaskState.TASK_STATE_COMPLETED),
            artifacts=[artifact],
        )

    return build


def _ask(counts_as: str = "reject") -> Ask:
    pol = Policy(
        skills=["s"],
        rule=QuorumRule(kind="unanimous"),
        agent_timeout_s=1.0,
        deadline_s=2.0,
        retries=2,
        timeout_counts_as=counts_as,  # type: ignore[arg-type]
    )
    event = envelope.new_event("vote.x", {"vote": "approve"}, tenant="acme", event_id="e1")
    return Ask(skill="s", agent="rev", event=event, policy=pol, deadline=time.monotonic() + 2)


def _instance() -> tuple[VoteSigner, Binding]:
    key = Signer.generate()
    now = time.time()
    binding = Binding(
        agent="rev", instance="i1", key=b64(key.public), subjects=[], iat=now, exp=now + 600
    )
    return VoteSigner("rev", "i1", key), binding


async def test_a_vote_signed_for_the_question_counts_and_is_recorded() -> None:
    signer, binding = _instance()
    client = _Client(_answer(signer))
    vote = await dispatch.ask(client, Router(_SignedView(binding)), _ask())  # type: ignore[arg-type]
    assert vote.outcome == "voted" and vote.counted_as == "approve"
    assert vote.instance == "i1" and vote.signature and vote.signed_at > 0
    (msg,) = client.calls
    assert dict(msg.metadata) == {
        "eventId": "e1",
        "eventType": "vote.x",
        "tenant": "acme",
        "skill": "s",
    }


@pytest.mark.parametrize("counts_as", ["reject", "absent"])
@pytest.mark.parametrize("forgery", ["unsigned", "other-key", "other-question", "unknown"])
async def test_a_forged_vote_is_invalid_counted_as_a_failure_and_not_retried(
    forgery: str, counts_as: str
) -> None:
    signer, binding = _instance()
    if forgery == "unsigned":
        answer = _answer(None)
    elif forgery == "other-key":
        answer = _answer(VoteSigner("rev", "i1", Signer.generate()))
    elif forgery == "unknown":
        answer = _answer(VoteSigner("rev", "i9", Signer.generate()))
    else:
        other = signer.question("acme/e0/s", {"tenant": "acme", "eventId": "e0", "skill": "s"})
        verdict = msgspec.to_builtins(Verdict("approve"))
        answer = _answer(signer, meta=signer.sign(other, verdict))
    client = _Client(answer)
    vote = await dispatch.ask(client, Router(_SignedView(binding)), _ask(counts_as))  # type: ignore[arg-type]
    assert vote.outcome == "invalid"
    assert vote.counted_as == (None if counts_as == "absent" else counts_as)
    assert vote.verdict is not None and vote.verdict.vote == "approve"  # kept for the record
    assert vote.error and not vote.instance and not vote.signature and not vote.brain
    assert vote.attempts == 1 and len(client.calls) == 1


async def test_nothing_is_checked_when_the_view_checks_nothing() -> None:
    client = _Client(_answer(None))
    view = _SignedView(None, checks=False)
    vote = await dispatch.ask(client, Router(view), _ask())  # type: ignore[arg-type]
    assert vote.outcome == "voted" and vote.counted_as == "approve" and not vote.instance
