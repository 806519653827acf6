"""Whatever bytes arrive on an event subject end as exactly one decision or one dead letter with a
reason, and the coordinator stays up (issue 12, point 1).

Hypothesis draws bodies (arbitrary bytes, JSON of any shape, CloudEvents with fields wrong or
missing, data nested too deep, data that breaks the type's JSON Schema), binary-mode messages
(CloudEvents `ce-` headers wrong, missing or doubled, with any body: issue 13) and subjects (a
decided type, an ignored type nobody handles, an unknown type; two tenants); the named nasty cases
are explicit examples. A real nats-server, a real Coordinator in this process and a real voting
agent: each example is published raw (signed by the operator, as `mesh publish` would), and waited
for until its outcome is stored.

Hypothesis runs in a worker thread; each example hands its publish-and-wait to the test's own
event loop, where the coordinator runs, so a coordinator that died fails the very example that
killed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from coordinator import dlq, policy
from coordinator.service import Coordinator
from mesh import contracts, envelope, subjects
from mesh.bus import Bus
from mesh.records import DeadLetter, Decision
from mesh.settings import Settings, get_settings
from tests.support.outcomes import Outcomes, settled
from tests.support.samples import voting_agent
from tests.support.strategies import json_scalars, json_values

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

DECIDED = "fuzz.vote"
IGNORED = "fuzz.ignored"  # in the policies' ignore list, and no handler is bound to it
UNKNOWN = "fuzz.unknown"
TENANTS = ("default", "acme")
SKILL = "fuzz-skill"
POLICIES: dict[str, Any] = {
    DECIDED: {
        "skills": [SKILL],
        "rule": {"kind": "unanimous"},
        "agent_timeout_s": 1.0,
        "deadline_s": 3.0,
        "timeout_counts_as": "reject",
    },
    "ignore": [IGNORED],
}
MAX_PAYLOAD = 1024 * 1024  # the test server's (nats-server's default)
NEAR_MAX = MAX_PAYLOAD - 2048  # leaves room for the headers the bus adds (id, signature, trace)
EXAMPLES = 40
# The decided type's schema (MESH_SCHEMA_DIR): loose, so most drawn data still reaches a vote,
# but `pad` must be a string when data is an object that has one.
FUZZ_SCHEMA = {"type": ["object", "array", "string", "number", "boolean", "null"],
               "properties": {"pad": {"type": "string"}}}  # fmt: skip

Headers = dict[str, str] | None
Case = tuple[str, str, bytes, Headers]


def _event(event_type: str = DECIDED, tenant: str = "default", **fields: Any) -> bytes:
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": f"fuzz-{uuid.uuid4().hex}",
        "source": "mesh://fuzz",
        "type": event_type,
        "tenant": tenant,
        "data": {"vote": "approve"},
    }
    doc.update(fields)
    return msgspec.json.encode({k: v for k, v in doc.items() if v is not ...})


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


def _near_max_event() -> bytes:
    """A valid event of the decided type whose body is just under max_payload."""
    shell = _event(data={"vote": "approve", "pad": ""})
    return _event(data={"vote": "approve", "pad": "x" * (NEAR_MAX - len(shell))})


def _binary(
    event_type: str = DECIDED,
    tenant: str = "default",
    body: bytes = b'{"vote": "approve"}',
    **headers: str | None,
) -> Case:
    """A binary-mode message (ce- headers; `ce_id=None` drops one, `ce_id="x"` sets one)."""
    event = envelope.new_event(event_type, None, tenant=tenant, event_id=f"fuzz-{uuid.uuid4().hex}")
    hdrs, _ = envelope.binary_message(event)
    for name, value in headers.items():
        key = name.replace("_", "-")
        if value is None:
            hdrs.pop(key, None)
        else:
            hdrs[key] = value
    return event_type, tenant, body, hdrs


# The named nasty cases (issue 12, and binary mode from issue 13): (type, tenant, body, headers).
NASTY: list[Case] = [
    (DECIDED, "default", b"\xc3\x28 not \xff utf-8 \xfe" * 6, None),  # invalid UTF-8, ~100 B
    (DECIDED, "default", _deep(10_000), None),  # JSON nested 10,000 deep (20 KB)
    (DECIDED, "default", _event(data=msgspec.Raw(_deep(10_000))), None),  # ... inside a CloudEvent
    (DECIDED, "default", _event(data=msgspec.Raw(_deep(envelope.MAX_DATA_DEPTH + 1))), None),
    (DECIDED, "default", b"<" * 900_000, None),  # ~900 KB that is not JSON
    (DECIDED, "default", b"\x00" * NEAR_MAX, None),  # not JSON, just under max_payload
    (DECIDED, "default", _near_max_event(), None),  # a real event just under max_payload: decided
    (DECIDED, "default", b"", None),  # empty
    (DECIDED, "default", b"null", None),
    (DECIDED, "default", _event(specversion=...), None),  # no specversion
    (DECIDED, "default", _event(id=""), None),  # empty id
    (DECIDED, "default", _event(id=7), None),  # id of the wrong type
    (DECIDED, "default", _event(type=UNKNOWN), None),  # type other than the subject's
    (DECIDED, "default", _event(tenant="acme"), None),  # tenant other than the subject's
    (DECIDED, "default", _event(data=...), None),  # no data: decided all the same
    (DECIDED, "default", _event(data=msgspec.Raw(b'"caf\xc3"')), None),  # invalid UTF-8 in a string
    (IGNORED, "default", _event(event_type=IGNORED), None),  # ignored, no handler: no_handler
    (UNKNOWN, "acme", _event(event_type=UNKNOWN, tenant="acme"), None),  # unknown_type
    (DECIDED, "default", _event(data={"vote": "approve", "pad": 7}), None),  # breaks the schema
    GOOD_BINARY := _binary(),  # a good binary-mode event: decided
    GOOD_BINARY_EMPTY := _binary(body=b""),  # binary mode without data: decided all the same
    _binary(body=b'{"vote": "approve", "pad": 7}'),  # binary mode, data breaks the schema
    _binary(ce_id=None),  # binary mode without an id
    _binary(ce_specversion=None),  # ce- headers, but no specversion
    _binary(ce_budget="lots"),  # an extension of the wrong type
    _binary(ce_type=UNKNOWN),  # type other than the subject's
    _binary(CE_ID="other"),  # the id twice, in two spellings
    _binary(content_type="text/plain", body=b"vote: approve"),  # data that is not JSON
    _binary(body=b"\xc3\x28 not \xff utf-8"),  # a body that is not UTF-8
    _binary(body=_deep(10_000)),  # data nested 10,000 deep
    _binary(IGNORED),  # ignored, no handler: no_handler
]

json_data = json_values(json_scalars(int_bits=70, text=20), key=8, width=4, leaves=30)
cloud_fields = st.dictionaries(
    st.sampled_from(["specversion", "id", "source", "type", "tenant", "data", "time", "budget"]),
    st.one_of(json_data, st.sampled_from(["1.0", DECIDED, IGNORED, "default", "acme", ""])),
)


# Header values NATS can carry (no control characters: a line break would end the header).
header_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=24)
ce_headers = st.dictionaries(
    st.sampled_from(
        ["ce-specversion", "ce-id", "ce-source", "ce-type", "ce-tenant", "ce-time", "ce-budget",
         "ce-subject", "CE-ID", "Ce-Type", "content-type", "ce-data", "ce-datacontenttype"]
    ),
    st.one_of(
        st.none(),  # drop it
        header_text,
        st.sampled_from(["1.0", DECIDED, IGNORED, UNKNOWN, "default", "acme", "", "12", "-1",
                         "application/json", "text/plain", "2026-11-30T18:00:00Z"]),
    ),
    max_size=4,
)  # fmt: skip


@st.composite
def bodies(draw: st.DrawFn) -> Case:
    event_type = draw(st.sampled_from([DECIDED, DECIDED, IGNORED, UNKNOWN]))
    tenant = draw(st.sampled_from(TENANTS))
    kind = draw(st.sampled_from(["bytes", "json", "event", "bent", "binary"]))
    if kind == "binary":  # CloudEvents binary mode: ce- headers bent by anything, any body
        body = draw(st.one_of(st.binary(max_size=200), json_data.map(msgspec.json.encode)))
        return _binary(event_type, tenant, body, **{
            k.replace("-", "_"): v for k, v in draw(ce_headers).items()
        })  # fmt: skip
    if kind == "bytes":
        body = draw(st.binary(max_size=300))
    elif kind == "json":
        body = msgspec.json.encode(draw(json_data))
    elif kind == "event":  # a well-formed event of the subject's type and tenant
        body = _event(event_type, tenant, data=draw(json_data))
    else:  # a CloudEvent with fields overwritten by anything
        doc = msgspec.json.decode(_event(event_type, tenant))
        doc.update(draw(cloud_fields))
        body = msgspec.json.encode(doc)
    return event_type, tenant, body, None


def _decodes_for(subject: str, body: bytes, headers: Headers) -> tuple[str | None, str | None]:
    """The event id a decision of this message would carry (it parses and fits its subject),
    and why its data breaks its type's schema (None: it fits, or it is no event)."""
    try:
        event = envelope.decode(body, headers)
    except envelope.MalformedEventError:
        return None, None
    if subjects.event(event.tenant, event.type) != subject:
        return None, None
    return event.id, contracts.violation(event.type, event.data)


async def test_every_byte_sequence_has_one_outcome(
    bus: Bus, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert bus.nc.max_payload == MAX_PAYLOAD
    schema_dir = tmp_path / "schemas"
    schema_dir.mkdir()
    (schema_dir / f"{DECIDED}{contracts.SUFFIX}").write_text(
        msgspec.json.encode(FUZZ_SCHEMA).decode()
    )
    monkeypatch.setenv("MESH_SCHEMA_DIR", str(schema_dir))
    get_settings.cache_clear()  # the coordinator below reads the schema folder from the settings
    assert contracts.violation(DECIDED, {"pad": 7}) is not None
    agent = voting_agent(tmp_path, "fuzz-voter", SKILL)
    loop = asyncio.get_running_loop()
    outcomes = Outcomes(bus)
    published: list[tuple[int, str | None, str]] = []  # (stream seq, event id, subject)

    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(agent.serve(bus, http=False, settings=settings))
        stop = asyncio.Event()
        coordinator = asyncio.create_task(Coordinator(bus, policy.parse(POLICIES)).run(stop))

        def found(o: Outcomes, seq: int, event_id: str | None) -> list[Decision | DeadLetter]:
            dead: list[Decision | DeadLetter] = [d for _, d in o.dead if d.stream_seq == seq]
            decided = [d for _, d in o.decisions if event_id and d.event_id == event_id]
            return dead + decided

        async def one(event_type: str, tenant: str, body: bytes, headers: Headers) -> None:
            subject = subjects.event(tenant, event_type)
            msg_id = f"fuzz-{uuid.uuid4().hex}"
            ack = await bus.publish(subject, body, msg_id=msg_id, headers=headers)
            event_id, breaks = _decodes_for(subject, body, headers)
            published.append((ack.seq, event_id, subject))
            got = await outcomes.wait_for(
                f"an outcome of seq {ack.seq} ({len(body)} bytes on {subject})",
                lambda o: found(o, ack.seq, event_id),
                timeout=30,
            )
            assert not coordinator.done(), coordinator
            [outcome] = got
            if isinstance(outcome, DeadLetter):
                assert outcome.error, outcome  # a reason that says what happened
                assert await dlq.body_of(bus, outcome) == body  # kept whole, inline or not
                if event_type == IGNORED and event_id is not None:
                    assert outcome.reason == "no_handler", outcome
                elif breaks is not None and event_type == DECIDED:
                    assert outcome.reason == "malformed", outcome
                    assert f"data breaks its schema: {breaks}" == outcome.error, outcome
            elif event_type != DECIDED:
                raise AssertionError(f"{subject} was decided: {outcome}")
            else:
                assert breaks is None, f"decided although its data breaks the schema: {breaks}"

        @settings_for_bus
        @given(case=bodies())
        @example(case=NASTY[0])
        @example(case=NASTY[1])
        @example(case=NASTY[2])
        @example(case=NASTY[3])
        @example(case=NASTY[4])
        @example(case=NASTY[5])
        @example(case=NASTY[6])
        @example(case=NASTY[7])
        @example(case=NASTY[8])
        @example(case=NASTY[9])
        @example(case=NASTY[10])
        @example(case=NASTY[11])
        @example(case=NASTY[12])
        @example(case=NASTY[13])
        @example(case=NASTY[14])
        @example(case=NASTY[15])
        @example(case=NASTY[16])
        @example(case=NASTY[17])
        @example(case=NASTY[18])
        @example(case=NASTY[19])
        @example(case=NASTY[20])
        @example(case=NASTY[21])
        @example(case=NASTY[22])
        @example(case=NASTY[23])
        @example(case=NASTY[24])
        @example(case=NASTY[25])
        @example(case=NASTY[26])
        @example(case=NASTY[27])
        @example(case=NASTY[28])
        @example(case=NASTY[29])
        @example(case=NASTY[30])
        def property_holds(case: Case) -> None:
            asyncio.run_coroutine_threadsafe(one(*case), loop).result(timeout=60)

        try:
            await asyncio.to_thread(property_holds)
            # Exactly one: once nothing is pending, no redelivery can add a second outcome.
            assert not await settled(bus)
            await outcomes.refresh()
            for seq, event_id, subject in published:
                got = found(outcomes, seq, event_id)
                assert len(got) == 1, (seq, subject, got)
            assert not coordinator.done()
            # Binary mode is read, not merely survived: decided, and its signature (over the
            # ce- headers and the body) names the publisher.
            for _, _, _, headers in (GOOD_BINARY, GOOD_BINARY_EMPTY):
                assert headers is not None
                [decision] = [d for _, d in outcomes.decisions if d.event_id == headers["ce-id"]]
                assert decision.principal, decision
        finally:
            stop.set()
            await asyncio.wait_for(coordinator, 30)
    assert len(published) >= len(NASTY)
    big = [d for _, d in outcomes.dead if d.body_ref is not None]
    assert big, "no body was large enough to be kept by reference"


settings_for_bus = hypothesis_settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # the examples are cheap to draw; nothing to remember between runs
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
