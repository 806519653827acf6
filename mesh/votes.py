"""Signed votes: each agent instance signs what it answers; the coordinator checks it.

The agent runtime signs every artifact it produces with its instance's own key (the one its
signed card binds: `mesh.signing`), over one canonical payload:

    {agent, instance, tenant, eventId, skill, messageId, output, at}

`tenant`, `eventId` and `skill` are what the question's A2A message metadata said, `messageId`
its id, `output` the artifact's data (canonical JSON), `at` when it signed (Unix time). The
signature goes in the artifact's metadata under `SIGNATURE_KEY` as `{instance, at, signature}`.

The coordinator rebuilds the payload from what *it* asked and what it got back, and verifies
it with the key the claimed instance's card binds (`refusal`). So an unsigned answer, one
signed by any other key, and a genuine signature replayed for another event, tenant, skill,
question or output all fail alike; they count as `invalid`, never as the vote they claim.

Canonical JSON here: object keys sorted, no whitespace, UTF-8, and a number that is a whole
number is written as an integer (the answer crosses protobuf's `Struct`, where every number is
a double, so `1` and `1.0` must sign alike). Integers beyond 2**53 do not survive that trip
and so do not verify; votes have none.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import msgspec
from a2a.types import Task
from google.protobuf.json_format import MessageToDict

from mesh import subjects
from mesh.a2a.wire import TaskView
from mesh.identity import Signer, verify_with
from mesh.signing import CLOCK_SKEW_S, Binding

SIGNATURE_KEY = "meshSignature"  # the artifact metadata entry that carries the signature
_EXACT = 2**53  # doubles hold every integer up to here

_canonical_enc = msgspec.json.Encoder(order="sorted")


class VoteSignature(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the artifact metadata carries: who signed, when, and the signature."""

    instance: str
    at: float
    signature: str


class Question(msgspec.Struct, frozen=True, kw_only=True):
    """What was asked, as the asker knows it (the coordinator never takes it from the answer)."""

    agent: str
    tenant: str
    event_id: str
    skill: str
    message_id: str


def canonical(value: Any) -> bytes:
    """The canonical JSON of a JSON value (see the module doc)."""
    return _canonical_enc.encode(_normal(value))


def _normal(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < _EXACT:
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _normal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    return value


def payload(question: Question, *, instance: str, output: Any, at: float) -> bytes:
    """The bytes a vote signature covers."""
    return canonical(
        {
            "agent": question.agent,
            "instance": instance,
            "tenant": question.tenant,
            "eventId": question.event_id,
            "skill": question.skill,
            "messageId": question.message_id,
            "output": output,
            "at": at,
        }
    )


class VoteSigner:
    """One agent instance's vote signer (its key lives in memory, as long as the process)."""

    def __init__(self, agent: str, instance: str, key: Signer) -> None:
        self.agent = agent
        self.instance = instance
        self.key = key

    def question(self, message_id: str, metadata: Mapping[str, Any]) -> Question:
        """The question an A2A message to this agent asks (its metadata set by the asker)."""
        return Question(
            agent=self.agent,
            tenant=str(metadata.get("tenant", "")),
            event_id=str(metadata.get("eventId", "")),
            skill=str(metadata.get("skill", "")),
            message_id=message_id,
        )

    def sign(self, question: Question, output: Any, *, at: float | None = None) -> dict[str, Any]:
        """The `SIGNATURE_KEY` metadata for an artifact whose data is `output`."""
        when = round(time.time() if at is None else at, 3)  # ms: survives any JSON round trip
        sig = self.key.sign(
            "vote", payload(question, instance=self.instance, output=output, at=when)
        )
        return {"instance": self.instance, "at": when, "signature": sig}


def signed_output(task: Task | TaskView) -> tuple[Any, VoteSignature | str]:
    """The task's answer (its first data part, the one `verdict_of` reads) and the signature
    its artifact carries, or why there is none usable. A `TaskView` (the client's fast path)
    holds both already, as `MessageToDict` gives them."""
    if isinstance(task, TaskView):
        if task.data is msgspec.UNSET:
            return None, "no data part to verify"
        return _signed(task.data, task.data_metadata.get(SIGNATURE_KEY))
    for artifact in task.artifacts:
        for part in artifact.parts:
            if part.HasField("data"):
                output = MessageToDict(part.data)
                return _signed(output, MessageToDict(artifact.metadata).get(SIGNATURE_KEY))
    return None, "no data part to verify"


def _signed(output: Any, meta: Any) -> tuple[Any, VoteSignature | str]:
    if meta is None:
        return output, "unsigned vote"
    try:
        return output, msgspec.convert(meta, VoteSignature, strict=False)
    except msgspec.ValidationError as e:
        return output, f"malformed vote signature ({e})"


def refusal(
    question: Question,
    output: Any,
    signed: VoteSignature | str,
    binding: Binding | None,
    *,
    now: float | None = None,
) -> str | None:
    """Why this answer is not a vote by the instance it names, for `question`; None if it is.

    `binding` is the verified binding of the instance the signature names (None: no card for
    it was ever believed, or it was forgotten)."""
    if isinstance(signed, str):
        return signed
    if binding is None:
        return f"signed by instance {signed.instance!r}, which has no verified card"
    if binding.agent != question.agent or binding.instance != signed.instance:
        return (
            f"signed by instance {signed.instance!r}, which is not an instance of {question.agent}"
        )
    now = time.time() if now is None else now
    if signed.at > binding.exp:
        return f"signed at {signed.at:.3f}, after its card expired ({binding.exp:.0f})"
    if signed.at > now + CLOCK_SKEW_S:
        return f"signed in the future ({signed.at:.3f}, now {now:.3f})"
    data = payload(question, instance=signed.instance, output=output, at=signed.at)
    if not verify_with(binding.public_key(), "vote", data, signed.signature):
        return (
            f"signature does not verify with the key instance {signed.instance}'s card binds "
            f"(another key, or signed for another event, skill, question or answer)"
        )
    return None


def record_refusal(
    vote_instance: str,
    signed_at: float,
    signature: str,
    *,
    agent: str,
    tenant: str,
    event_id: str,
    skill: str,
    output: Any,
    binding: Binding | None,
) -> str | None:
    """`refusal` for a vote as a decision records it (for re-checking a ledger or a decision
    later): the question is rebuilt from the event and skill, and `output` is the recorded
    verdict (`msgspec.to_builtins(vote.verdict)`), which is what the agent signed when its
    answer was exactly a `Verdict` (the shipped reviewers' is)."""
    question = Question(
        agent=agent,
        tenant=tenant,
        event_id=event_id,
        skill=skill,
        message_id=subjects.vote_message_id(tenant, event_id, skill),
    )
    if not signature:
        return "unsigned vote"
    signed = VoteSignature(instance=vote_instance, at=signed_at, signature=signature)
    return refusal(question, output, signed, binding, now=signed_at)
