"""Every name the mesh puts on the wire, in one place: subjects, streams, buckets, keys,
headers, durable consumers, queue groups and message-id formats."""

from __future__ import annotations

import re
from typing import Literal

# Streams and buckets
EVENTS_STREAM = "MESH_EVENTS"
DECISIONS_STREAM = "MESH_DECISIONS"
DLQ_STREAM = "MESH_DLQ"
AUDIT_STREAM = "MESH_AUDIT"
CARDS_BUCKET = "mesh_cards"
TASKS_BUCKET = "mesh_tasks"  # A2A tasks, key <agent>.<owner>.<task id> (mesh.a2a.taskstore)
DECISIONS_BUCKET = "mesh_decisions"
# Object store of dead-lettered bodies too large to sit base64'd in a DLQ record; the object's
# name is the body's SHA-256 (hex), so a body is kept once however often it is dead-lettered.
DLQ_BODIES_BUCKET = "mesh_dlq_bodies"
# Budget use (mesh.budget): `evt.<tenant>.<event token>` (what an event's calls spent) and
# `day.<tenant>.<YYYY-MM-DD>` (a tenant's cost that UTC day), `conc.<tenant>.<slot>` (a model call
# in flight, a lease); agents write, `mesh budgets` reads.
BUDGETS_BUCKET = "mesh_budgets"
# Canary and shadow candidates' counts and state (coordinator.canary), key `<agent>.<hash>`.
CANARIES_BUCKET = "mesh_canaries"
CHECKPOINTS_STREAM = "MESH_CHECKPOINTS"  # signed audit checkpoints, kept apart from MESH_AUDIT
TRACE_STREAM = "MESH_TRACES"  # spans kept for `mesh trace` when MESH_TRACE_STREAM is on

# Subject roots
EVENTS_ROOT = "mesh.evt"
DECISIONS_ROOT = "mesh.decision"
DLQ_ROOT = "mesh.dlq"
AUDIT_ROOT = "mesh.audit"
CHECKPOINT_ROOT = "mesh.checkpoint"  # mesh.checkpoint.<tenant>
A2A_ROOT = "mesh.a2a"
APPROVALS_AGENT = "approvals"  # the approval inbox as an A2A agent (coordinator.approval_tasks)
TRACE_ROOT = "mesh.trace"  # mesh.trace.<trace id>
ALERT_ROOT = "mesh.alert"  # mesh.alert.<tenant>.<kind>: core NATS, for whoever listens
COORDINATOR_STATUS = "mesh.status.coordinator"  # every coordinator answers (no queue group)

# Durable consumer of the coordinator (shared by every coordinator instance)
COORDINATOR_DURABLE = "coordinator"

# Headers
H_MSG_ID = "Nats-Msg-Id"
H_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
H_EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
H_A2A_VERSION = "A2A-Version"
H_TRACEPARENT = "traceparent"
H_TENANT = "Mesh-Tenant"
H_EVENT_TYPE = "Mesh-Event-Type"
# `<key id>:<signature>`: the publisher's Ed25519 signature (purpose "event") over
# `<subject>\0<body>`; the principal a decision records is the trusted key that made it.
H_SIGNATURE = "Mesh-Signature"
# A2A over NATS carries the caller's bearer token as HTTP does (`Bearer <token>`): NATS headers
# are not identity by themselves, the token's signature is.
H_AUTHORIZATION = "Authorization"

# NATS binding of A2A: a caller that sends `Mesh-Progress: <seconds>` gets empty keep-alive
# frames with `Mesh-Status: working` on its reply inbox while the agent works.
H_PROGRESS = "Mesh-Progress"
H_STATUS = "Mesh-Status"
STATUS_WORKING = "working"
# Streaming methods (SendStreamingMessage, SubscribeToTask) answer with several messages on the
# reply inbox: `Mesh-Stream: frame` (one JSON-RPC response each), then an empty `Mesh-Stream: end`.
# A caller that stops listening early publishes `Mesh-Stream: cancel` to `<reply inbox>.cancel`.
H_STREAM = "Mesh-Stream"
STREAM_FRAME = "frame"
STREAM_END = "end"
STREAM_CANCEL = "cancel"

A2A_VERSION = "1.0"

# A token is what may sit between two dots of a subject: no wildcards, no whitespace.
_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$")
_TYPE = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


def valid_token(value: str) -> bool:
    return bool(_TOKEN.match(value))


def valid_event_type(value: str) -> bool:
    return bool(_TYPE.match(value))


def event(tenant: str, event_type: str) -> str:
    """`mesh.evt.<tenant>.<type>`; the type keeps its dots (release.proposed)."""
    return f"{EVENTS_ROOT}.{tenant}.{event_type}"


def events_filter() -> str:
    return f"{EVENTS_ROOT}.>"


def trace(trace_id: str) -> str:
    """`mesh.trace.<trace id>`: the spans of one trace (MESH_TRACES)."""
    return f"{TRACE_ROOT}.{trace_id}"


def kv_stream(bucket: str) -> str:
    """The stream behind a JetStream KV bucket (JetStream's own naming)."""
    return f"KV_{bucket}"


def obj_stream(bucket: str) -> str:
    """The stream behind a JetStream object store bucket (JetStream's own naming)."""
    return f"OBJ_{bucket}"


def obj_subjects(bucket: str) -> str:
    """Every subject of an object store bucket (chunks `$O.<b>.C.*`, metadata `$O.<b>.M.*`)."""
    return f"$O.{bucket}.>"


def matches(filter_subject: str, subject: str) -> bool:
    """Whether NATS would deliver `subject` to a consumer filtered on `filter_subject`
    (`*` is one token, a final `>` one or more)."""
    want, have = filter_subject.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def card_key(agent: str, instance: str) -> str:
    """Key of one agent instance's card in the `mesh_cards` bucket."""
    return f"{agent}.{instance}"


def event_msg_id(tenant: str, event_id: str, tag: str = "") -> str:
    """`Nats-Msg-Id` of a published event: the stream's duplicate window drops a re-publish (the
    same id in two tenants is two events).

    `<tenant>~<tag>:<event id>` when the publisher has a key, `tag` being its keyed digest of
    tenant and id (`Signer.tag`, via `event_msg_tag`). JetStream de-duplicates ids per stream,
    not per subject, so with a bare `<tenant>:<event id>` a publisher of tenant A could publish
    first under B's next id and have the server drop B's event as a duplicate; nobody but B's
    publisher can compute B's tag. Without a key (insecure bus, foreign producers) it is
    `<tenant>:<event id>`."""
    return f"{tenant}~{tag}:{event_id}" if tag else f"{tenant}:{event_id}"


def event_msg_tag_payload(tenant: str, event_id: str) -> bytes:
    """What a publisher's `Signer.tag` covers for an event's message id."""
    return f"event-msg-id\0{tenant}\0{event_id}".encode()


def decision(tenant: str, decision_type: str, event_token: str) -> str:
    """`mesh.decision.<tenant>.<decision type>.<event>`: one subject per event, so the server
    itself can refuse a second decision (Nats-Expected-Last-Subject-Sequence: 0)."""
    return f"{DECISIONS_ROOT}.{tenant}.{decision_type}.{event_token}"


def dlq(tenant: str, reason: str) -> str:
    return f"{DLQ_ROOT}.{tenant}.{reason}"


def a2a(agent: str) -> str:
    """An agent's subject; its replicas share it in a queue group named after the agent."""
    return f"{A2A_ROOT}.{agent}"


def a2a_instance(agent: str, instance: str) -> str:
    """One replica's own subject, so a caller can steer around a replica that is failing."""
    return f"{A2A_ROOT}.{agent}.{instance}"


def parse_event_subject(subject: str) -> tuple[str, str]:
    """(tenant, type) from `mesh.evt.<tenant>.<type...>`; ('', '') if it is not one."""
    parts = subject.split(".", 3)
    if len(parts) < 4 or f"{parts[0]}.{parts[1]}" != EVENTS_ROOT:
        return "", ""
    return parts[2], parts[3]


# -- A2A over NATS: how a card names a NATS interface; headers of the binding
# A card's NATS interface (binding `NATS+JSONRPC`, mesh.cards.NATS_BINDING) has the url
# `nats:<subject>`: it names a subject, not a server.
A2A_NATS_URL_SCHEME = "nats:"
H_A2A_EXTENSIONS = "A2A-Extensions"  # comma-separated extension URIs a caller uses
H_CONTENT_TYPE = "Content-Type"
# nats-py's "no responders" answer: an empty message with `Status: 503`.
H_NATS_STATUS = "Status"
NATS_NO_RESPONDERS = "503"


def a2a_nats_url(subject: str) -> str:
    """The url of a card's NATS interface for `subject`."""
    return f"{A2A_NATS_URL_SCHEME}{subject}"


def a2a_subject_of_url(url: str) -> str | None:
    """The subject a card's NATS interface url names; None if it is not a `nats:` url."""
    if not url.startswith(A2A_NATS_URL_SCHEME):
        return None
    return url[len(A2A_NATS_URL_SCHEME) :] or None


# -- message ids (Nats-Msg-Id: a re-publish after a crash or redelivery is a no-op), keys,
# durable consumers and queue groups


def event_id_of_msg_id(tenant: str, msg_id: str) -> str:
    """The producer's event id inside an event's message id (the inverse of `event_msg_id`)."""
    tagged = f"{tenant}~"
    if (
        msg_id.startswith(tagged)
        and msg_id[len(tagged) + _TAG_LEN : len(tagged) + _TAG_LEN + 1] == ":"
    ):
        return msg_id[len(tagged) + _TAG_LEN + 1 :]
    return msg_id.removeprefix(f"{tenant}:")


_TAG_LEN = 22  # base64url of 16 bytes, no padding (`Signer.tag`)


def budget_event_key(tenant: str, event_token: str) -> str:
    return f"evt.{tenant}.{event_token}"


def budget_day_key(tenant: str, day: str) -> str:
    return f"day.{tenant}.{day}"


def budget_slot_key(tenant: str, slot: int) -> str:
    """One of a tenant's model-call slots (mesh.budget: its `concurrent_calls`, mesh-wide)."""
    return f"conc.{tenant}.{slot}"


# A2A message metadata of a call's context: what is left of its budget (mesh.budget.Budget as
# JSON) and how many delegations deep it is (mesh.delegate).
META_BUDGET = "meshBudget"
META_HOPS = "meshHops"


def decision_key(tenant: str, event_token: str) -> str:
    """`<tenant>.<event token>`: an event's key in DECISIONS_BUCKET, and the reference its
    decision, dead letter and audit records share."""
    return f"{tenant}.{event_token}"


def decision_msg_id(tenant: str, event_token: str) -> str:
    return f"decision:{decision_key(tenant, event_token)}"


def dlq_msg_id(stream: str, stream_seq: int, consumer: str | None = None) -> str:
    """`dlq:<stream>:<seq>` for what the coordinator dead-letters itself; with `:<consumer>`
    for a consumer's give-up advisory (another consumer's give-up is another record)."""
    base = f"dlq:{stream}:{stream_seq}"
    return f"{base}:{consumer}" if consumer else base


def replay_msg_id(dlq_seq: int, nonce: str) -> str:
    """A replay's message id: new every time, so the stream's duplicate window keeps none."""
    return f"replay:{dlq_seq}:{nonce}"


def audit_msg_id(record: Literal["decision", "vote", "dlq", "forbidden"], *parts: str | int) -> str:
    """An audit record's message id, so auditing again after a crash is a no-op:
    `audit:decision:<ref>`, `audit:vote:<ref>:<skill>`, `audit:dlq:<stream>:<seq>`."""
    return ":".join(["audit", record, *map(str, parts)])


def checkpoint(tenant: str) -> str:
    """`mesh.checkpoint.<tenant>`: the signed checkpoints of one tenant's audit chain."""
    return f"{CHECKPOINT_ROOT}.{tenant}"


def alert(tenant: str, kind: str) -> str:
    """`mesh.alert.<tenant>.<kind>` (e.g. `canary_stopped`); `alert("*", ">")` all of them."""
    return f"{ALERT_ROOT}.{tenant}.{kind}"


def audit(tenant: str, kind: str) -> str:
    """`mesh.audit.<tenant>.<kind>`; `audit(tenant, "*")` is the tenant's whole chain."""
    return f"{AUDIT_ROOT}.{tenant}.{kind}"


# Output events of an event handler get uuid5 ids in this namespace, so the same inputs always
# give the same id (and a redelivery's re-publish is deduplicated).
OUTPUT_EVENT_NAMESPACE = "6f1d6c0e-8a63-4d2b-9a6c-3f0e6b1f5a10"


def output_event_key(
    tenant: str, event_id: str, handler_key: str, event_type: str, index: int
) -> str:
    """What an output event's uuid5 is computed from (`EventContext.output_id`)."""
    return f"{tenant}/{event_id}/{handler_key}/{event_type}/{index}"


def vote_message_id(tenant: str, event_id: str, skill: str) -> str:
    """The A2A `messageId` of the coordinator's question to a voter: the same on every retry and
    after a take-over, so the agent answers a repeat with the task it already has."""
    return f"{tenant}/{event_id}/{skill}"


def agent_event_durable(agent: str, handler: str) -> str:
    """The durable pull consumer an event handler shares with its agent's replicas."""
    return f"agent-{agent}-{handler}"


# JetStream's own subjects (default JetStream context: no domain, no custom API prefix).
JS_API = "$JS.API"
# The error codes of a publish whose "expected last subject sequence" did not hold: 10071 for a
# subject, 10164 when the check names a subject filter (seen in leader elections on a cluster).
JS_WRONG_LAST_SEQUENCE = (10071, 10164)
JS_CONSUMER_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER"
DLQ_QUEUE_GROUP = "mesh-dlq"  # every coordinator's advisory listener; each advisory goes to one
DLQ_SCAN_PREFIX = "mesh-dlq-scan-"  # short-lived consumers of `mesh dlq ls --reason`
# Headers that are publish-time instructions to JetStream, not part of a message: a replay of a
# dead letter must not carry them (lower-case prefixes; an old expected-sequence would fail it).
JS_PUBLISH_HEADER_PREFIXES = ("nats-msg-id", "nats-expected-")


def max_deliveries_advisory(stream: str, consumer: str = "*") -> str:
    return f"{JS_CONSUMER_ADVISORY}.MAX_DELIVERIES.{stream}.{consumer}"


def terminated_advisory(stream: str, consumer: str = "*") -> str:
    return f"{JS_CONSUMER_ADVISORY}.MSG_TERMINATED.{stream}.{consumer}"


def is_terminated_advisory(subject: str) -> bool:
    return subject.startswith(f"{JS_CONSUMER_ADVISORY}.MSG_TERMINATED.")


def stream_purge_api(stream: str) -> str:
    return f"{JS_API}.STREAM.PURGE.{stream}"


# -- schedules (mesh.schedules): definitions and their firings share one stream, as NATS message
# scheduling requires (a schedule's target must be a subject of its own stream)
SCHEDULES_STREAM = "MESH_SCHEDULES"
SCHEDULE_ROOT = "mesh.sched"
SCHEDULE_DEF_ROOT = f"{SCHEDULE_ROOT}.def"  # mesh.sched.def.<tenant>.<name>: one schedule each
SCHEDULE_FIRE_ROOT = f"{SCHEDULE_ROOT}.fire"  # mesh.sched.fire.<tenant>.<name>: the server's copies
SCHEDULE_RELAY_DURABLE = "schedule-relay"  # turns firings into events; shared by every relay
# ADR-51 headers: on a definition, and (Nats-Scheduler) on what the server publishes from it.
H_SCHEDULE = "Nats-Schedule"
H_SCHEDULE_TARGET = "Nats-Schedule-Target"
H_SCHEDULE_TIME_ZONE = "Nats-Schedule-Time-Zone"
H_SCHEDULER = "Nats-Scheduler"
H_SCHEDULE_NEXT = "Nats-Schedule-Next"


def schedule_def(tenant: str, name: str) -> str:
    return f"{SCHEDULE_DEF_ROOT}.{tenant}.{name}"


def schedule_fire(tenant: str, name: str) -> str:
    return f"{SCHEDULE_FIRE_ROOT}.{tenant}.{name}"


# -- approvals (mesh.approvals): people in the quorum ---------------------------------------------
# One stream per mesh: per tenant T, `mesh.approval.T.req.<id>` (the coordinator's requests, a
# new message per escalation and a closing one), `mesh.approval.T.vote.<id>` (a person's signed
# answer) and `mesh.approval.T.receipt.<id>` (the coordinator's accepted/refused). A request id is
# `<event token>.<role>`: two subject tokens.
APPROVALS_STREAM = "MESH_APPROVALS"
APPROVALS_ROOT = "mesh.approval"
APPROVALS_DURABLE = "coordinator-approvals"  # the coordinators' timers and answers, shared
APPROVAL_KINDS = ("req", "vote", "receipt")


def approval(tenant: str, kind: Literal["req", "vote", "receipt"], request_id: str) -> str:
    """`mesh.approval.<tenant>.<kind>.<event token>.<role>`."""
    return f"{APPROVALS_ROOT}.{tenant}.{kind}.{request_id}"


def approvals_filter(tenant: str = "*", kind: str = "*") -> str:
    return f"{APPROVALS_ROOT}.{tenant}.{kind}.>"


def parse_approval_subject(subject: str) -> tuple[str, str, str]:
    """(tenant, kind, request id) of an approvals subject; ValueError if it is not one."""
    parts = subject.split(".")
    if len(parts) != 6 or ".".join(parts[:2]) != APPROVALS_ROOT or parts[3] not in APPROVAL_KINDS:
        raise ValueError(f"{subject!r} is not an approvals subject")
    return parts[2], parts[3], f"{parts[4]}.{parts[5]}"


def approval_msg_id(tenant: str, request_id: str, what: str, tag: str = "") -> str:
    """`approval:<tenant>.<id>:<what>` (a request's round or `closed`, a vote's digest).

    `MESH_APPROVALS` de-duplicates ids per stream, not per subject, so a predictable id could
    be taken first by anyone who may publish on the stream (a person of another tenant, on
    their own vote subject) and the server would drop the real message as a duplicate. So a
    request's id carries `tag`, the coordinator's keyed digest of it (`Signer.tag` over
    `approval_msg_tag_payload`): `approval:<tenant>~<tag>.<id>:<what>`; a vote's `what` is the
    digest of the signed vote itself (`mesh.approvals.vote_digest`), which nobody can know
    before the vote exists."""
    return (
        f"approval:{tenant}~{tag}.{request_id}:{what}"
        if tag
        else f"approval:{tenant}.{request_id}:{what}"
    )


def approval_msg_tag_payload(tenant: str, request_id: str, what: str) -> bytes:
    """What a coordinator's `Signer.tag` covers for an approval request's message id."""
    return f"approval-msg-id\0{tenant}\0{request_id}\0{what}".encode()
