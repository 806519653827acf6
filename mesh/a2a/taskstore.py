"""A2A tasks in JetStream: every replica of an agent reads and writes the same tasks.

`JetStreamTaskStore` implements a2a-sdk's cluster contract (`VersionedTaskStore`) on the KV
bucket `mesh_tasks`:

* key `<agent>.<owner>.<task id>`: replicas of one agent share their tasks, different agents
  never collide, and every read is pinned to the agent's own keys (`<agent>.>`, the only ones
  the agent's NATS identity may touch). `<owner>` is the caller the SDK's stores scope tasks
  by (`context.user.user_name`, via an `OwnerResolver`: `<tenant>/<role>:<name>` for an
  authenticated caller, mesh.a2a.auth), base64url-encoded (`_` for the anonymous caller of an
  agent without authentication): GetTask reads the caller's own key only and ListTasks lists
  the caller's own keys only, so another's task is not there to find. Task ids are UUIDs and
  are used as they are; any other id is encoded (`_key_token`).
* value: one JSON record `{"owner", "prev", "task", "event"}` — the task and the event that
  produced it as protobuf JSON (readable with `nats kv get mesh_tasks <key>`), the owner (again,
  checked on every read) and the revision this write replaced.
* version: the KV revision. `save` is a compare-and-swap (`kv.create` for a first write,
  `kv.update(last=revision)` after), so a write from a stale version raises
  `ConcurrentTaskModificationError`; a write to CANCELED overwrites any non-terminal task, as
  the contract asks.
* `list` reads the caller's keys (one ordered consumer on `<agent>.<owner>.*`, last value per
  key), then filters, sorts and pages exactly like the SDK's `InMemoryTaskStore` (same cursor
  tokens).

`JetStreamTaskEventStream` is the matching `TaskEventStream` (cross-replica SubscribeToTask):
each write already carries its event, so subscribing is a KV watch on the task's key and
publishing is a no-op (as in the SDK's `DatabaseTaskEventStream`). When the watch skipped a
revision (the bucket keeps one per key), the task itself is sent in place of the lost events.

Limits: a task record must fit in one NATS message (max_payload, 1 MiB by default); the bucket
TTL (`MESH_TASK_TTL_S`) drops tasks not written for that long; `list` reads every task the
caller has at the agent (fine for thousands, not for millions).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import msgspec
from a2a.server.cluster import (
    ConcurrentTaskModificationError,
    StoredTask,
    TaskEventStream,
    TaskVersion,
    VersionedEvent,
    VersionedTaskStore,
)
from a2a.server.context import ServerCallContext
from a2a.server.owner_resolver import OwnerResolver, resolve_user_scope
from a2a.types import ListTasksRequest, ListTasksResponse, StreamResponse, Task, TaskState
from a2a.utils.constants import DEFAULT_LIST_TASKS_PAGE_SIZE
from a2a.utils.errors import InvalidParamsError
from a2a.utils.proto_utils import to_stream_response
from a2a.utils.task import (
    ListTasksCursor,
    decode_list_tasks_cursor,
    decode_page_token,
    encode_list_tasks_cursor,
)
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from mesh import subjects
from mesh.bus import Bus

log = logging.getLogger(__name__)

TERMINAL_STATES = frozenset(
    {
        TaskState.TASK_STATE_COMPLETED,
        TaskState.TASK_STATE_CANCELED,
        TaskState.TASK_STATE_FAILED,
        TaskState.TASK_STATE_REJECTED,
    }
)

_PLAIN_ID = re.compile(r"^[A-Za-z0-9-]+$")
_CANCEL_ATTEMPTS = 10
_LIST_WAIT_S = 10.0  # the longest pause between two entries while listing
_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's "wrong last sequence" error codes


def _owner_token(owner: str) -> str:
    """A KV key token for an owner: base64url, or `_` for the empty (anonymous) owner — which no
    encoding of a non-empty owner can be (those are 2 characters or more)."""
    if not owner:
        return "_"
    return base64.urlsafe_b64encode(owner.encode()).decode().rstrip("=")


def _key_token(task_id: str) -> str:
    """A KV key token for `task_id`: ids of letters, digits and '-' (UUIDs) as they are, any
    other as '_' + base64url. Plain ids have no '_', so the mapping is one to one."""
    if _PLAIN_ID.match(task_id):
        return task_id
    encoded = base64.urlsafe_b64encode(task_id.encode()).decode().rstrip("=")
    return f"_{encoded}"


class KvRevision(TaskVersion):  # type: ignore[misc]
    """A task version that is a KV revision. a2a-sdk's `TaskVersion` keeps its value private;
    the store reads back only versions it made itself, so it keeps the revision in the open."""

    def __init__(self, revision: int) -> None:
        super().__init__(revision)
        self.revision = revision


def _revision(version: TaskVersion) -> int:
    if isinstance(version, KvRevision):
        return version.revision
    if version.is_missing:
        return 0
    raise TypeError(f"JetStreamTaskStore versions are KV revisions, not {version!r}")


_encoder = msgspec.json.Encoder()


class _Record:
    """One stored task: what the KV value holds."""

    __slots__ = ("event", "owner", "prev", "task", "task_json")

    def __init__(
        self,
        task: Task,
        owner: str,
        prev: int,
        event: Any = None,
        task_json: dict[str, Any] | None = None,
    ) -> None:
        self.task = task
        self.owner = owner
        self.prev = prev  # the revision this write replaced (0: none)
        self.event = event  # Task | Message | TaskStatusUpdateEvent | TaskArtifactUpdateEvent
        self.task_json = task_json  # MessageToDict(task), when the writer has it already

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "owner": self.owner,
            "prev": self.prev,
            "task": self.task_json if self.task_json is not None else MessageToDict(self.task),
        }
        if self.event is not None:
            doc["event"] = MessageToDict(to_stream_response(self.event))
        # msgspec, not json.dumps: the stdlib encoder was ~15 % of a vote's CPU (bench/README.md);
        # the same JSON but for non-ASCII text, written as UTF-8 rather than escaped.
        return _encoder.encode(doc)

    @classmethod
    def decode(cls, value: bytes, *, key: str) -> _Record | None:
        try:
            doc = json.loads(value)
            task: Task = ParseDict(doc["task"], Task(), ignore_unknown_fields=True)
            event = None
            if "event" in doc:
                response = ParseDict(doc["event"], StreamResponse(), ignore_unknown_fields=True)
                which = response.WhichOneof("payload")
                event = getattr(response, which) if which else None
            return cls(task, str(doc.get("owner", "")), int(doc.get("prev", 0)), event)
        except (ValueError, TypeError, KeyError, ParseError) as e:
            log.warning("task store: ignoring %s, its value does not decode: %s", key, e)
            return None


_Records = list[_Record]  # (`list` is a method name in the store's class body)


class JetStreamTaskStore(VersionedTaskStore):  # type: ignore[misc]
    """The tasks of one agent (all its replicas) in the `mesh_tasks` KV bucket."""

    def __init__(
        self,
        kv: KeyValue,
        agent: str,
        *,
        owner_resolver: OwnerResolver = resolve_user_scope,
    ) -> None:
        if not subjects.valid_token(agent):
            raise ValueError(f"agent name {agent!r} cannot be a key token")
        self.kv = kv
        self.agent = agent
        self.owner_resolver = owner_resolver

    @classmethod
    async def open(
        cls, bus: Bus, agent: str, *, owner_resolver: OwnerResolver = resolve_user_scope
    ) -> JetStreamTaskStore:
        """The store for `agent`, creating the bucket if it is not there yet."""
        ttl = bus.settings.task_ttl_s or None
        kv = await bus.kv(subjects.TASKS_BUCKET, ttl_s=ttl, history=1)
        return cls(kv, agent, owner_resolver=owner_resolver)

    def key(self, task_id: str, owner: str) -> str:
        """`<agent>.<owner>.<task id>`, each token encoded for a key."""
        return f"{self.agent}.{_owner_token(owner)}.{_key_token(task_id)}"

    def _owned(self, task_id: str, context: ServerCallContext) -> tuple[str, str]:
        """(owner, key) of `task_id` for the caller of `context`."""
        owner = self.owner_resolver(context)
        return owner, self.key(task_id, owner)

    def events(self) -> JetStreamTaskEventStream:
        """The cross-replica event stream over this store (for SubscribeToTask)."""
        return JetStreamTaskEventStream(self)

    # -- VersionedTaskStore ---------------------------------------------------------------------
    async def save(
        self,
        task: Task,
        *,
        event: Any = None,
        prev: Task | None = None,
        prev_version: TaskVersion,
        context: ServerCallContext,
    ) -> TaskVersion:
        del prev
        owner, key = self._owned(task.id, context)
        if task.status.state == TaskState.TASK_STATE_CANCELED:
            return await self._save_cancel(key, task, event, owner)
        if prev_version.is_missing:
            value = _Record(task, owner, 0, event).encode()
            try:
                return KvRevision(await self.kv.create(key, value))
            except KeyWrongLastSequenceError:
                raise ConcurrentTaskModificationError(task.id) from None
        last = _revision(prev_version)
        value = _Record(task, owner, last, event).encode()
        try:
            return KvRevision(await self.kv.update(key, value, last=last))
        except KeyWrongLastSequenceError:
            raise ConcurrentTaskModificationError(task.id) from None

    async def create(
        self, task: Task, task_json: dict[str, Any], context: ServerCallContext
    ) -> TaskVersion:
        """`save` of a new task with no event (the lean SendMessage's one write: mesh.a2a.lean),
        given its JSON (`MessageToDict(task)`) already made for the reply."""
        owner, key = self._owned(task.id, context)
        value = _Record(task, owner, 0, task_json=task_json).encode()
        try:
            return KvRevision(await self.kv.create(key, value))
        except KeyWrongLastSequenceError:
            raise ConcurrentTaskModificationError(task.id) from None

    async def _save_cancel(self, key: str, task: Task, event: Any, owner: str) -> TaskVersion:
        """CANCELED overwrites a non-terminal task whatever its version; a terminal or absent
        one raises. The overwrite is still a CAS on what was just read, retried if it races."""
        for _ in range(_CANCEL_ATTEMPTS):
            current = await self._read(key)
            if current is None:
                break
            record, revision = current
            if record.owner != owner or record.task.status.state in TERMINAL_STATES:
                break
            value = _Record(task, owner, revision, event).encode()
            try:
                return KvRevision(await self.kv.update(key, value, last=revision))
            except KeyWrongLastSequenceError:
                continue
        raise ConcurrentTaskModificationError(task.id)

    async def get(self, task_id: str, context: ServerCallContext) -> StoredTask | None:
        owner, key = self._owned(task_id, context)
        current = await self._read(key)
        if current is None or current[0].owner != owner:
            return None  # another owner's task is not found, as in the SDK's stores
        return StoredTask(current[0].task, KvRevision(current[1]))

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        owner, key = self._owned(task_id, context)
        current = await self._read(key)
        if current is None or current[0].owner != owner:
            log.debug("task store: no task %s to delete", key)
            return
        try:
            await self.kv.delete(key, last=current[1])
        except APIError as e:  # rewritten since it was read: the newer task is kept
            if e.err_code not in _WRONG_LAST_SEQUENCE:
                raise
            log.debug("task store: %s changed before it could be deleted; kept", key)

    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        owner = self.owner_resolver(context)
        tasks = [r.task for r in await self._records(owner) if r.owner == owner]
        if params.context_id:
            tasks = [t for t in tasks if t.context_id == params.context_id]
        if params.status:
            tasks = [t for t in tasks if t.status.state == params.status]
        if params.HasField("status_timestamp_after"):
            after_ns = params.status_timestamp_after.ToNanoseconds()
            tasks = [
                t
                for t in tasks
                if t.status.HasField("timestamp") and t.status.timestamp.ToNanoseconds() >= after_ns
            ]
        tasks.sort(key=_sort_key, reverse=True)
        total = len(tasks)
        start = _start_index(tasks, params.page_token) if params.page_token else 0
        page_size = params.page_size or DEFAULT_LIST_TASKS_PAGE_SIZE
        end = start + page_size
        next_token = encode_list_tasks_cursor(_cursor(tasks[end - 1])) if end < total else None
        return ListTasksResponse(
            tasks=tasks[start:end],
            next_page_token=next_token,
            total_size=total,
            page_size=page_size,
        )

    # -- reading --------------------------------------------------------------------------------
    async def _read(self, key: str) -> tuple[_Record, int] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        if not entry.value or entry.revision is None:
            return None
        record = _Record.decode(entry.value, key=key)
        return None if record is None else (record, entry.revision)

    async def _records(self, owner: str) -> _Records:
        """The latest record of every task `owner` has at this agent: one ordered consumer,
        filtered to the owner's keys, delivering the last value of each.

        Not `KeyValue.watch`: its "no more values" marker comes from comparing the consumer's
        pending count with the messages the client has parsed, and under load the server's
        answer overtakes messages it already sent, so a listing could end before its first
        task (seen in CI: a ListTasks of five tasks said none). The end here is the server's own
        count: what the consumer had delivered plus what it had pending when asked; then the
        message after which nothing is pending."""
        js, stream = self.kv._js, self.kv._stream  # (nats-py keeps them private; watch uses them)
        arrived: asyncio.Queue[Msg] = asyncio.Queue()

        async def take(msg: Msg) -> None:
            arrived.put_nowait(msg)

        sub = await js.subscribe(
            f"{self.kv._pre}{self.agent}.{_owner_token(owner)}.*",
            stream=stream,
            cb=take,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=60.0,  # cleans up after a reader that died mid-list
        )
        out: _Records = []
        try:
            info = await sub.consumer_info()
            delivered = info.delivered.consumer_seq if info.delivered else 0
            if not (delivered or 0) + (info.num_pending or 0):
                return out
            while True:
                async with asyncio.timeout(_LIST_WAIT_S):
                    msg = await arrived.get()
                if msg.data and not _kv_marker(msg):
                    record = _Record.decode(msg.data, key=msg.subject)
                    if record is not None:
                        out.append(record)
                if not msg.metadata.num_pending:
                    return out
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def _kv_marker(msg: Msg) -> bool:
    """Whether `msg` is a KV delete or purge (or a server's expiry marker), not a value."""
    headers = msg.headers or {}
    return "KV-Operation" in headers or "Nats-Marker-Reason" in headers


def _sort_key(task: Task) -> tuple[bool, int, str]:
    """ListTasks order (as the SDK's stores): (has timestamp, timestamp, id), descending."""
    stamped = task.HasField("status") and task.status.HasField("timestamp")
    return (stamped, task.status.timestamp.ToNanoseconds() if stamped else 0, task.id)


def _cursor(task: Task) -> ListTasksCursor:
    stamped, ns, task_id = _sort_key(task)
    return ListTasksCursor(timestamp_ns=ns if stamped else None, task_id=task_id)


def _start_index(tasks: Sequence[Task], page_token: str) -> int:
    cursor = decode_list_tasks_cursor(page_token)
    if cursor is None:  # a legacy token names the first task of the page
        first = decode_page_token(page_token)
        for i, task in enumerate(tasks):
            if task.id == first:
                return i
        raise InvalidParamsError(f"Invalid page token: {page_token}")
    after = cursor.sort_key()
    return next((i for i, t in enumerate(tasks) if _sort_key(t) < after), len(tasks))


class JetStreamTaskEventStream(TaskEventStream):  # type: ignore[misc]
    """Task events across replicas, read from the task store's own writes (a KV watch)."""

    def __init__(self, store: JetStreamTaskStore) -> None:
        self.store = store

    async def publish(self, task_id: str, event: VersionedEvent) -> None:
        """No-op: `JetStreamTaskStore.save` stores each event with the task it produced."""
        del task_id, event

    async def subscribe(  # type: ignore[override]
        self, task_id: str, *, after: TaskVersion
    ) -> AsyncGenerator[VersionedEvent, None]:
        """Events of `task_id` written after `after`, until the task is deleted.

        The SDK asks only after reading the task as its caller (so the caller owns it), but
        does not say who that is: the watch is on the task id under any owner of this agent,
        and keeps to the first key it sees (task ids are the agent's UUIDs: one key per id)."""
        store = self.store
        pattern = f"{store.agent}.*.{_key_token(task_id)}"
        key: str | None = None
        last = 0 if after.is_missing else _revision(after)
        watcher = await store.kv.watch(pattern)
        try:
            async for entry in watcher:
                if entry is None or entry.revision is None:
                    continue  # the end-of-initial-values marker
                key = key or entry.key
                if entry.key != key:
                    continue
                if entry.operation is not None or not entry.value:
                    return  # deleted or purged: nothing more will come
                revision = entry.revision
                if revision <= last:
                    continue  # the caller has this state already
                record = _Record.decode(entry.value, key=key)
                if record is None:
                    continue
                # A revision in between was not seen: the task stands in for the lost events.
                in_order = record.prev == last and record.event is not None
                event = record.event if in_order else record.task
                last = revision
                yield VersionedEvent(event=event, version=KvRevision(revision))
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def destroy(self, task_id: str) -> None:
        """No-op: a subscriber stops at a terminal event; the task stays until its TTL."""
        del task_id
