"""What the coordinator publishes: decisions and dead letters (the wire contract for readers),
and the one builder of a dead letter."""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Literal

import msgspec

from mesh import subjects
from mesh.envelope import Event
from mesh.verdict import Choice, Verdict

# `invalid`: an answer that did not prove it came from the agent asked (unsigned, wrongly signed,
# or signed for another event, skill or question); counted as the policy counts failures.
CallOutcome = Literal["voted", "timeout", "unavailable", "error", "cancelled", "invalid"]
DecisionOutcome = Literal["approved", "rejected", "no_quorum"]


class Vote(msgspec.Struct, omit_defaults=True):
    skill: str
    agent: str
    outcome: CallOutcome
    counted_as: Choice | None = None  # what went into the tally (None: not counted)
    verdict: Verdict | None = None  # what the agent said, when it said anything
    latency_ms: float = 0.0
    attempts: int = 1
    brain: str = ""
    error: str = ""
    instance: str = ""  # the agent instance that answered (its card binds the key it signed with)
    signed_at: float = 0.0  # when the instance signed the verdict (its clock)
    signature: str = ""  # the instance's Ed25519 signature over the vote (see mesh.votes)


class Decision(msgspec.Struct, omit_defaults=True):
    event_id: str
    event_type: str
    tenant: str
    decision_type: str
    outcome: DecisionOutcome
    reason: str
    rule: str
    votes: list[Vote]
    decided_at: float
    latency_ms: float
    coordinator: str = ""
    takeovers: int = 0  # how many times another coordinator resumed this decision
    trace_id: str = ""  # W3C trace id of the decision (see `mesh trace`)
    principal: str = ""  # who published the event, from its verified NATS credentials
    signer: str = ""  # key id of the coordinator key that signed this decision
    signature: str = ""  # Ed25519 over the decision without `signature` (purpose "decision")


DlqReason = Literal[
    "malformed",
    "unknown_type",
    "no_agent",
    "no_quorum",
    "policy_error",
    "max_deliveries",
    "handler_error",
    "terminated",  # a consumer called term() on it (JetStream MSG_TERMINATED advisory)
]


class DeadLetter(msgspec.Struct, omit_defaults=True):
    reason: DlqReason
    error: str
    subject: str
    tenant: str
    body_b64: str
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    event_id: str | None = None
    event_type: str | None = None
    attempts: int = 1
    stream_seq: int = 0
    trace_id: str | None = None
    at: float = 0.0

    @property
    def body(self) -> bytes:
        return base64.b64decode(self.body_b64)

    @staticmethod
    def encode_body(body: bytes) -> str:
        return base64.b64encode(body).decode()


def dead_letter(
    *,
    reason: DlqReason,
    error: str,
    subject: str,
    body: bytes,
    headers: Mapping[str, str] | None = None,
    attempts: int = 1,
    stream_seq: int = 0,
    event: Event | None = None,
    event_id: str | None = None,
    at: float | None = None,
) -> DeadLetter:
    """The one way a `DeadLetter` is built, by the coordinator and by the advisory listener.

    `subject`, `body` and `headers` are the original message's, kept as they were. The tenant
    and event type come from the subject (tenant `unknown` when it names none); id, type and
    trace from `event` when the body parsed as one. `event_id` is the id to record when it did
    not (the coordinator passes the producer's message id; see `subjects.event_id_of_msg_id`).
    """
    hdrs = {str(k): str(v) for k, v in (headers or {}).items()}
    tenant, event_type = subjects.parse_event_subject(subject)
    traceparent = (event.traceparent if event else None) or hdrs.get(subjects.H_TRACEPARENT)
    return DeadLetter(
        reason=reason,
        error=error,
        subject=subject,
        tenant=tenant if subjects.valid_token(tenant) else "unknown",
        body_b64=DeadLetter.encode_body(body),
        headers=hdrs,
        event_id=event.id if event else event_id,
        event_type=event.type if event else (event_type or None),
        attempts=attempts,
        stream_seq=stream_seq,
        trace_id=trace_id_of(traceparent),
        at=time.time() if at is None else at,
    )


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C traceparent (`00-<trace id>-<span id>-<flags>`), if it is one."""
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 else None


encoder = msgspec.json.Encoder()
decision_decoder = msgspec.json.Decoder(Decision)
dead_letter_decoder = msgspec.json.Decoder(DeadLetter)
