import asyncio
import contextlib
import dataclasses
import time
from typing import Any

import msgspec
import pytest
from a2a.helpers import new_data_part
from a2a.types import Artifact, Message, Task, TaskState, TaskStatus

from coordinator import dispatch
from coordinator.canary import VersionFilter
from coordinator.decide import Ask, unreachable
from coordinator.policy import Policy
from coordinator.quorum import QuorumRule
from coordinator.routing import DEFAULT_CAPACITY, NoReplica, Route, Router
from mesh import envelope
from mesh.a2a import jsonrpc
from mesh.errors import AgentBusyError, AgentCallError, AgentTimeoutError, AgentUnavailableError
from mesh.identity import Signer, b64
from mesh.registry import Registration
from mesh.signing import Binding
from mesh.verdict import Verdict
from mesh.versions import VERSION_KEY
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

    def version(self, agent: str, instance: str) -> str:
        """What the instance's verified card says it runs (mesh.versions)."""
        return CARD_VERSION if self.binding(agent, instance) is not None else ""


CARD_VERSION = "2.0+0123456789ab"


class _Client:
    """Answers every SendMessage with the task `answer(message)` builds; counts the calls."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[Message] = []

    async def send(self, agent: str, message: Message, **kw: Any) -> Task:
        self.calls.append(message)
        result: Task = self.answer(message)
        return result

    async def send_lean(self, agent: str, message: Any, **kw: Any) -> Task:
        # The coordinator's path (mesh.a2a.wire): the same answers, the readers take a Task too.
        return await self.send(agent, message, **kw)


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
    assert vote.version == CARD_VERSION  # from the signing instance's verified card
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


# -- breakers open on failures, never on load we made ---------------------------------------------
def _busy(agent: str = "rev", retry_after_s: float = 0.0) -> AgentCallError:
    return AgentBusyError(agent, "busy", retry_after_s=retry_after_s, code=jsonrpc.BUSY)


class _Tick:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _ended(router: Router, route: Route, error: BaseException | None, **kw: Any) -> None:
    with contextlib.suppress(BaseException):
        async with router.call(route, slow_s=kw.get("slow_s", 1.0)):
            if error is not None:
                raise error


async def test_a_busy_answer_is_never_a_breaker_failure() -> None:
    router = Router(_View(_reg("a")), threshold=1, ttl_s=60)  # type: ignore[arg-type]
    route = router.route("rev")
    for _ in range(5):
        await _ended(router, route, _busy())
    assert router.states()["rev.a"] == "closed"
    assert router.limit("rev.a") == 1  # but it is overloaded: fewer calls at once


async def test_a_cancelled_call_or_an_internal_error_answer_is_not_a_failure() -> None:
    for error in (
        asyncio.CancelledError(),
        AgentCallError("rev", "error -32603: no response from stream", code=-32603),
    ):
        router = Router(_View(_reg("a")), threshold=1, ttl_s=60)  # type: ignore[arg-type]
        await _ended(router, router.route("rev"), error)
        assert router.states()["rev.a"] == "closed", error


async def test_a_timeout_trips_only_a_replica_that_gave_no_sign_of_life() -> None:
    router = Router(_View(_reg("a")), threshold=1, ttl_s=60)  # type: ignore[arg-type]
    route = router.route("rev")
    # Busy but alive: while this call waited, another call to the same replica was answered.
    with contextlib.suppress(AgentTimeoutError):
        async with router.call(route, slow_s=1.0):
            await _ended(router, route, None)
            raise AgentTimeoutError("rev", 1.5)
    assert router.states()["rev.a"] == "closed"
    # Hung (SIGSTOP): nothing it was asked got an answer while this call waited.
    await _ended(router, route, AgentTimeoutError("rev", 1.5))
    assert router.states()["rev.a"] == "opened"


async def test_no_responders_and_error_answers_are_failures() -> None:
    for error in (AgentUnavailableError("rev"), AgentCallError("rev", "error -32602", code=-32602)):
        router = Router(_View(_reg("a")), threshold=1, ttl_s=60)  # type: ignore[arg-type]
        await _ended(router, router.route("rev"), error)
        assert router.states()["rev.a"] == "opened", error


async def test_calls_go_to_the_replica_with_the_most_free_room() -> None:
    router = Router(_View(_reg("a"), _reg("b")))  # type: ignore[arg-type]
    release = asyncio.Event()
    held: list[asyncio.Task[None]] = []

    async def hold(route: Route) -> None:
        async with router.call(route, slow_s=60):
            await release.wait()

    for _ in range(6):
        route = router.route("rev")
        held.append(asyncio.create_task(hold(route)))
        await asyncio.sleep(0)  # the call is in flight
    # Least loaded each time: an even split, never 4 on one and 2 on the other.
    assert router.inflight("rev.a") == router.inflight("rev.b") == 3
    assert router.capacity("rev") == 2 * DEFAULT_CAPACITY
    release.set()
    await asyncio.gather(*held)
    assert router.inflight("rev.a") == router.inflight("rev.b") == 0


async def test_capacity_follows_declared_limits_and_breakers() -> None:
    a, b = _reg("a"), _reg("b")
    router = Router(_View(a, b), threshold=1, ttl_s=60)  # type: ignore[arg-type]
    if "capacity" in Registration.__struct_fields__:  # declared capacity (0 = unknown)
        router = Router(_View(msgspec.structs.replace(a, capacity=3), b), threshold=1, ttl_s=60)  # type: ignore[arg-type]
        assert router.capacity("rev") == 3 + DEFAULT_CAPACITY
    await _ended(router, Route("rev", "mesh.a2a.rev.b", "rev.b"), AgentUnavailableError("rev"))
    assert router.capacity("rev") == router.limit("rev.a")  # b's breaker is open
    await _ended(router, Route("rev", "mesh.a2a.rev.a", "rev.a"), AgentUnavailableError("rev"))
    assert router.capacity("rev") == 0  # nothing usable: admission does not wait for it


async def test_slow_answers_shrink_the_limit_once_per_episode_and_fast_ones_grow_it() -> None:
    tick = _Tick()
    router = Router(_View(_reg("a")), clock=tick)  # type: ignore[arg-type]
    route = router.route("rev")
    release = asyncio.Event()

    async def slow() -> None:
        async with router.call(route, slow_s=0.75):
            await release.wait()

    calls = [asyncio.create_task(slow()) for _ in range(4)]
    await asyncio.sleep(0)
    tick.now = 2.0  # all four answer after 2 s: one overload episode
    release.set()
    await asyncio.gather(*calls)
    assert router.limit("rev.a") == DEFAULT_CAPACITY // 2
    for _ in range(50):
        await _ended(router, route, None, slow_s=0.75)  # fast: no time passes
    assert router.limit("rev.a") == DEFAULT_CAPACITY


# -- dispatch: infrastructure failures are retried until the deadline ------------------------------
class _Flaky(_Client):
    """Fails with `errors` in turn, then answers."""

    def __init__(self, errors: list[BaseException]) -> None:
        super().__init__(_answer(None))
        self.errors = list(errors)

    async def send(self, agent: str, message: Message, **kw: Any) -> Task:
        self.calls.append(message)
        if self.errors:
            raise self.errors.pop(0)
        result: Task = self.answer(message)
        return result


@pytest.fixture
def no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh._internal.retry import RetryPolicy

    monkeypatch.setattr(dispatch, "INFRA_RETRY", RetryPolicy(attempts=2**62, base_s=0, max_s=0))
    monkeypatch.setattr(
        dispatch, "retry_policy", lambda p: RetryPolicy(attempts=p.retries + 1, base_s=0, max_s=0)
    )


@pytest.mark.usefixtures("no_pauses")
@pytest.mark.parametrize(
    "error",
    [
        _busy,
        lambda: AgentUnavailableError("rev"),
        lambda: AgentCallError("rev", "error -32603: no response from stream", code=-32603),
    ],
    ids=["busy", "no-responders", "internal-error"],
)
async def test_infrastructure_failures_are_retried_beyond_the_policys_retries(error: Any) -> None:
    client = _Flaky([error() for _ in range(6)])  # the policy allows 2 retries
    view = _SignedView(None, checks=False)
    vote = await dispatch.ask(client, Router(view, threshold=100), _ask())  # type: ignore[arg-type]
    assert vote.outcome == "voted" and vote.attempts == 7


@pytest.mark.usefixtures("no_pauses")
async def test_timeouts_and_error_answers_keep_to_the_policys_retries() -> None:
    for error, outcome in (
        (lambda: AgentTimeoutError("rev", 1.0), "timeout"),
        (lambda: AgentCallError("rev", "error -32001", code=-32001, retryable=True), "error"),
    ):
        client = _Flaky([error() for _ in range(6)])
        view = _SignedView(None, checks=False)
        vote = await dispatch.ask(client, Router(view, threshold=100), _ask())  # type: ignore[arg-type]
        assert vote.outcome == outcome and vote.attempts == 3  # 1 + retries


async def test_an_infrastructure_retry_never_passes_the_deadline() -> None:
    # Busy for ever, told to come back in 10 s: the deadline (2 s) comes first, and the vote
    # says what happened.
    client = _Flaky([_busy(retry_after_s=10.0) for _ in range(100)])
    view = _SignedView(None, checks=False)
    vote = await dispatch.ask(client, Router(view, threshold=100), _ask())  # type: ignore[arg-type]
    assert vote.outcome == "unavailable" and vote.attempts == 1 and "busy" in vote.error


@pytest.mark.usefixtures("no_pauses")
@pytest.mark.parametrize(
    ("errors", "nobody"),
    [
        ([lambda: AgentUnavailableError("rev")], True),
        ([lambda: AgentTimeoutError("rev", 0.01), lambda: AgentUnavailableError("rev")], True),
        ([_busy, lambda: AgentUnavailableError("rev")], True),
        ([lambda: AgentUnavailableError("rev"), lambda: AgentTimeoutError("rev", 0.01)], False),
        ([lambda: AgentUnavailableError("rev"), _busy], False),
        ([_busy], False),
    ],
    ids=[
        "no-responders-every-time",
        "a-timeout-then-gone",
        "busy-then-gone",
        "gone-then-timeouts",
        "gone-then-busy",
        "busy",
    ],
)
async def test_a_call_whose_last_attempts_found_nobody_listening_is_unreachable(
    errors: list[Any], nobody: bool
) -> None:
    """`unreachable` (the decision core waits for the voter rather than count it) when the
    call's last attempts found nobody listening: an instance that timed out or said busy and is
    gone now cannot answer (a voter killed mid-call, or killed just before the server noticed).
    One that is there at the end (timing out, busy) counts as the policy says."""
    first, rest = errors[:-1], errors[-1]
    client = _Flaky([e() for e in first] + [rest() for _ in range(100_000)])
    view = _SignedView(None, checks=False)
    req = dataclasses.replace(_ask(), deadline=time.monotonic() + 0.2)
    vote = await dispatch.ask(client, Router(view, threshold=100), req)  # type: ignore[arg-type]
    assert vote.outcome in ("unavailable", "timeout")
    assert unreachable(vote) is nobody, vote.error


@pytest.mark.usefixtures("no_pauses")
@pytest.mark.parametrize(
    ("error", "nobody"),
    [(lambda: AgentUnavailableError("rev"), True), (lambda: AgentTimeoutError("rev", 0.01), False)],
    ids=["opened-on-no-responders", "opened-on-timeouts"],
)
async def test_a_call_stopped_by_an_open_breaker_is_judged_by_why_it_opened(
    error: Any, nobody: bool
) -> None:
    """An open breaker sends nothing: the call counts as unreachable only if the breaker opened
    because nobody listened; one that opened on a hung replica's timeouts is silence."""
    view = _SignedView(None, checks=False)
    router = Router(view, threshold=2, ttl_s=60.0)
    client = _Flaky([error() for _ in range(100_000)])
    req = dataclasses.replace(_ask(), deadline=time.monotonic() + 0.2)
    for _ in range(3):  # until every breaker (each replica's, the shared subject's) is open
        await dispatch.ask(
            client, router, dataclasses.replace(req, deadline=time.monotonic() + 0.2)
        )  # type: ignore[arg-type]
    calls = len(client.calls)
    vote = await dispatch.ask(
        client, router, dataclasses.replace(req, deadline=time.monotonic() + 0.2)
    )  # type: ignore[arg-type]
    assert len(client.calls) == calls  # nothing sent: every breaker open
    assert unreachable(vote) is nobody, vote.error


# -- dispatch: a take-over past the deadline -----------------------------------------------------
def _taken_over(*, answered_in_time: bool) -> Ask:
    """A take-over's ask whose deadline (monotonic) is gone; the wall deadline says whether an
    answer signed now was in time."""
    wall = time.time() + (60 if answered_in_time else -1)
    return dataclasses.replace(
        _ask(), deadline=time.monotonic() - 1, deadline_wall=wall, grace_s=1.0
    )


async def test_a_take_over_counts_an_answer_the_voter_gave_in_time() -> None:
    signer, binding = _instance()
    client = _Client(_answer(signer))
    vote = await dispatch.ask(
        client, Router(_SignedView(binding)), _taken_over(answered_in_time=True)
    )  # type: ignore[arg-type]
    assert vote.outcome == "voted" and vote.counted_as == "approve", vote
    assert len(client.calls) == 1


@pytest.mark.parametrize("answer", ["late", "none"])
async def test_a_take_over_without_an_answer_in_time_asks_again_rather_than_count_silence(
    answer: str,
) -> None:
    """The failed coordinator held the question past the deadline: not the voter's silence. The
    vote is `unreachable` (the decision core releases the event and asks again under a fresh
    deadline), never a timeout counted as the policy says."""
    signer, binding = _instance()
    client: _Client = (
        _Client(_answer(signer)) if answer == "late" else _Flaky([AgentTimeoutError("rev", 1.0)])
    )
    vote = await dispatch.ask(
        client, Router(_SignedView(binding)), _taken_over(answered_in_time=False)
    )  # type: ignore[arg-type]
    assert vote.outcome == "unavailable" and vote.counted_as == "reject", vote
    assert unreachable(vote), vote.error


# -- versions: a vote's version is its card's; routing by version (coordinator.canary) -------------
async def test_a_vote_claiming_another_version_is_recorded_with_its_cards() -> None:
    signer, binding = _instance()
    build = _answer(signer)

    def lying(message: Message) -> Task:
        task: Task = build(message)
        task.artifacts[0].metadata.update({VERSION_KEY: "9.9+ffffffffffff"})  # not signed
        return task

    vote = await dispatch.ask(_Client(lying), Router(_SignedView(binding)), _ask())  # type: ignore[arg-type]
    assert vote.outcome == "voted" and vote.version == CARD_VERSION


def _versioned(instance: str, version: str) -> Registration:
    return msgspec.structs.replace(_reg(instance), version=version)


def test_a_version_filter_routes_only_to_the_replicas_it_admits() -> None:
    view = _View(_versioned("a", "1+old"), _versioned("b", "2+new"), _versioned("c", "1+old"))
    router = Router(view)  # type: ignore[arg-type]
    only = VersionFilter(only="2+new")
    never = VersionFilter(never=frozenset({"2+new"}))
    assert {router.route("rev", versions=only).breaker_key for _ in range(20)} == {"rev.b"}
    assert {router.route("rev", versions=never).breaker_key for _ in range(40)} == {
        "rev.a",
        "rev.c",
    }


def test_a_canary_with_no_candidate_replica_falls_back_to_stable_but_strict_refuses() -> None:
    router = Router(_View(_versioned("a", "1+old")))  # type: ignore[arg-type]
    assert router.route("rev", versions=VersionFilter(only="2+new")).breaker_key == "rev.a"
    with pytest.raises(NoReplica):
        router.route("rev", versions=VersionFilter(only="2+new", strict=True))
    # A stopped candidate: never it, not even through the shared subject.
    only_candidate = Router(_View(_versioned("b", "2+new")))  # type: ignore[arg-type]
    with pytest.raises(NoReplica):
        only_candidate.route("rev", versions=VersionFilter(never=frozenset({"2+new"}), strict=True))


async def test_a_shadow_ask_with_no_candidate_replica_is_unavailable_and_asks_no_one() -> None:
    signer, binding = _instance()
    client = _Client(_answer(signer))
    ask = dataclasses.replace(
        _ask(), versions=VersionFilter(only="2+new", strict=True), shadow=True
    )
    vote = await dispatch.ask(client, Router(_SignedView(binding)), ask)  # type: ignore[arg-type]
    assert vote.outcome == "unavailable" and vote.shadow and "2+new" in vote.error
    assert client.calls == []
