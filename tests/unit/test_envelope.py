import msgspec
import pytest

from mesh import envelope, subjects


def test_round_trip_keeps_mesh_context() -> None:
    e = envelope.new_event("release.proposed", {"id": "r1"}, tenant="acme", principal="alice")
    back = envelope.decode(envelope.encode(e))
    assert back == e
    assert back.specversion == "1.0"
    assert back.tenant == "acme" and back.principal == "alice"


def test_wire_form_is_cloudevents_json() -> None:
    e = envelope.new_event("release.proposed", {"x": 1}, event_id="abc")
    doc = msgspec.json.decode(envelope.encode(e))
    assert {"specversion", "id", "source", "type", "time", "data"} <= set(doc)
    assert doc["id"] == "abc" and doc["type"] == "release.proposed"


@pytest.mark.parametrize(
    "body, field",
    [
        (b'{"specversion": "1.0", "source": "s", "type": "a.b"}', "id"),
        (b'{"id": "1", "source": "s", "type": "a.b"}', "specversion"),
        (b'{"id": "1", "source": "s", "type": "a.b", "specversion": "0.3"}', "specversion"),
        (b'{"specversion": "1.0", "id": "1", "source": "s", "type": "a b"}', "type"),
        (
            b'{"specversion": "1.0", "id": "1", "source": "s", "type": "a.b", "tenant": "x.>"}',
            "tenant",
        ),
    ],
)
def test_invalid_envelopes_name_the_problem(body: bytes, field: str) -> None:
    with pytest.raises(envelope.MalformedEventError) as err:
        envelope.decode(body)
    assert field in str(err.value) and "not a valid CloudEvent" in str(err.value)


def test_not_json_is_a_decode_error() -> None:
    with pytest.raises(msgspec.DecodeError) as err:  # still one, for callers catching msgspec's
        envelope.decode(b'{"id": "rel-9", "servi')
    assert isinstance(err.value, envelope.MalformedEventError)
    assert "not JSON" in str(err.value)


def _event(data: bytes) -> bytes:
    return b'{"specversion":"1.0","id":"e1","source":"s","type":"a.b","data":' + data + b"}"


@pytest.mark.parametrize(
    "body, says",
    [
        (b"", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (_event(b'"caf\xc3"'), "not UTF-8"),  # a cut multi-byte character inside a string
        (_event(b'"\xff"'), "not UTF-8"),
        (b"[" * 10_000 + b"]" * 10_000, "not a valid CloudEvent"),  # an array, not an object
        (_event(b"[" * 10_000 + b"]" * 10_000), "nested too deep"),
        (_event(b'{"a":' * 5_000 + b"1" + b"}" * 5_000), "nested too deep"),
        (
            _event(b"[" * (envelope.MAX_DATA_DEPTH + 1) + b"]" * (envelope.MAX_DATA_DEPTH + 1)),
            f"at most {envelope.MAX_DATA_DEPTH}",
        ),
        (b"null", "not a valid CloudEvent"),
        (b'"1.0"', "not a valid CloudEvent"),
    ],
)
def test_any_bytes_raise_only_malformed_event_error(body: bytes, says: str) -> None:
    """Whatever the bytes, decode raises one error the coordinator catches, saying why."""
    with pytest.raises(envelope.MalformedEventError) as err:
        envelope.decode(body)
    assert says in err.value.message


def test_data_as_deep_as_allowed_decodes() -> None:
    depth = envelope.MAX_DATA_DEPTH
    event = envelope.decode(_event(b'{"a":' * depth + b"1" + b"}" * depth))
    assert envelope.nesting(event.data) == depth
    assert envelope.nesting(1) == 0 and envelope.nesting([[], {}]) == 2


def test_event_subjects_round_trip() -> None:
    s = subjects.event("acme", "release.proposed")
    assert s == "mesh.evt.acme.release.proposed"
    assert subjects.parse_event_subject(s) == ("acme", "release.proposed")
    assert subjects.parse_event_subject("other.subject") == ("", "")
