"""Every name the mesh puts on the wire, in one place: subjects, streams, buckets, keys,
headers, durable consumers, queue groups and message-id formats."""

from __future__ import annotations

import re

# Streams and buckets
EVENTS_STREAM = "MESH_EVENTS"
DECISIONS_STREAM = "MESH_DECISIONS"
DLQ_STREAM = "MESH_DLQ"
AUDIT_STREAM = "MESH_AUDIT"
CARDS_BUCKET = "mesh_cards"
TASKS_BUCKET = "mesh_tasks"  # A2A tasks, key <agent>.<task id> (mesh.a2a.taskstore)
DECISIONS_BUCKET = "mesh_decisions"
TRACE_STREAM = "MESH_TRACES"  # spans kept for `mesh trace` when MESH_TRACE_STREAM is on

# Subject roots
EVENTS_ROOT = "mesh.evt"
DECISIONS_ROOT = "mesh.decision"
DLQ_ROOT = "mesh.dlq"
AUDIT_ROOT = "mesh.audit"
A2A_ROOT = "mesh.a2a"
TRACE_ROOT = "mesh.trace"  # mesh.trace.<trace id>
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


def card_key(agent: str, instance: str) -> str:
    """Key of one agent instance's card in the `mesh_cards` bucket."""
    return f"{agent}.{instance}"


def event_msg_id(tenant: str, event_id: str) -> str:
    """`Nats-Msg-Id` of a published event: the stream's duplicate window drops a re-publish."""
    return f"{tenant}:{event_id}"


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


# -- a2a
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
