"""What the coordinator publishes: decisions and dead letters (the wire contract for readers),
the one builder of a dead letter, and the one verifier of a decision (`decision_refusal`).

A decision is signed by the coordinator that made it (purpose "decision") over its canonical
encoding without `signature`; `signer`, the key id, is inside what is signed. Whoever reads
decisions (`mesh decisions`, `mesh.testing`, a consumer) believes one only when
`decision_refusal` says nothing against it.

An event's publisher signs it (`Mesh-Signature: <key id>:<signature>`, purpose "event", over
`<subject>\\0<body>`); `event_principal` says which trusted key did. The `principal` field of an
event's body is the publisher's claim, never its identity.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Mapping
from typing import Literal

import msgspec

from mesh import subjects
from mesh.envelope import Event
from mesh.errors import ConfigError
from mesh.identity import Identity, Purpose, Signer, Trust
from mesh.verdict import Choice, Verdict

# `invalid`: an answer that did not prove it came from the agent asked (unsigned, wrongly signed,
# or signed for another event, skill or question); counted as the policy counts failures.
# `budget_exceeded`: a signed abstention refusing to spend past the event's budget (mesh.budget);
# counted as the policy's `budget_exceeded` says.
CallOutcome = Literal[
    "voted", "timeout", "unavailable", "error", "cancelled", "invalid", "budget_exceeded"
]
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
    # The composite version (mesh.versions) of the instance that answered, from its verified
    # card (the signature binds the answer to that instance, the card signature its version).
    version: str = ""
    # Asked in shadow (coordinator.canary): recorded and compared, never counted.
    shadow: bool = False
    # Tool calls the agent's model asked for and its authorization denied, `<tool>: <reason
    # naming the policy>`, as the agent reported them with its answer (mesh.tools.denied_of).
    tools_denied: tuple[str, ...] = ()


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
    # Votes of candidate versions asked in shadow (policy `shadow`): each `shadow=True`, none
    # in the tally. Last, and omitted when empty, so older decisions encode as they did.
    shadow_votes: list[Vote] = []


DlqReason = Literal[
    "malformed",
    "unknown_type",
    "no_agent",
    "no_quorum",
    "policy_error",
    "max_deliveries",
    "handler_error",
    "terminated",  # a consumer called term() on it (JetStream MSG_TERMINATED advisory)
    # of a type the policies ignore (left to event handlers), and no handler is bound to it
    "no_handler",
    # an authorization policy does not let its publisher publish this type for this tenant
    "forbidden",
    # its tenant already had its `events_at_once` being decided (the policies' [tenants])
    "over_quota",
]


class BodyRef(msgspec.Struct, omit_defaults=True):
    """Where a dead letter's body is kept when it is too large to sit in the record: an object
    of a JetStream object store, named by its SHA-256 (hex). `size` in bytes."""

    bucket: str
    name: str
    sha256: str
    size: int


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
    # Set when the body is too large for the record (its base64 would pass max_payload): then
    # `body_b64` is empty and the body is the object this names (`coordinator.dlq.body_of`).
    body_ref: BodyRef | None = None

    @property
    def body(self) -> bytes:
        """The body kept in the record (empty when it is kept by reference: see `body_ref`)."""
        return base64.b64decode(self.body_b64)

    def by_reference(self, ref: BodyRef) -> DeadLetter:
        """This record with its body kept at `ref` instead of inline."""
        return msgspec.structs.replace(self, body_b64="", body_ref=ref)

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


# -- signed decisions ------------------------------------------------------------------------------
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


def event_token(event_id: str) -> str:
    """A subject/KV-safe token for an event id (other ids are hashed, never truncated)."""
    return event_id if _KEY_OK.match(event_id) else hashlib.sha256(event_id.encode()).hexdigest()


def decision_subject(decision: Decision) -> str:
    """The one subject `decision` belongs on (`subjects.decision` of its tenant, type, event)."""
    return subjects.decision(
        decision.tenant, decision.decision_type, event_token(decision.event_id)
    )


def _decision_payload(decision: Decision) -> bytes:
    # Canonical: msgspec encodes a struct's fields in declaration order, defaults omitted, so
    # whoever decodes a decision into this struct re-encodes the same bytes.
    return encoder.encode(msgspec.structs.replace(decision, signature=""))


def sign_decision(signer: Signer, decision: Decision) -> Decision:
    """`decision` signed by `signer` (its key id in `signer`, inside what is signed)."""
    unsigned = msgspec.structs.replace(decision, signer=signer.kid, signature="")
    return msgspec.structs.replace(
        unsigned, signature=signer.sign("decision", _decision_payload(unsigned))
    )


def decision_refusal(trust: Trust, decision: Decision, *, subject: str | None = None) -> str | None:
    """Why `decision` is not to be believed, or None when a key `trust` lists as a coordinator's
    (or the operator's) signed exactly this decision. With `subject` (where it was read from),
    also refused when it sits on another event's subject (a genuine decision copied there)."""
    refusal = trust.refusal(
        decision.signer,
        "decision",
        _decision_payload(decision),
        decision.signature,
        at=decision.decided_at,
    )
    if refusal is not None:
        return refusal
    if subject is not None and subject != decision_subject(decision):
        return f"it is the decision of event {decision.event_id!r}, copied to {subject}"
    return None


# -- who published an event ------------------------------------------------------------------------
def _event_payload(subject: str, body: bytes) -> bytes:
    return subject.encode() + b"\0" + body


def event_signature(signer: Signer, subject: str, body: bytes) -> str:
    """The `Mesh-Signature` header value for publishing `body` on `subject`."""
    return f"{signer.kid}:{signer.sign('event', _event_payload(subject, body))}"


def event_principal(
    trust: Trust | None, subject: str, body: bytes, header: str | None
) -> tuple[str, str]:
    """(principal, refusal) of an event as delivered: `<role>:<name>` of the trusted key whose
    `Mesh-Signature` header verifies over `subject` and `body`, and ""; or "" and why not."""
    if trust is None:
        return "", "not checked: no trust file (MESH_INSECURE=bus)"
    kid, _, signature = (header or "").partition(":")
    refusal = trust.refusal(kid, "event", _event_payload(subject, body), signature)
    if refusal is not None:
        return "", refusal
    entry = trust.keys[kid]
    return f"{entry.role}:{entry.name}", ""


# -- who signs -------------------------------------------------------------------------------------


def trusted_signer(
    identity: Identity | None, trust: Trust | None, purposes: tuple[Purpose, ...], *, what: str
) -> Signer | None:
    """The key `what` signs with: None when nothing is checked (no trust file, MESH_INSECURE=bus);
    a ConfigError that says why when this identity cannot sign what the trust file would
    believe (a writer whose own records it then refused would fight itself for ever)."""
    if trust is None:
        return None
    if identity is None or not identity.signing_seed:
        raise ConfigError(
            f"{what} needs an identity with a signing key",
            hint="set MESH_IDENTITY to a coordinator's identity file (`mesh creds`)",
        )
    signer = identity.signer()
    for purpose in purposes:
        if trust.signer_of(signer.kid, purpose) is None:
            raise ConfigError(
                f"{what}: the key of {identity.principal} is not trusted to sign {purpose}s",
                hint="run it as a coordinator (or the operator) listed in the trust file "
                "(MESH_TRUST)",
            )
    return signer
