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
    with pytest.raises(msgspec.ValidationError) as err:
        envelope.decode(body)
    assert field in str(err.value)


def test_not_json_is_a_decode_error() -> None:
    with pytest.raises(msgspec.DecodeError):
        envelope.decode(b'{"id": "rel-9", "servi')


def test_event_subjects_round_trip() -> None:
    s = subjects.event("acme", "release.proposed")
    assert s == "mesh.evt.acme.release.proposed"
    assert subjects.parse_event_subject(s) == ("acme", "release.proposed")
    assert subjects.parse_event_subject("other.subject") == ("", "")
