"""The lean SendMessage over NATS (mesh.a2a.lean) answers what the SDK path answers.

Two agents with the same rules handler serve over NATS in this process, one with the lean path
(the default) and one with MESH_A2A_LEAN=0; the same requests (successes, rejections,
failures, every JSON-RPC error we can reach, refused callers, repeats) go to both, and their
replies must be the same bytes once the fields that legitimately differ per request are
normalised: generated ids (task, context, artifact, status message), timestamps, and the vote
signature's time and bytes (the signature covers its own time).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio

from mesh import Agent
from mesh.a2a.lean import LeanRequest, LeanSend
from mesh.agent import RunningAgent
from mesh.bus import Bus
from mesh.errors import MeshError
from mesh.identity import resolve_identity
from mesh.settings import Settings
from mesh.signing import Binding, binding_of
from mesh.votes import SIGNATURE_KEY, Question, VoteSignature, refusal
from tests.support.samples import write_card

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

_OPERATOR = resolve_identity(Settings())
assert _OPERATOR is not None
TOKEN = {"Authorization": f"Bearer {_OPERATOR.token}"}
V1 = {"A2A-Version": "1.0", **TOKEN}


class Ask(msgspec.Struct):
    vote: str = "approve"
    n: int = 0
    note: str = ""
    fail: bool = False
    crash: bool = False


class Answer(msgspec.Struct):
    vote: str
    n: int
    note: str


def review(ask: Ask) -> Answer:
    if ask.fail:
        raise MeshError("asked to fail")
    if ask.crash:
        raise RuntimeError("a bug in the handler")
    return Answer(ask.vote, ask.n * 2, ask.note)


EXTENSION = "https://example.com/ext/lean-test/v1"


def _agent(folder: Path, name: str, *, extension: bool = False) -> Agent:
    card = write_card(folder, name, "lean-skill")
    if extension:  # a card that requires an extension of its callers (A2A 1.0 §3.3.4)
        doc = json.loads(card.read_text())
        doc["capabilities"]["extensions"] = [{"uri": EXTENSION, "required": True}]
        card.write_text(json.dumps(doc))
    agent = Agent(name, card=card)
    agent.rules(review)
    return agent


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pair(
    mod_bus: Bus, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[RunningAgent, RunningAgent]]:
    """(lean, sdk): the same agent twice, the second with the lean path off."""
    folder = tmp_path_factory.mktemp("cards")
    on_settings = mod_bus.settings.model_copy(update={"a2a_lean": True})
    off_settings = mod_bus.settings.model_copy(update={"a2a_lean": False})
    async with (
        _agent(folder, "lean-on").serve(mod_bus, http=False, settings=on_settings) as on,
        _agent(folder, "lean-off").serve(mod_bus, http=False, settings=off_settings) as off,
    ):
        yield on, off


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ext_pair(
    mod_bus: Bus, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[RunningAgent, RunningAgent]]:
    """(lean, sdk) for an agent whose card requires an extension."""
    folder = tmp_path_factory.mktemp("ext-cards")
    on_settings = mod_bus.settings.model_copy(update={"a2a_lean": True})
    off_settings = mod_bus.settings.model_copy(update={"a2a_lean": False})
    async with (
        _agent(folder, "ext-on", extension=True).serve(
            mod_bus, http=False, settings=on_settings
        ) as on,
        _agent(folder, "ext-off", extension=True).serve(
            mod_bus, http=False, settings=off_settings
        ) as off,
    ):
        yield on, off


@pytest.fixture
def lean_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The messageIds the lean path served (so a test knows which path answered)."""
    served: list[str] = []
    original = LeanSend.send

    async def send(self: LeanSend, params: Any, context: Any) -> Any:
        # A LeanRequest: read from the JSON; a SendMessageRequest: parsed by protobuf first.
        lean_json = isinstance(params, LeanRequest)
        served.append(params.message_id if lean_json else params.message.message_id)
        return await original(self, params, context)

    monkeypatch.setattr(LeanSend, "send", send)
    return served


def _rpc(method: str, params: Any = None, rid: Any = 1) -> bytes:
    doc: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        doc["params"] = params
    return json.dumps(doc).encode()


def _message(mid: str, **fields: Any) -> dict[str, Any]:
    return {
        "role": "ROLE_USER",
        "messageId": mid,
        "parts": [{"data": {"vote": "approve", "n": 3}, "mediaType": "application/json"}],
        **fields,
    }


def _send(mid: str, **fields: Any) -> bytes:
    return _rpc("SendMessage", {"message": _message(mid, **fields)})


_META = {"tenant": "acme", "eventId": "ev-1", "skill": "lean-skill", "extra": [1, 2.5, "x"]}
# (case, body, headers, lean?) — lean?: whether the lean path is expected to answer it.
CORPUS: list[tuple[str, bytes, dict[str, str], bool]] = [
    ("data", _send("m-data"), V1, True),
    ("metadata", _send("m-meta", metadata=_META), V1, True),
    ("own-context", _send("m-ctx", contextId="ctx-given-1"), V1, True),
    (
        "unicode",
        _send("m-uni", parts=[{"data": {"note": "héllo ☃ \u2028", "n": 2**40}}]),
        V1,
        True,
    ),
    ("json-text", _send("m-text", parts=[{"text": '{"vote": "reject", "n": 1}'}]), V1, True),
    ("not-json-text", _send("m-nojson", parts=[{"text": "not json"}]), V1, True),
    ("wrong-type", _send("m-wrong", parts=[{"data": {"n": "three"}}]), V1, True),
    ("handler-fails", _send("m-fail", parts=[{"data": {"fail": True}}]), V1, True),
    ("handler-crashes", _send("m-crash", parts=[{"data": {"crash": True}}]), V1, True),
    ("two-parts", _send("m-two", parts=[{"text": "x"}, {"data": {"n": 5}}]), V1, True),
    ("unknown-fields", _rpc("SendMessage", {"message": _message("m-unk"), "zzz": 1}), V1, True),
    ("string-id", _rpc("SendMessage", {"message": _message("m-sid")}, rid="abc"), V1, True),
    ("null-id", _rpc("SendMessage", {"message": _message("m-nid")}, rid=None), V1, True),
    # Eligible, and refused by the SDK's own required-field check on both paths:
    ("no-message-id", _send("", parts=[{"data": {"n": 1}}]), V1, True),
    ("empty-part", _send("m-emptypart", parts=[{}]), V1, True),
    # The SDK's, on both agents:
    ("empty-text", _send("m-empty", parts=[{"text": ""}]), V1, False),
    ("no-parts", _send("m-noparts", parts=[]), V1, False),
    ("agent-role", _send("m-role", role="ROLE_AGENT"), V1, False),
    ("unknown-task", _send("m-task", taskId="no-such-task"), V1, False),
    ("reference-tasks", _send("m-ref", referenceTaskIds=["t-1"]), V1, False),
    (
        "return-immediately",
        _rpc(
            "SendMessage",
            {"message": _message("m-ri"), "configuration": {"returnImmediately": True}},
        ),
        V1,
        False,
    ),
    (
        "history-length",
        _rpc("SendMessage", {"message": _message("m-hl"), "configuration": {"historyLength": 0}}),
        V1,
        False,
    ),
    (
        "bad-history-length",
        _rpc("SendMessage", {"message": _message("m-bhl"), "configuration": {"historyLength": -1}}),
        V1,
        False,
    ),
    (
        "request-metadata",
        _rpc("SendMessage", {"message": _message("m-rm"), "metadata": {"a": 1}}),
        V1,
        False,
    ),
    ("tenant", _rpc("SendMessage", {"message": _message("m-ten"), "tenant": "t1"}), V1, False),
    # Refused before the handler (either path):
    ("no-message", _rpc("SendMessage", {}), V1, False),
    ("bad-role", _rpc("SendMessage", {"message": {"role": 7}}), V1, False),
    ("no-version", _send("m-nov"), TOKEN, False),
    ("old-version", _send("m-old"), {**V1, "A2A-Version": "0.3"}, False),
    ("parse", b'{"jsonrpc": "2.0", "id": 1, "method": "SendMess', V1, False),
    ("not-jsonrpc", b'{"id": 1, "method": "SendMessage"}', V1, False),
    ("batch", b'[{"jsonrpc": "2.0", "id": 1, "method": "SendMessage"}]', V1, False),
    ("bool-id", _rpc("SendMessage", {"message": _message("m-bool")}, rid=True), V1, False),
    ("params-list", _rpc("SendMessage", [1]), V1, False),
    ("content-type", _send("m-ct"), {**V1, "Content-Type": "text/plain"}, False),
    ("unknown-method", _rpc("SendMessages", {}), V1, False),
    ("get-unknown-task", _rpc("GetTask", {"id": "no-such-task"}), V1, False),
    ("no-token", _send("m-notoken"), {"A2A-Version": "1.0"}, False),
    (
        "bad-token",
        _send("m-badtoken"),
        {"A2A-Version": "1.0", "Authorization": "Bearer x.y.z"},
        False,
    ),
    ("not-bearer", _send("m-basic"), {"A2A-Version": "1.0", "Authorization": "Basic eDp5"}, False),
]

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TIMESTAMP = re.compile(r'"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z"')
_SIGNED_AT = re.compile(r'"at":\d+(\.\d+)?')
_SIGNATURE = re.compile(r'"signature":"[A-Za-z0-9_-]+"')
_INSTANCE = re.compile(r'"instance":"[0-9a-f]+"')
_STRUCTS = frozenset({"data", "metadata"})  # the google.protobuf.Struct fields of a reply


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _structs_sorted(value: Any) -> Any:
    """`value` with the members of its Struct values (data parts, metadata) in sorted order and
    every other object's members as they came."""
    if isinstance(value, dict):
        return {k: _sorted(v) if k in _STRUCTS else _structs_sorted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_structs_sorted(v) for v in value]
    return value


def normalised(body: bytes) -> str:
    """The reply with what legitimately differs per request replaced: generated UUIDs (numbered
    by first appearance, so a reply that reuses one id keeps saying so), timestamps, the
    signing instance (each agent here has its own), the signature's time and bytes, and the
    member order of Struct values — a protobuf map, whose order upb draws from a per-process
    hash seed and changes with every copy, so two SDK answers in one process differ in it too.
    Everything else, member order included, is compared as sent."""
    doc = json.loads(body)
    text = json.dumps(_structs_sorted(doc), ensure_ascii=False, separators=(",", ":"))
    assert json.loads(text) == doc
    text = _INSTANCE.sub('"instance":"<instance>"', text)
    ids: dict[str, str] = {}
    text = _UUID.sub(lambda m: ids.setdefault(m.group(), f"<id{len(ids)}>"), text)
    text = _TIMESTAMP.sub('"<timestamp>"', text)
    text = _SIGNED_AT.sub('"at":"<at>"', text)
    return _SIGNATURE.sub('"signature":"<signature>"', text)


async def _ask(bus: Bus, running: RunningAgent, body: bytes, headers: dict[str, str]) -> bytes:
    reply = await bus.nc.request(running.subject, body, timeout=10, headers=headers)
    return bytes(reply.data)


@pytest.mark.parametrize(
    "body, headers, takes_lean", [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS]
)
async def test_lean_and_sdk_paths_answer_the_same_bytes(  # noqa: PLR0917
    mod_bus: Bus,
    pair: tuple[RunningAgent, RunningAgent],
    lean_calls: list[str],
    body: bytes,
    headers: dict[str, str],
    takes_lean: bool,
) -> None:
    on, off = pair
    over_lean = await _ask(mod_bus, on, body, headers)
    assert bool(lean_calls) is takes_lean, f"lean path served {lean_calls}"
    lean_calls.clear()
    over_sdk = await _ask(mod_bus, off, body, headers)
    assert not lean_calls, "the agent with MESH_A2A_LEAN=0 took the lean path"
    assert normalised(over_lean) == normalised(over_sdk)
    # And the bytes are the dispatch's encoding (what Starlette's JSONResponse renders), not a
    # re-encoding that happens to parse the same.
    assert (
        over_lean
        == json.dumps(json.loads(over_lean), ensure_ascii=False, separators=(",", ":")).encode()
    )


EXT = {**V1, "A2A-Extensions": EXTENSION}
EXT_CORPUS: list[tuple[str, bytes, dict[str, str]]] = [
    ("declared", _send("x-ok"), EXT),
    ("not-declared", _send("x-missing"), V1),
    ("another-declared", _send("x-other"), {**V1, "A2A-Extensions": "https://example.com/x"}),
    # Broken twice: the extension is checked first on both paths.
    ("not-declared-no-message-id", _send(""), V1),
    ("declared-no-message-id", _send(""), EXT),
]


@pytest.mark.parametrize(
    "body, headers", [c[1:] for c in EXT_CORPUS], ids=[c[0] for c in EXT_CORPUS]
)
async def test_required_extensions_alike_on_both_paths(
    mod_bus: Bus,
    ext_pair: tuple[RunningAgent, RunningAgent],
    lean_calls: list[str],
    body: bytes,
    headers: dict[str, str],
) -> None:
    on, off = ext_pair
    over_lean = await _ask(mod_bus, on, body, headers)
    assert lean_calls, "the lean path did not take it"
    over_sdk = await _ask(mod_bus, off, body, headers)
    assert normalised(over_lean) == normalised(over_sdk)


async def test_repeat_returns_the_first_task_on_both_paths(
    mod_bus: Bus, pair: tuple[RunningAgent, RunningAgent]
) -> None:
    """A retried messageId (a coordinator's take-over) gets the task of the first answer, with
    the signature made then, whichever path answered it."""
    for running in pair:
        body = _send("m-repeat", metadata=_META)
        first = json.loads(await _ask(mod_bus, running, body, V1))["result"]["task"]
        again = json.loads(await _ask(mod_bus, running, body, V1))["result"]["task"]
        assert again["id"] == first["id"]
        assert again["artifacts"] == first["artifacts"]
        assert again["status"] == first["status"]


async def test_canonical_requests_skip_protobuf(
    mod_bus: Bus,
    pair: tuple[RunningAgent, RunningAgent],
    lean_calls: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request in the canonical JSON form is answered from its JSON (LeanSend._run, the
    protobuf route, is not called); one in another form (proto field names) still takes the
    lean path through protobuf, with the same answer."""
    on, _ = pair
    routes: list[str] = []
    original = LeanSend._run

    async def run(self: LeanSend, params: Any, context: Any) -> Any:
        routes.append(params.message.message_id)
        return await original(self, params, context)

    monkeypatch.setattr(LeanSend, "_run", run)
    canonical = json.loads(await _ask(mod_bus, on, _send("m-json", metadata=_META), V1))
    assert lean_calls == ["m-json"] and routes == []
    other = {"message": {"message_id": "m-proto", "role": "ROLE_USER", "parts": [{"data": {}}]}}
    proto = json.loads(await _ask(mod_bus, on, _rpc("SendMessage", other), V1))
    assert routes == ["m-proto"]
    for reply in (canonical, proto):
        assert reply["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED"


async def test_concurrent_repeats_get_the_whole_task(
    mod_bus: Bus, pair: tuple[RunningAgent, RunningAgent]
) -> None:
    """Repeats of one messageId sent at once wait for the first answer; each gets the whole
    task, history included (the lean JSON route's repeat reads it from the task store)."""
    for running in pair:
        body = _send(f"m-together-{running.subject}", metadata=_META)
        replies = await asyncio.gather(*(_ask(mod_bus, running, body, V1) for _ in range(4)))
        tasks = [json.loads(r)["result"]["task"] for r in replies]
        assert all(t == tasks[0] for t in tasks[1:])
        assert tasks[0]["history"][0]["messageId"].startswith("m-together-")


@pytest.mark.parametrize("store", ["jetstream", "memory"])
async def test_lean_task_reads_back_alike(
    mod_bus: Bus,
    tmp_path: Path,
    lean_calls: list[str],
    store: str,
) -> None:
    """A task the lean path answered from JSON reads back (GetTask) as it was answered, history
    included, from either task store: the JetStream store keeps the task's JSON, the memory
    store the protobuf task given its history."""
    settings = mod_bus.settings.model_copy(update={"a2a_lean": True, "task_store": store})
    agent = _agent(tmp_path, f"lean-{store}")
    async with agent.serve(mod_bus, http=False, settings=settings) as on:
        body = _send(f"m-read-{store}", metadata=_META)
        task = json.loads(await _ask(mod_bus, on, body, V1))["result"]["task"]
        assert lean_calls == [f"m-read-{store}"]
        got = json.loads(await _ask(mod_bus, on, _rpc("GetTask", {"id": task["id"]}), V1))
        assert got["result"] == task
        assert task["history"][0]["parts"][0]["data"] == {"vote": "approve", "n": 3.0}


async def test_lean_vote_is_signed_by_the_instance(
    mod_bus: Bus, pair: tuple[RunningAgent, RunningAgent], lean_calls: list[str]
) -> None:
    """The lean path's vote verifies with the key the instance's card binds, for the question as
    asked, and for no other question (what the coordinator checks: mesh.votes.refusal)."""
    on, _ = pair
    reply = json.loads(await _ask(mod_bus, on, _send("m-signed", metadata=_META), V1))
    assert lean_calls == ["m-signed"]
    task = reply["result"]["task"]
    assert task["status"]["state"] == "TASK_STATE_COMPLETED"
    [artifact] = task["artifacts"]
    output = artifact["parts"][0]["data"]
    signed = msgspec.convert(artifact["metadata"][SIGNATURE_KEY], VoteSignature)
    binding = binding_of(on.card)
    assert isinstance(binding, Binding)
    asked = Question(
        agent="lean-on", tenant="acme", event_id="ev-1", skill="lean-skill", message_id="m-signed"
    )
    assert refusal(asked, output, signed, binding) is None
    other = msgspec.structs.replace(asked, event_id="ev-2")
    assert refusal(other, output, signed, binding) is not None


# -- fuzz: random messages, same answers ----------------------------------------------------------
_KEYS = ["vote", "n", "note", "fail", "x", "", "ü", "a.b", "1"]


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 3, 2**31, 2**53 + 1, -(2**63), 10**20])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e-7, 1e300, 3.0, 2.5e16, -123.456])
    if kind in (4, 5):
        return "".join(
            rng.choice('aZ09 "\\/\u00e9\u2028\U0001f600{}') for _ in range(rng.randrange(6))
        )
    if kind in (6, 7):
        return {rng.choice(_KEYS): _value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _part(rng: random.Random) -> dict[str, Any]:
    choice = rng.randrange(5)
    if choice == 0:
        return {"text": json.dumps(_value(rng))}
    if choice == 1:
        return {"text": rng.choice(["x", " ", "{", "[1, 2]", '"s"'])}
    part: dict[str, Any] = {"data": _value(rng)}
    if rng.random() < 0.5:
        part["mediaType"] = rng.choice(["application/json", "text/plain", ""])
    if rng.random() < 0.2:
        part["metadata"] = {"k": _value(rng)}
    return part


def _fuzzed(rng: random.Random, i: int) -> bytes:
    message: dict[str, Any] = {
        "role": "ROLE_USER",
        "messageId": f"fuzz-{i}",
        "parts": [_part(rng) for _ in range(rng.randrange(1, 3))],
    }
    if rng.random() < 0.5:
        message["metadata"] = {rng.choice(["tenant", "eventId", "skill", "z"]): _value(rng)}
    if rng.random() < 0.2:
        message["contextId"] = f"ctx-fuzz-{i}"
    if rng.random() < 0.1:
        message["unknownField"] = _value(rng)
    rid: Any = rng.choice([i, f"r{i}", None])
    return _rpc("SendMessage", {"message": message}, rid=rid)


FUZZ_SEED = 14
FUZZ_CASES = 80


async def test_random_messages_answer_alike_on_both_paths(
    mod_bus: Bus, pair: tuple[RunningAgent, RunningAgent], lean_calls: list[str]
) -> None:
    """Seeded random messages (nested data of every JSON type, odd numbers and strings, text
    parts that are or are not JSON, metadata, unknown fields): the lean path takes every one,
    and answers each as the SDK path does."""
    rng = random.Random(FUZZ_SEED)
    on, off = pair
    for i in range(FUZZ_CASES):
        body = _fuzzed(rng, i)
        over_lean = await _ask(mod_bus, on, body, V1)
        over_sdk = await _ask(mod_bus, off, body, V1)
        assert normalised(over_lean) == normalised(over_sdk), body
    assert len(lean_calls) == FUZZ_CASES
