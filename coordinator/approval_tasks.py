"""The approval inbox as an A2A agent: approval requests are tasks in `TASK_STATE_INPUT_REQUIRED`
that other tools list, read, answer and follow (docs/humans.md, "The inbox over A2A").

    agent = ApprovalsAgent.from_bus(bus, signer)       # a coordinator's inbox serves one
    await agent.subscribe(bus.nc)                       # A2A over NATS: mesh.a2a.approvals
    app = agent.http_app()                              # …and over HTTP, where it is mounted

Served with the mesh's one A2A server (`mesh.a2a.server.A2AServer`: the same authentication,
dispatch, request handler and push delivery as every agent), with a card of its own signed by
the serving coordinator's key, skill `approvals`. What differs is the task store
(`ApprovalTaskStore`): the tasks are not kept, they are the approval requests of the caller's
tenant as the stream `MESH_APPROVALS` has them, seen through the caller's eyes:

- only a person (an A2A bearer token of role `human`) who is a trusted, active person of the
  request's tenant holding a role of the request's chain (asked so far, or next) sees it; every
  other caller (another tenant, another role, an agent, an operator) sees no task at all;
- each person has a task of their own per request (task id: a UUID of the person and the
  request, context id: the event id), `INPUT_REQUIRED` while the request is open, `COMPLETED`
  once it is closed (its status message says what came of it); its status message carries the
  request as a data part (the event, the agents' votes and reasons: the evidence; who may
  answer; until when) and a line of text.

A follow-up SendMessage on such a task answers it with a data part (`ANSWER_SCHEMA`):

    {"answer": "approve" | "deny", "reason": "dose range checked"}

The answer is recorded exactly as `mesh approvals approve|deny` records one: a `HumanVote`
published on `mesh.approval.<tenant>.vote.<id>`, checked by the coordinators' desk (a trusted
person of the tenant, a role asked so far, Cedar's `approve`, the evidence shown), audited, and
answered with a receipt. It is signed by the serving coordinator's key on the person's behalf
(`via: "a2a"`, the person named in `by`, their identity proved by their bearer token; as the web
console does); a tool that holds the person's own key sends the vote it signed instead
(`{"signed": <HumanVote>}`, `mesh.approvals.answer`), which is then the person's own signature.
The task then ends `COMPLETED` (accepted: an artifact `approval` says so), `REJECTED` (refused:
the status message says why, as the receipt does, and the refusal is audited), or `FAILED` (no
receipt in time: the answer may still count; GetTask later). A malformed answer leaves the task
`INPUT_REQUIRED`, its status message naming what is wrong.

Push: a push-notification config on such a task receives its state changes through the
server's push delivery (the SSRF guard of `mesh.a2a.push`): the answer's, and those the inbox
makes (an escalation, the final silence, another person's answer closing the request).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from a2a.helpers import get_data_parts, new_data_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.server.owner_resolver import resolve_user_scope
from a2a.server.tasks import InMemoryTaskStore, TaskStore, TaskUpdater
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    Part,
    Role,
    Task,
    TaskState,
    TaskStatus,
)
from a2a.utils.errors import TaskNotCancelableError, TaskNotFoundError
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

from mesh import approvals, subjects
from mesh.a2a.auth import Authenticator
from mesh.a2a.server import A2AServer
from mesh.approvals import ApprovalRequest, HumanVote
from mesh.cards import parse_card, with_interfaces
from mesh.identity import Principal, Signer, Trust, TrustFile, resolve_trust, trust_path
from mesh.signing import CardSigner

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from mesh.bus import Bus
    from mesh.settings import Settings

log = logging.getLogger(__name__)

AGENT = subjects.APPROVALS_AGENT
VIA_A2A = approvals.VIA_A2A
RECEIPT_WAIT_S = 15.0  # how long a follow-up waits for the desk's receipt
_CACHE_S = 0.5  # a tenant's requests are read once for the few store calls of one request
_NAMESPACE = uuid.UUID("6f1d3a52-7f0e-4a39-9d0c-5e2b8c1a4d77")  # task ids of approval tasks
_ANSWERED_KEPT = 10_000
_ANSWER_ENDS = frozenset(
    {TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_REJECTED, TaskState.TASK_STATE_FAILED}
)
# A reason's limit (UTF-8 bytes): the vote the inbox signs for it must fit in one NATS message
# (1 MiB by default), and a reason is a sentence or a paragraph, not a document.
MAX_REASON_BYTES = 4096

# The data part of an answer (documented in docs/humans.md; what `parse_answer` accepts).
ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["approve", "deny", "reject"]},
        "reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON_BYTES},
        "signed": {"type": "object", "description": "a HumanVote the person signed"},
    },
    "oneOf": [{"required": ["answer", "reason"]}, {"required": ["signed"]}],
}


def task_id(owner: str, request_id: str) -> str:
    """A person's task for a request: the same id whoever serves it, nobody else's."""
    return str(uuid.uuid5(_NAMESPACE, f"{owner}\n{request_id}"))


def chain_roles(request: ApprovalRequest) -> set[str]:
    return set(request.roles) | set(request.next_roles)


def request_task(request: ApprovalRequest, owner: str) -> Task:
    """`request` as the task `owner` sees."""
    tid = task_id(owner, request.id)
    open_ = request.status == "open"
    if open_:
        text = (
            f"{' or '.join(request.roles)} asked to approve {request.decision_type} of event "
            f"{request.event_id} ({request.event_type}) until {_when(request.expires_at)}: "
            'answer with a data part {"answer": "approve"|"deny", "reason": "..."}'
        )
    else:
        text = f"closed: {request.outcome or 'answered'}"
    message = Message(
        role=Role.ROLE_AGENT,
        message_id=f"{tid}.{request.round}.{request.status}",
        task_id=tid,
        context_id=request.event_id,
        parts=[
            Part(text=text),
            new_data_part(msgspec.to_builtins(request), media_type="application/json"),
        ],
    )
    status = TaskStatus(
        state=TaskState.TASK_STATE_INPUT_REQUIRED if open_ else TaskState.TASK_STATE_COMPLETED,
        message=message,
    )
    status.timestamp.FromNanoseconds(int(request.asked_at * 1e9))
    task = Task(id=tid, context_id=request.event_id, status=status)
    task.metadata.update(
        {
            "requestId": request.id,
            "tenant": request.tenant,
            "eventId": request.event_id,
            "decisionType": request.decision_type,
            "round": request.round,
        }
    )
    return task


def _short(e: Exception) -> str:
    """One line of an error, for a caller (its type when it says nothing)."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _principal(context: ServerCallContext | None) -> Principal | None:
    user = context.user if context is not None else None
    principal = getattr(user, "principal", None)
    return principal if isinstance(principal, Principal) else None


class Requests:
    """A tenant's approval requests (their last message each, trusted coordinators' only),
    read from the stream, remembered for an instant; and who may see which."""

    def __init__(self, bus: Bus, trust: Callable[[], Trust | None]) -> None:
        self.bus = bus
        self.trust = trust
        self._read: dict[str, tuple[float, dict[str, ApprovalRequest]]] = {}

    async def of(self, tenant: str) -> dict[str, ApprovalRequest]:
        now = time.monotonic()
        cached = self._read.get(tenant)
        if cached is not None and now - cached[0] < _CACHE_S:
            return cached[1]
        found = await approvals.inbox(self.bus, tenant, self.trust())
        self._read[tenant] = (now, found)
        return found

    def forget(self, tenant: str) -> None:
        self._read.pop(tenant, None)

    def roles_of(self, principal: Principal | None) -> list[str]:
        """The approver roles of a caller who is a trusted person ([]: not one)."""
        trust = self.trust()
        if principal is None or principal.role != "human" or trust is None:
            return []
        person = approvals.person(trust, principal.name, principal.tenant)
        return list(person.claims) if person is not None else []

    async def visible(self, context: ServerCallContext | None) -> dict[str, ApprovalRequest]:
        """The requests the caller may see, by their task id for the caller."""
        principal = _principal(context)
        roles = set(self.roles_of(principal))
        if principal is None or not roles:
            return {}
        owner = principal.owner
        return {
            task_id(owner, r.id): r
            for r in (await self.of(principal.tenant)).values()
            if roles & chain_roles(r)
        }


class ApprovalTaskStore(TaskStore):  # type: ignore[misc]
    """Approval requests as the caller's tasks (see the module docstring). Nothing is kept
    but the end of a person's own answer (a task the SDK saved in a terminal state), so the
    task a follow-up ended shows how it ended (REJECTED, FAILED) even while the request stays
    open for others."""

    def __init__(self, requests: Requests) -> None:
        self.requests = requests
        self._ended: OrderedDict[tuple[str, str], Task] = OrderedDict()

    async def save(self, task: Task, context: ServerCallContext) -> None:
        # Only the ends an answer makes (`ApprovalExecutor._answer`): never CANCELED (nor any
        # other end the SDK might write for a task), which would lock the person out of a
        # request still open (a2a-sdk refuses follow-ups on a terminal task).
        if task.status.state in _ANSWER_ENDS:
            self._ended[(resolve_user_scope(context), task.id)] = task
            while len(self._ended) > _ANSWERED_KEPT:
                self._ended.popitem(last=False)

    async def get(self, task_id: str, context: ServerCallContext) -> Task | None:
        request = (await self.requests.visible(context)).get(task_id)
        if request is None:
            return None
        return self._current(request, context)

    def _current(self, request: ApprovalRequest, context: ServerCallContext) -> Task:
        owner = resolve_user_scope(context)
        task = request_task(request, owner)
        ended = self._ended.get((owner, task.id))
        if ended is None:
            return task
        # An answer refused (or unconfirmed) ends the person's task for the request as it was
        # answered; news since is newer: an escalation (the round, and with it the roles asked,
        # moved: a person refused as "not asked yet" may be asked now, and must be able to
        # answer) or the request closing (decided: only the person's own accepted answer is
        # shown still).
        if request.status == "closed":
            return ended if ended.status.state == TaskState.TASK_STATE_COMPLETED else task
        return ended if _answered_round(ended) in (None, request.round) else task

    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        # The SDK's own in-memory store filters, sorts and pages them (same cursors).
        page = InMemoryTaskStore()
        for request in (await self.requests.visible(context)).values():
            await page.save(self._current(request, context), context)
        result: ListTasksResponse = await page.list(params, context)
        return result

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        self._ended.pop((resolve_user_scope(context), task_id), None)


def _answered_round(task: Task) -> int | None:
    """The request's round a saved task was answered at (its `round` metadata, which the task
    the SDK ran the follow-up on had from `request_task`); None if it has none."""
    if "round" not in task.metadata:  # a protobuf Struct: no .get()
        return None
    value = task.metadata["round"]
    return int(value) if isinstance(value, int | float) else None


class Answer(msgspec.Struct, forbid_unknown_fields=True):
    answer: str = ""
    reason: str = ""
    signed: HumanVote | None = None


def parse_answer(message: Message | None) -> Answer | str:
    """The answer a follow-up carries, or what is wrong with it."""
    data = get_data_parts(list(message.parts)) if message is not None else []
    if len(data) != 1:
        return 'send one data part: {"answer": "approve"|"deny", "reason": "..."}'
    try:
        got = msgspec.convert(data[0], Answer)
    except msgspec.ValidationError as e:
        return f"not an answer: {e}"
    reason = got.signed.reason if got.signed is not None else got.reason
    if len(reason.encode()) > MAX_REASON_BYTES:
        return f'"reason" is too long: at most {MAX_REASON_BYTES} bytes (UTF-8)'
    if got.signed is not None:
        return got
    if got.answer not in ("approve", "deny", "reject"):
        return f'"answer" must be "approve" or "deny", not {got.answer!r}'
    if not got.reason.strip():
        return 'an answer needs a "reason"'
    return got


class ApprovalExecutor(AgentExecutor):  # type: ignore[misc]
    """Answers an approval task's follow-up as `mesh approvals approve|deny` would."""

    def __init__(
        self,
        bus: Bus,
        signer: Signer | None,
        requests: Requests,
        *,
        receipt_wait_s: float = RECEIPT_WAIT_S,
    ) -> None:
        self.bus = bus
        self.signer = signer
        self.requests = requests
        self.receipt_wait_s = receipt_wait_s

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        task = context.current_task
        if task is None:
            # Not a follow-up: nothing to answer. A message, not a task (nothing to list).
            await event_queue.enqueue_event(
                Message(
                    role=Role.ROLE_AGENT,
                    message_id=str(uuid.uuid4()),
                    context_id=context.context_id or "",
                    parts=[
                        Part(
                            text="approval requests are tasks: ListTasks, then answer one with a "
                            'follow-up (its taskId) carrying {"answer": "approve"|"deny", '
                            '"reason": "..."}'
                        )
                    ],
                )
            )
            return
        # a2a-sdk wants the task before any status update, and answers a blocking send with
        # the first task it sees in INPUT_REQUIRED: so it is sent on as WORKING.
        working = Task()
        working.CopyFrom(task)
        working.status.state = TaskState.TASK_STATE_WORKING
        working.status.ClearField("message")
        await event_queue.enqueue_event(working)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        state, text, artifact = await self._answer(task, context)
        if artifact is not None:
            await updater.add_artifact([artifact], name="approval")
        await updater.update_status(state, message=updater.new_agent_message([Part(text=text)]))

    async def _answer(
        self, task: Task, context: RequestContext
    ) -> tuple[TaskState, str, Part | None]:
        parsed = parse_answer(context.message)
        if isinstance(parsed, str):
            return TaskState.TASK_STATE_INPUT_REQUIRED, parsed, None
        principal = _principal(context.call_context)
        assert principal is not None  # the store showed the task: a person
        request_id = str(task.metadata["requestId"])
        request = (await self.requests.of(principal.tenant)).get(request_id)
        if request is None or request.status != "open":
            why = request.outcome if request is not None else "gone"
            return TaskState.TASK_STATE_REJECTED, f"the request is closed: {why}", None
        vote = self._vote(parsed, request, principal)
        if isinstance(vote, str):
            return TaskState.TASK_STATE_REJECTED, vote, None
        try:
            await approvals.submit(self.bus, vote)
        except Exception as e:  # the caller gets why (too big, no stream), not an internal error
            log.warning("approval %s: the answer was not sent: %s", request.id, e)
            return TaskState.TASK_STATE_FAILED, f"the answer was not sent: {_short(e)}", None
        self.requests.forget(principal.tenant)
        receipt = await approvals.receipt(self.bus, vote, wait_s=self.receipt_wait_s)
        if receipt is None:
            return (
                TaskState.TASK_STATE_FAILED,
                f"no receipt within {self.receipt_wait_s:g} s: the answer was sent and may "
                "still count (GetTask later)",
                None,
            )
        if not receipt.accepted:
            return TaskState.TASK_STATE_REJECTED, f"refused: {receipt.why}", None
        said = {
            "requestId": request.id,
            "answer": vote.answer,
            "reason": vote.reason,
            "by": vote.by,
            "at": vote.at,
            "accepted": True,
            **({"via": vote.via} if vote.via else {}),
        }
        artifact = new_data_part(said, media_type="application/json")
        return TaskState.TASK_STATE_COMPLETED, f"{vote.answer} recorded", artifact

    def _vote(self, parsed: Answer, request: ApprovalRequest, who: Principal) -> HumanVote | str:
        if parsed.signed is not None:
            vote = parsed.signed
            if (vote.by, vote.tenant, vote.request_id) != (who.name, who.tenant, request.id):
                return "the signed answer is not this person's answer to this request"
            return vote
        if self.signer is None:
            return 'this inbox cannot sign for people: send {"signed": <your signed answer>}'
        return approvals.answer(
            self.signer,
            request,
            by=who.name,
            answer="approve" if parsed.answer == "approve" else "reject",
            reason=parsed.reason,
            via=VIA_A2A,
        )

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise TaskNotCancelableError(message="an approval request is answered, not cancelled")


def approvals_card(signer: Signer | None, *, nats_subject: str, http_url: str | None) -> AgentCard:
    """The inbox's card: skill `approvals`, push notifications on, bearer tokens required;
    signed with `signer` (the serving coordinator's key) when there is one."""
    card = parse_card(
        {
            "name": AGENT,
            "description": "The approval inbox: approval requests waiting for people, as tasks "
            "in INPUT_REQUIRED; answer one with a follow-up message.",
            "version": "1.0.0",
            "capabilities": {"pushNotifications": True, "streaming": False},
            "defaultInputModes": ["application/json"],
            "defaultOutputModes": ["application/json", "text/plain"],
            "skills": [
                {
                    "id": "approvals",
                    "name": "Approvals",
                    "description": "List the requests you may answer (ListTasks); answer one "
                    'with a follow-up carrying {"answer": "approve"|"deny", "reason": "..."}.',
                    "tags": ["approval", "human-in-the-loop"],
                }
            ],
        },
        source="approvals card",
        require_interfaces=False,
    )
    live = with_interfaces(card, http_url=http_url, nats_subject=nats_subject, authenticated=True)
    return CardSigner(signer).sign(live) if signer is not None else live


class ApprovalsAgent:
    """The inbox as an A2A agent, on the mesh's A2A server (see the module docstring)."""

    def __init__(
        self,
        bus: Bus,
        signer: Signer | None,
        trust: Callable[[], Trust | None],
        *,
        auth: Authenticator,
        settings: Settings,
        http_url: str | None = None,
        receipt_wait_s: float = RECEIPT_WAIT_S,
    ) -> None:
        self.bus = bus
        self.requests = Requests(bus, trust)
        self.trust = trust
        self.card = approvals_card(signer, nats_subject=subjects.a2a(AGENT), http_url=http_url)
        self.store = ApprovalTaskStore(self.requests)
        self.server = A2AServer(
            self.card,
            ApprovalExecutor(bus, signer, self.requests, receipt_wait_s=receipt_wait_s),
            self.store,
            auth=auth,
            settings=settings,
            max_concurrency=16,
        )
        # An approval request is answered, not cancelled: CancelTask is refused up front
        # (-32002), the task left as it was. a2a-sdk's handler would otherwise write CANCELED
        # itself (no execution running) or end the follow-up running FAILED, whatever the
        # executor's `cancel` says.
        self.server.handler.on_cancel_task = self._refuse_cancel  # type: ignore[method-assign]

    async def _refuse_cancel(self, params: CancelTaskRequest, context: ServerCallContext) -> Task:
        if await self.store.get(params.id, context) is None:
            raise TaskNotFoundError
        raise TaskNotCancelableError(message="an approval request is answered, not cancelled")

    @classmethod
    def from_bus(
        cls, bus: Bus, signer: Signer | None, *, http_url: str | None = None
    ) -> ApprovalsAgent | None:
        """The inbox's agent with the bus's settings; None (logged) where A2A callers cannot
        be authenticated (no trust file, or MESH_INSECURE=a2a: nobody would be a person)."""
        settings = bus.settings
        if "a2a" in settings.insecure_parts():
            log.warning("approvals over A2A: off (MESH_INSECURE=a2a: nobody is a person)")
            return None
        trust = resolve_trust(settings)
        if trust is None:
            log.warning("approvals over A2A: off (no trust file to authenticate people)")
            return None
        watched = TrustFile(trust_path(settings), trust)

        def current() -> Trust | None:
            return watched.current()[0]

        auth = Authenticator(watched, agent=AGENT)
        return cls(bus, signer, current, auth=auth, settings=settings, http_url=http_url)

    async def subscribe(self, nc: NATS) -> Subscription:
        """Serve A2A over NATS on `mesh.a2a.approvals` (coordinators share it, a queue group)."""
        return await self.server.subscribe(nc, subjects.a2a(AGENT), queue=AGENT)

    def http_app(self) -> Starlette:
        return self.server.http_app()

    async def changed(self, request: ApprovalRequest) -> None:
        """The inbox published `request` anew (asked, escalated, closed): its people's tasks
        changed; their push configs hear of it."""
        self.requests.forget(request.tenant)
        sender = self.server.push.sender
        trust = self.trust()
        if sender is None or trust is None:
            return
        people = {
            k.name
            for kid, k in trust.keys.items()
            if k.role == "human" and k.tenant == request.tenant and kid not in trust.revoked
        }
        for name in sorted(people):
            person = approvals.person(trust, name, request.tenant)
            if person is None or not set(person.claims) & chain_roles(request):
                continue
            owner = Principal(name=name, role="human", tenant=request.tenant).owner
            with contextlib.suppress(Exception):  # best effort, as the SDK's delivery is
                await sender.send_notification(
                    task_id(owner, request.id), request_task(request, owner)
                )

    async def aclose(self) -> None:
        await self.server.drain(5.0)
        await self.server.aclose()
