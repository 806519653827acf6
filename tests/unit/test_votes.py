"""Signed votes (mesh.votes): a vote verifies only for exactly what was asked and answered, by
the key the instance's card binds."""

from typing import Any

import msgspec
import pytest
from a2a.helpers import new_data_part
from a2a.types import Artifact, Task, TaskState, TaskStatus

from mesh import subjects, votes
from mesh.identity import Signer, b64
from mesh.signing import CLOCK_SKEW_S, Binding
from mesh.verdict import Verdict
from mesh.votes import SIGNATURE_KEY, Question, VoteSignature, VoteSigner

AGENT = "security-review"
NOW = 1_800_000_000.0
QUESTION = Question(
    agent=AGENT,
    tenant="acme",
    event_id="evt-1",
    skill="release-security-review",
    message_id=subjects.vote_message_id("acme", "evt-1", "release-security-review"),
)
OUTPUT = msgspec.to_builtins(Verdict.approve("no findings"))


@pytest.fixture
def key() -> Signer:
    return Signer.generate()


def _binding(key: Signer, **kw: Any) -> Binding:
    fields: dict[str, Any] = {
        "agent": AGENT,
        "instance": "i1",
        "key": b64(key.public),
        "subjects": [f"mesh.a2a.{AGENT}", f"mesh.a2a.{AGENT}.i1"],
        "iat": NOW - 10,
        "exp": NOW + 590,
    }
    fields.update(kw)
    return Binding(**fields)


def _signed(key: Signer, question: Question = QUESTION, output: Any = OUTPUT) -> VoteSignature:
    meta = VoteSigner(AGENT, "i1", key).sign(question, output, at=NOW)
    return msgspec.convert(meta, VoteSignature)


def _refusal(signed: VoteSignature | str, binding: Binding | None, **kw: Any) -> str | None:
    question = msgspec.structs.replace(QUESTION, **{k: v for k, v in kw.items() if k != "output"})
    return votes.refusal(question, kw.get("output", OUTPUT), signed, binding, now=NOW)


def test_a_vote_verifies_with_the_bound_key(key: Signer) -> None:
    assert _refusal(_signed(key), _binding(key)) is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("agent", "quality-review"),
        ("tenant", "other"),
        ("event_id", "evt-2"),
        ("skill", "release-quality-review"),
        ("message_id", "acme/evt-2/release-security-review"),
    ],
)
def test_a_signature_for_another_question_does_not_verify(
    key: Signer, field: str, value: str
) -> None:
    signed = _signed(key, msgspec.structs.replace(QUESTION, **{field: value}))
    reason = _refusal(signed, _binding(key))
    assert reason is not None and "does not verify" in reason


def test_another_answer_another_time_or_another_instance_does_not_verify(key: Signer) -> None:
    signed = _signed(key)
    binding = _binding(key)
    assert "does not verify" in (
        _refusal(signed, binding, output=msgspec.to_builtins(Verdict.reject("x"))) or ""
    )
    assert "does not verify" in (
        _refusal(msgspec.structs.replace(signed, at=NOW - 1), binding) or ""
    )
    moved = msgspec.structs.replace(signed, instance="i2")
    assert "does not verify" in (_refusal(moved, _binding(key, instance="i2")) or "")
    assert "not an instance of" in (_refusal(moved, binding) or "")


def test_another_key_does_not_verify(key: Signer) -> None:
    reason = _refusal(_signed(Signer.generate()), _binding(key))
    assert reason is not None and "does not verify with the key instance i1's card binds" in reason


def test_unknown_instances_and_missing_signatures(key: Signer) -> None:
    assert _refusal(_signed(key), None) == "signed by instance 'i1', which has no verified card"
    assert _refusal("unsigned vote", _binding(key)) == "unsigned vote"


def test_a_vote_signed_after_its_card_expired_or_in_the_future(key: Signer) -> None:
    assert "after its card expired" in (_refusal(_signed(key), _binding(key, exp=NOW - 1)) or "")
    future = msgspec.structs.replace(_signed(key), at=NOW + CLOCK_SKEW_S + 1)
    assert "in the future" in (_refusal(future, _binding(key, exp=NOW + 3600)) or "")


def test_canonical_json_ignores_key_order_and_whole_number_floats() -> None:
    assert votes.canonical({"b": 1, "a": [1.0, 2.5, {"y": True, "x": None}]}) == (
        b'{"a":[1,2.5,{"x":null,"y":true}],"b":1}'
    )
    assert votes.canonical({"a": 1.0}) == votes.canonical({"a": 1})
    assert votes.canonical("é") == '"é"'.encode()


def _task(output: Any, meta: dict[str, Any] | None) -> Task:
    artifact = Artifact(artifact_id="a1", parts=[new_data_part(output)])
    if meta is not None:
        artifact.metadata.update({SIGNATURE_KEY: meta, "brain": "rules"})
    return Task(
        id="t1",
        context_id="c1",
        status=TaskStatus(state=TaskState.TASK_STATE_COMPLETED),
        artifacts=[artifact],
    )


def test_a_signed_answer_survives_the_protobuf_trip(key: Signer) -> None:
    """What the agent signs (ints, Python floats) is what the coordinator reads back from the
    task (every number a double), even through the JSON wire form."""
    output = {**OUTPUT, "confidence": 1.0, "score": 3, "ratio": 0.1}
    meta = VoteSigner(AGENT, "i1", key).sign(QUESTION, output, at=NOW + 0.123456)
    task = _task(output, meta)
    wire = Task()
    wire.ParseFromString(task.SerializeToString())
    read, signed = votes.signed_output(wire)
    assert isinstance(signed, VoteSignature) and signed.at == round(NOW + 0.123456, 3)
    assert votes.refusal(QUESTION, read, signed, _binding(key), now=NOW) is None


def test_what_the_task_carries(key: Signer) -> None:
    assert votes.signed_output(_task(OUTPUT, None)) == (OUTPUT | {"confidence": 1}, "unsigned vote")
    _, bad = votes.signed_output(_task(OUTPUT, {"instance": "i1"}))
    assert isinstance(bad, str) and bad.startswith("malformed vote signature")
    empty = Task(id="t", context_id="c")
    assert votes.signed_output(empty) == (None, "no data part to verify")


def test_the_question_is_what_the_askers_metadata_says(key: Signer) -> None:
    signer = VoteSigner(AGENT, "i1", key)
    meta = {"tenant": "acme", "eventId": "evt-1", "skill": "release-security-review", "x": 1}
    assert signer.question(QUESTION.message_id, meta) == QUESTION
    assert signer.question("m", {}).event_id == ""


def test_a_recorded_vote_can_be_checked_again(key: Signer) -> None:
    verdict = Verdict.approve("no findings")
    signed = _signed(key, output=msgspec.to_builtins(verdict))
    args: dict[str, Any] = {
        "agent": AGENT,
        "tenant": "acme",
        "event_id": "evt-1",
        "skill": "release-security-review",
        "output": msgspec.to_builtins(verdict),
        "binding": _binding(key),
    }
    assert votes.record_refusal("i1", signed.at, signed.signature, **args) is None
    assert "does not verify" in (
        votes.record_refusal("i1", signed.at, signed.signature, **{**args, "event_id": "e2"}) or ""
    )
    assert votes.record_refusal("i1", 0.0, "", **args) == "unsigned vote"
