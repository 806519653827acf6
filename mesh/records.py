"""What the coordinator publishes: decisions and dead letters (the wire contract for readers)."""

from __future__ import annotations

import base64
from typing import Literal

import msgspec

from mesh.verdict import Choice, Verdict

CallOutcome = Literal["voted", "timeout", "unavailable", "error", "cancelled"]
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


encoder = msgspec.json.Encoder()
decision_decoder = msgspec.json.Decoder(Decision)
dead_letter_decoder = msgspec.json.Decoder(DeadLetter)
