"""A2A tasks in JetStream: CAS versions, ListTasks, and tasks that outlive the replica that made
them (read through another replica, or after a restart)."""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.auth.user import User
from a2a.helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.cluster import ConcurrentTaskModificationError, TaskVersion
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.tasks import TaskUpdater
from a2a.types import (
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from a2a.utils.errors import InvalidParamsError
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NatsClient
from nats.js.client import JetStreamContext

from mesh import subjects
from mesh.a2a.client import user_message, verdict_of
from mesh.a2a.taskstore import JetStreamTaskStore
from mesh.agent import Agent, RunningAgent
from mesh.bus import Bus
from mesh.cards import load_card, with_interfaces
from mesh.identity import resolve_identity
from mesh.settings import Settings
from tests.support.samples import V1 as VERSION_ONLY
from tests.support.samples import jsonrpc, voting_agent, write_card
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

ANON = ServerCallContext()
MISSING = TaskVersion.MISSING
# Calls to agents carry the run's operator's token (tests/conftest.py).
_OPERATOR = resolve_identity(Settings())
assert _OPERATOR is not None
V1 = {**VERSION_ONLY, "Authorization": f"Bearer {_OPERATOR.token}"}


def _task(
    tid: str, *, ctx: str = "c1", state: Any = TaskState.TASK_STATE_WORKING, ts: int = 0
) -> Task:
    status = TaskStatus(state=state)
    if ts:
        status.timestamp.CopyFrom(Timestamp(seconds=ts))
    return Task(id=tid, context_id=ctx, status=status)


async def _store(bus: Bus, agent: str = "keeper") -> JetStreamTaskStore:
    return await JetStreamTaskStore.open(bus, agent)


# -- the store on its own -------------------------------------------------------------------------
async def test_versions_are_compare_and_swap(bus: Bus) -> None:
    store = await _store(bus)
    v1 = await store.save(_task("t1"), prev_version=MISSING, context=ANON)
    stored = await store.get("t1", ANON)
    assert stored is not None and stored.version == v1 and not v1.is_missing
    v2 = await store.save(
        _task("t1", state=TaskState.TASK_STATE_INPUT_REQUIRED), prev_version=v1, context=ANON
    )
    assert v2.is_after(v1)
    # A writer still holding v1 lost the race: its write is refused, not applied.
    with pytest.raises(ConcurrentTaskModificationError):
        await store.save(
            _task("t1", state=TaskState.TASK_STATE_COMPLETED), prev_version=v1, context=ANON
        )
    # So is a second "first write" of the same task.
    with pytest.raises(ConcurrentTaskModificationError):
        await store.save(_task("t1"), prev_version=MISSING, context=ANON)
    stored = await store.get("t1", ANON)
    assert stored is not None and stored.version == v2
    assert stored.task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED


async def test_concurrent_first_writes_one_wins(bus: Bus) -> None:
    store = await _store(bus)
    results = await asyncio.gather(
        *(store.save(_task("race"), prev_version=MISSING, context=ANON) for _ in range(5)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, TaskVersion) for r in results) == 1
    assert sum(isinstance(r, ConcurrentTaskModificationError) for r in results) == 4


async def test_cancel_overwrites_a_running_task_but_not_a_finished_one(bus: Bus) -> None:
    store = await _store(bus)
    v1 = await store.save(_task("run"), prev_version=MISSING, context=ANON)
    await store.save(
        _task("run", state=TaskState.TASK_STATE_WORKING, ts=5), prev_version=v1, context=ANON
    )
    # Cancel from a stale version still lands (the contract: CANCELED overrides non-terminal).
    cancelled = _task("run", state=TaskState.TASK_STATE_CANCELED)
    await store.save(cancelled, prev_version=v1, context=ANON)
    stored = await store.get("run", ANON)
    assert stored is not None and stored.task.status.state == TaskState.TASK_STATE_CANCELED
    with pytest.raises(ConcurrentTaskModificationError):  # already terminal
        await store.save(cancelled, prev_version=stored.version, context=ANON)
    with pytest.raises(ConcurrentTaskModificationError):  # absent
        await store.save(
            _task("ghost", state=TaskState.TASK_STATE_CANCELED), prev_version=MISSING, context=ANON
        )


async def test_agents_and_owners_do_not_see_each_others_tasks(bus: Bus) -> None:
    ours, theirs = await _store(bus, "ours"), await _store(bus, "theirs")
    await ours.save(_task("same-id", ctx="ours"), prev_version=MISSING, context=ANON)
    await theirs.save(_task("same-id", ctx="theirs"), prev_version=MISSING, context=ANON)
    a, b = await ours.get("same-id", ANON), await theirs.get("same-id", ANON)
    assert (
        a is not None
        and b is not None
        and (a.task.context_id, b.task.context_id) == ("ours", "theirs")
    )

    alice = ServerCallContext(user=_User("alice"))
    await ours.save(_task("alices"), prev_version=MISSING, context=alice)
    assert await ours.get("alices", ANON) is None
    assert await ours.get("alices", alice) is not None
    assert [t.id for t in (await ours.list(ListTasksRequest(), alice)).tasks] == ["alices"]
    assert "alices" not in [t.id for t in (await ours.list(ListTasksRequest(), ANON)).tasks]
    await ours.delete("alices", ANON)  # not hers to delete
    assert await ours.get("alices", alice) is not None


async def test_keys_are_per_owner_under_the_agent(bus: Bus) -> None:
    """`<agent>.<owner>.<task>`: an owner's reads and listings touch its own keys only."""
    import base64

    store = await _store(bus, "keyed")
    alice, bob = (
        ServerCallContext(user=_User("acme/publisher:alice")),
        ServerCallContext(user=_User("beta/publisher:bob")),
    )
    await store.save(_task("t-a", ctx="alice"), prev_version=MISSING, context=alice)
    await store.save(_task("t-b", ctx="bob"), prev_version=MISSING, context=bob)
    await store.save(_task("t-anon"), prev_version=MISSING, context=ANON)
    token = base64.urlsafe_b64encode(b"acme/publisher:alice").decode().rstrip("=")
    keys = {k for k in await store.kv.keys() if k.startswith("keyed.")}
    assert {f"keyed.{token}.t-a", "keyed._.t-anon"} <= keys
    assert [k for k in keys if k.endswith(".t-b")] == [store.key("t-b", "beta/publisher:bob")]
    assert await store.get("t-a", bob) is None and await store.get("t-b", alice) is None
    assert [t.id for t in (await store.list(ListTasksRequest(), bob)).tasks] == ["t-b"]
    # The event stream finds the task under its owner's key.
    v1 = (await store.get("t-a", alice)).version  # type: ignore[union-attr]
    done = TaskStatusUpdateEvent(
        task_id="t-a", context_id="alice", status=TaskStatus(state=TaskState.TASK_STATE_COMPLETED)
    )
    await store.save(
        _task("t-a", ctx="alice", state=TaskState.TASK_STATE_COMPLETED),
        event=done,
        prev_version=v1,
        context=alice,
    )
    async with contextlib.aclosing(store.events().subscribe("t-a", after=v1)) as stream:
        first = await asyncio.wait_for(anext(stream), 10)
    assert isinstance(first.event, TaskStatusUpdateEvent)


class _User(User):  # type: ignore[misc]
    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def user_name(self) -> str:
        return self._name


async def test_ids_that_are_not_key_tokens_are_stored_apart(bus: Bus) -> None:
    store = await _store(bus)
    odd = ["a.b", "a b", "a*", "a", "_YQ", "ünï"]
    for tid in odd:
        await store.save(_task(tid, ctx=tid), prev_version=MISSING, context=ANON)
    for tid in odd:
        stored = await store.get(tid, ANON)
        assert stored is not None and stored.task.context_id == tid
    listed = (await store.list(ListTasksRequest(page_size=50), ANON)).tasks
    assert sorted(t.id for t in listed) == sorted(odd)


async def test_delete_removes_the_task(bus: Bus) -> None:
    store = await _store(bus)
    await store.save(_task("gone"), prev_version=MISSING, context=ANON)
    await store.delete("gone", ANON)
    assert await store.get("gone", ANON) is None
    assert (await store.list(ListTasksRequest(), ANON)).tasks == []
    await store.delete("gone", ANON)  # deleting twice is harmless
    # The id can be used again (a first write after a delete).
    await store.save(_task("gone"), prev_version=MISSING, context=ANON)
    assert await store.get("gone", ANON) is not None


async def test_delete_keeps_a_task_rewritten_since_it_was_read(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await _store(bus)
    v1 = await store.save(_task("busy"), prev_version=MISSING, context=ANON)
    stale = await store._read(store.key("busy", ""))
    await store.save(
        _task("busy", state=TaskState.TASK_STATE_COMPLETED), prev_version=v1, context=ANON
    )

    async def read_stale(key: str) -> Any:
        return stale

    monkeypatch.setattr(store, "_read", read_stale)
    await store.delete("busy", ANON)  # its revision moved on: the delete does not land
    monkeypatch.undo()
    stored = await store.get("busy", ANON)
    assert stored is not None and stored.task.status.state == TaskState.TASK_STATE_COMPLETED


async def test_list_filters_and_pages(bus: Bus) -> None:
    store = await _store(bus)
    other = await _store(bus, "other-agent")
    await other.save(_task("not-mine", ts=50), prev_version=MISSING, context=ANON)
    specs = [
        ("t1", "c1", TaskState.TASK_STATE_COMPLETED, 10),
        ("t2", "c1", TaskState.TASK_STATE_WORKING, 20),
        ("t3", "c2", TaskState.TASK_STATE_COMPLETED, 30),
        ("t4", "c2", TaskState.TASK_STATE_FAILED, 40),
        ("t5", "c1", TaskState.TASK_STATE_COMPLETED, 0),  # no timestamp: listed last
    ]
    for tid, ctx, state, ts in specs:
        await store.save(
            _task(tid, ctx=ctx, state=state, ts=ts), prev_version=MISSING, context=ANON
        )

    everything = await store.list(ListTasksRequest(), ANON)
    assert [t.id for t in everything.tasks] == ["t4", "t3", "t2", "t1", "t5"]
    assert everything.total_size == 5 and not everything.next_page_token

    by_context = await store.list(ListTasksRequest(context_id="c1"), ANON)
    assert [t.id for t in by_context.tasks] == ["t2", "t1", "t5"]
    by_state = await store.list(ListTasksRequest(status=TaskState.TASK_STATE_COMPLETED), ANON)
    assert [t.id for t in by_state.tasks] == ["t3", "t1", "t5"]
    both = await store.list(
        ListTasksRequest(context_id="c2", status=TaskState.TASK_STATE_COMPLETED), ANON
    )
    assert [t.id for t in both.tasks] == ["t3"]
    recent = ListTasksRequest()
    recent.status_timestamp_after.CopyFrom(Timestamp(seconds=20))
    assert [t.id for t in (await store.list(recent, ANON)).tasks] == ["t4", "t3", "t2"]

    pages: list[list[str]] = []
    token = ""
    while True:
        page = await store.list(ListTasksRequest(page_size=2, page_token=token), ANON)
        assert page.total_size == 5 and page.page_size == 2
        pages.append([t.id for t in page.tasks])
        token = page.next_page_token
        if not token:
            break
    assert pages == [["t4", "t3"], ["t2", "t1"], ["t5"]]
    with pytest.raises(InvalidParamsError):
        await store.list(ListTasksRequest(page_token="bm90LWEtdGFzaw"), ANON)


async def test_event_stream_replays_writes_after_a_version(bus: Bus) -> None:
    store = await _store(bus)
    events = store.events()
    v1 = await store.save(_task("ev"), prev_version=MISSING, context=ANON)
    seen: list[Any] = []

    async def follow() -> None:
        async with contextlib.aclosing(events.subscribe("ev", after=v1)) as stream:
            async for versioned in stream:
                seen.append(versioned)
                if versioned.event.status.state == TaskState.TASK_STATE_COMPLETED:
                    return

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0)
    done = TaskStatusUpdateEvent(
        task_id="ev", context_id="c1", status=TaskStatus(state=TaskState.TASK_STATE_COMPLETED)
    )
    v2 = await store.save(
        _task("ev", state=TaskState.TASK_STATE_COMPLETED), event=done, prev_version=v1, context=ANON
    )
    await asyncio.wait_for(follower, 10)
    assert [v.version for v in seen] == [v2]
    assert isinstance(seen[0].event, TaskStatusUpdateEvent)  # the event that made v2
    # A subscriber that missed versions gets the task itself in place of the lost events.
    async with contextlib.aclosing(events.subscribe("ev", after=MISSING)) as stream:
        first = await anext(stream)
    assert isinstance(first.event, Task) and first.version == v2


# -- through the SDK's request handler ------------------------------------------------------------
class _GatedExecutor(AgentExecutor):  # type: ignore[misc]
    """Works until `release` is set, then completes."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None
        task = context.current_task or new_task_from_user_message(context.message)
        await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.start_work()
        await self.release.wait()
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError


async def test_subscribe_on_another_replica_follows_the_task(bus: Bus, tmp_path: Path) -> None:
    """Cross-replica SubscribeToTask: the task runs on A, B streams it (the event stream)."""
    card = with_interfaces(
        load_card(write_card(tmp_path, "streamer", "s")), http_url=None, nats_subject="x"
    )
    a_store, b_store = await _store(bus, "streamer"), await _store(bus, "streamer")
    executor = _GatedExecutor()
    replica_a = DefaultRequestHandler(executor, a_store, card, event_stream=a_store.events())
    replica_b = DefaultRequestHandler(
        _GatedExecutor(), b_store, card, event_stream=b_store.events()
    )
    request = SendMessageRequest(
        message=Message(role=Role.ROLE_USER, message_id="m1", parts=[Part(text="go")]),
        configuration=SendMessageConfiguration(return_immediately=True),
    )
    started = await replica_a.on_message_send(request, ANON)
    assert isinstance(started, Task)
    await eventually(lambda: _state_is(b_store, started.id, TaskState.TASK_STATE_WORKING))

    seen: list[Any] = []

    async def follow() -> None:
        async for event in replica_b.on_subscribe_to_task(
            SubscribeToTaskRequest(id=started.id), ANON
        ):
            seen.append(event)

    follower = asyncio.create_task(follow())
    await eventually(lambda: _value(bool(seen)))  # B served the snapshot and is tailing
    executor.release.set()
    await asyncio.wait_for(follower, 10)  # ends by itself: the stream reached a terminal state
    assert seen[0].status.state == TaskState.TASK_STATE_WORKING
    assert seen[-1].status.state == TaskState.TASK_STATE_COMPLETED
    await replica_a.aclose()
    await replica_b.aclose()


async def _state_is(store: JetStreamTaskStore, tid: str, state: Any) -> bool:
    stored = await store.get(tid, ANON)
    return stored is not None and stored.task.status.state == state


async def _value(v: bool) -> bool:
    return v


# -- through agents (the done criterion) ----------------------------------------------------------
@contextlib.asynccontextmanager
async def _replica(agent: Agent, bus: Bus, settings: Settings) -> AsyncIterator[RunningAgent]:
    async with agent.serve(bus, settings=settings) as running:
        yield running


async def _nats(bus: Bus, subject: str, method: str, params: dict[str, Any]) -> Any:
    reply = await bus.nc.request(subject, jsonrpc(method, params), 5, headers=V1)
    return json.loads(reply.data)


async def _http(url: str, method: str, params: dict[str, Any]) -> Any:
    async with httpx.AsyncClient() as http:
        return (await http.post(url, content=jsonrpc(method, params), headers=V1)).json()


async def test_a_task_made_on_one_replica_is_read_through_another_after_it_stops(
    bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    a_agent = voting_agent(tmp_path, "pair", "pair-skill")
    b_agent = voting_agent(tmp_path, "pair", "pair-skill")
    async with contextlib.AsyncExitStack() as a_stack:
        a = await a_stack.enter_async_context(_replica(a_agent, bus, settings))
        async with _replica(b_agent, bus, settings) as b:
            assert a.registration.direct_subject != b.registration.direct_subject
            sent = await _nats(
                bus,
                a.registration.direct_subject,
                "SendMessage",
                {"message": MessageToDict(user_message(data={"vote": "reject"}))},
            )
            task = sent["result"]["task"]
            assert task["status"]["state"] == "TASK_STATE_COMPLETED"
            await a_stack.aclose()  # replica A stops: its process memory is gone

            assert b.http_url is not None
            for doc in (
                await _nats(bus, b.registration.direct_subject, "GetTask", {"id": task["id"]}),
                await _nats(bus, subjects.a2a("pair"), "GetTask", {"id": task["id"]}),
                await _http(b.http_url, "GetTask", {"id": task["id"]}),
            ):
                assert doc["result"]["id"] == task["id"]
                assert verdict_of(doc["result"]).vote == "reject"
            params = {"contextId": task["contextId"], "includeArtifacts": True}
            for doc in (
                await _nats(bus, b.registration.direct_subject, "ListTasks", params),
                await _http(b.http_url, "ListTasks", params),
            ):
                assert [t["id"] for t in doc["result"]["tasks"]] == [task["id"]]
                assert verdict_of(doc["result"]["tasks"][0]).vote == "reject"


async def test_a_task_survives_an_agent_restart(
    bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    agent = voting_agent(tmp_path, "phoenix", "rise")
    async with _replica(agent, bus, settings) as first:
        sent = await _nats(
            bus, first.subject, "SendMessage", {"message": MessageToDict(user_message(data={}))}
        )
    tid = sent["result"]["task"]["id"]
    async with _replica(agent, bus, settings) as second:
        got = await _nats(bus, second.subject, "GetTask", {"id": tid})
        assert got["result"]["status"]["state"] == "TASK_STATE_COMPLETED"
        assert verdict_of(got["result"]).vote == "approve"
        listed = await _nats(bus, second.subject, "ListTasks", {})
        assert [t["id"] for t in listed["result"]["tasks"]] == [tid]


async def test_memory_store_forgets_on_restart(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_TASK_STORE", "memory")
    settings = Settings(heartbeat_s=0.3, card_ttl_s=1.5, http_port=0)
    assert settings.task_store == "memory"
    agent = voting_agent(tmp_path, "goldfish", "forget")
    async with _replica(agent, bus, settings) as first:
        sent = await _nats(
            bus, first.subject, "SendMessage", {"message": MessageToDict(user_message(data={}))}
        )
        tid = sent["result"]["task"]["id"]
        assert "result" in await _nats(bus, first.subject, "GetTask", {"id": tid})
    async with _replica(agent, bus, settings) as second:
        got = await _nats(bus, second.subject, "GetTask", {"id": tid})
    assert got["error"]["code"] == -32001  # task not found


async def test_list_waits_for_tasks_the_server_sent_before_its_count(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load the consumer's count can reach the client before the task values the server
    had already sent (CI saw a ListTasks of five tasks say none). Here the client holds every
    value back until the count has arrived: the listing still has all five."""
    store = await _store(bus)
    for i in range(5):
        await store.save(_task(f"late{i}", ts=i + 1), prev_version=MISSING, context=ANON)

    held: list[tuple[Any, tuple[Any, ...]]] = []
    process_msg = NatsClient._process_msg
    consumer_info = JetStreamContext.PushSubscription.consumer_info

    async def holding(self: NatsClient, sid: int, subject: bytes, *rest: Any) -> None:
        if subject.startswith(f"$KV.{subjects.TASKS_BUCKET}.".encode()):
            held.append((self, (sid, subject, *rest)))
            return
        await process_msg(self, sid, subject, *rest)

    async def release() -> None:
        while held:
            client, args = held.pop(0)
            await process_msg(client, *args)

    releasing: list[asyncio.Task[None]] = []

    async def counted_then_released(self: JetStreamContext.PushSubscription) -> Any:
        async def all_sent() -> Any:  # the server has sent every value: none left pending
            info = await consumer_info(self)
            return info if not info.num_pending else None

        info = await eventually(all_sent, "the server sends the listed values")
        releasing.append(asyncio.create_task(release()))  # only once the count is in hand
        return info

    monkeypatch.setattr(NatsClient, "_process_msg", holding)
    monkeypatch.setattr(JetStreamContext.PushSubscription, "consumer_info", counted_then_released)
    listed = await store.list(ListTasksRequest(), ANON)
    assert [t.id for t in listed.tasks] == [f"late{i}" for i in reversed(range(5))]
    await asyncio.gather(*releasing)
