"""The approval inbox as A2A tasks (coordinator.approval_tasks): the answer schema, the task a
request is for each person, and who may sign an answer that came over A2A."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from a2a.helpers import new_data_part
from a2a.types import Message, Part, Role, TaskState

from coordinator.approval_tasks import Answer, parse_answer, request_task, task_id
from coordinator.clock import ManualClock
from coordinator.humans import Settled
from coordinator.ledger import MemoryStore
from mesh import approvals
from mesh.identity import Signer
from tests.unit.test_decide import KEY
from tests.unit.test_humans import People, agents_vote, desk, human_policy, request_now


def message(*parts: Part) -> Message:
    return Message(role=Role.ROLE_USER, message_id="m", parts=list(parts))


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"answer": "maybe", "reason": "x"}, '"answer" must be'),
        ({"answer": "approve"}, "needs a"),
        ({"answer": "approve", "reason": " "}, "needs a"),
        ({"answer": "approve", "reason": "x", "extra": 1}, "not an answer"),
        # 2049 characters, 4098 bytes: the limit is in bytes (what the signed vote carries).
        ({"answer": "approve", "reason": "\u00e9" * 2049}, "at most 4096 bytes"),
    ],
)
def test_a_malformed_answer_says_what_is_wrong(data: dict[str, Any], problem: str) -> None:
    got = parse_answer(message(new_data_part(data)))
    assert isinstance(got, str) and problem in got


def test_answers_that_parse() -> None:
    for answer in ("approve", "deny", "reject"):
        got = parse_answer(message(new_data_part({"answer": answer, "reason": "seen"})))
        assert isinstance(got, Answer) and got.answer == answer
    assert "one data part" in str(parse_answer(message(Part(text="approve"))))
    longest = parse_answer(message(new_data_part({"answer": "approve", "reason": "x" * 4096})))
    assert isinstance(longest, Answer)


async def test_a_request_is_each_persons_own_task() -> None:
    store, clock = MemoryStore(), ManualClock()
    await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "approve"), "s2": (0.1, "approve")}
    )
    request = await request_now(store)
    alice, bob = "acme/human:alice", "acme/human:bob"
    assert task_id(alice, request.id) != task_id(bob, request.id)
    assert task_id(alice, request.id) == task_id(alice, request.id)  # whoever serves it
    task = request_task(request, alice)
    assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
    assert task.context_id == request.event_id and task.metadata["requestId"] == request.id
    closed = request_task(msgspec.structs.replace(request, status="closed", outcome="x"), alice)
    assert closed.status.state == TaskState.TASK_STATE_COMPLETED


async def test_over_a2a_only_a_coordinator_signs_for_the_person() -> None:
    """via "a2a": signed by a trusted coordinator (or the operator) for a trusted person; a
    console key may not sign so, nor a coordinator key as a console."""
    store, clock = MemoryStore(), ManualClock()
    people = People()
    people.add("alice", "clinical-safety-officer")
    coordinator, console, stranger = Signer.generate(), Signer.generate(), Signer.generate()
    people.trust.add(coordinator, "coordinator", "c1")
    people.trust.add(console, "console", "console")
    people.trust.add(stranger, "publisher", "p")
    await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "approve"), "s2": (0.1, "approve")}
    )
    request = await request_now(store)

    def vote(signer: Signer, via: str, by: str = "alice") -> approvals.HumanVote:
        return approvals.answer(signer, request, by=by, answer="approve", reason="ok", via=via)

    trust = people.trust
    assert approvals.vote_refusal(trust, vote(console, "a2a")) is not None
    assert approvals.vote_refusal(trust, vote(stranger, "a2a")) is not None
    assert approvals.vote_refusal(trust, vote(coordinator, "console")) is not None
    assert approvals.vote_refusal(trust, vote(coordinator, "mail")) is not None
    assert "no trusted person" in str(approvals.vote_refusal(trust, vote(coordinator, "a2a", "z")))
    settled = await desk(store, clock, trust=trust).answer(KEY, vote(coordinator, "a2a"))
    assert isinstance(settled, Settled) and settled.decision.votes[-1].brain == "human via a2a"


async def test_a_saved_end_is_shown_only_for_the_round_it_answered() -> None:
    """A person's refused answer ends their task for the request as it was; once the request
    escalates (the round moves), the live INPUT_REQUIRED task is shown again. CANCELED (which
    only the SDK would write) is never kept."""
    from types import SimpleNamespace

    from coordinator.approval_tasks import ApprovalTaskStore

    store, clock = MemoryStore(), ManualClock()
    await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "approve"), "s2": (0.1, "approve")}
    )
    request = await request_now(store)
    owner = "acme/human:hank"
    context: Any = SimpleNamespace(user=SimpleNamespace(user_name=owner))
    tasks = ApprovalTaskStore(requests=None)  # type: ignore[arg-type]

    def ended(state: TaskState) -> Any:
        task = request_task(request, owner)
        task.status.state = state
        return task

    await tasks.save(ended(TaskState.TASK_STATE_CANCELED), context)
    live = TaskState.TASK_STATE_INPUT_REQUIRED
    assert tasks._current(request, context).status.state == live
    await tasks.save(ended(TaskState.TASK_STATE_REJECTED), context)
    assert tasks._current(request, context).status.state == TaskState.TASK_STATE_REJECTED
    escalated = msgspec.structs.replace(request, round=1, roles=[*request.roles, "head-of-safety"])
    assert tasks._current(escalated, context).status.state == live


async def test_an_answer_that_cannot_be_sent_ends_the_task_failed_saying_why() -> None:
    """A publish that fails (too big for the server, no stream) is the caller's news, not an
    internal error: FAILED, one line saying why."""
    from types import SimpleNamespace

    from coordinator.approval_tasks import ApprovalExecutor
    from mesh.errors import MeshError
    from mesh.identity import Principal

    store, clock = MemoryStore(), ManualClock()
    await agents_vote(
        store, clock, human_policy(), {"s1": (0.1, "approve"), "s2": (0.1, "approve")}
    )
    request = await request_now(store)

    class Refusing:
        async def publish(self, *args: Any, **kwargs: Any) -> Any:
            raise MeshError("maximum payload exceeded\nsecond line")

    class Known:
        async def of(self, tenant: str) -> dict[str, approvals.ApprovalRequest]:
            return {request.id: request}

        def forget(self, tenant: str) -> None:
            raise AssertionError("nothing was sent")

    alice = Principal(name="alice", role="human", tenant=request.tenant)
    executor = ApprovalExecutor(Refusing(), Signer.generate(), Known())  # type: ignore[arg-type]
    context: Any = SimpleNamespace(
        message=message(new_data_part({"answer": "approve", "reason": "checked"})),
        call_context=SimpleNamespace(user=SimpleNamespace(principal=alice)),
    )
    state, text, artifact = await executor._answer(request_task(request, alice.owner), context)
    assert state == TaskState.TASK_STATE_FAILED and artifact is None
    assert text == "the answer was not sent: maximum payload exceeded", text
