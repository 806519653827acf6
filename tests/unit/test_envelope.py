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


# -- binary content mode (CloudEvents NATS binding: ce- headers, data as the body) ----------------
def _binary(**overrides: str | None) -> tuple[dict[str, str], bytes]:
    e = envelope.new_event("release.proposed", {"id": "r1"}, tenant="acme", event_id="b-1")
    e.budget = 1200
    headers, body = envelope.binary_message(e)
    for name, value in overrides.items():
        key = name.replace("_", "-")
        if value is None:
            headers.pop(key, None)
        else:
            headers[key] = value
    return headers, body


def test_binary_mode_round_trips_to_the_same_event() -> None:
    e = envelope.new_event("release.proposed", {"id": "r1"}, tenant="acme", principal="alice")
    e.budget = 1200
    e.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers, body = envelope.binary_message(e)
    assert headers["ce-type"] == "release.proposed" and headers["ce-budget"] == "1200"
    assert headers["content-type"] == "application/json"
    assert msgspec.json.decode(body) == {"id": "r1"}
    assert envelope.decode(body, headers) == e


def test_binary_mode_header_names_are_case_insensitive_and_extra_headers_ignored() -> None:
    headers, body = _binary()
    mixed = {k.upper() if k.startswith("ce-") else k: v for k, v in headers.items()}
    mixed["Nats-Msg-Id"] = "x"
    mixed["ce-unknownext"] = "kept out of the Event"
    assert envelope.decode(body, mixed) == envelope.decode(body, headers)


def test_binary_mode_without_data_and_without_content_type() -> None:
    headers, _ = _binary(content_type=None)
    event = envelope.decode(b"", headers)
    assert event.data is None and event.datacontenttype == "application/json"


@pytest.mark.parametrize(
    "overrides, body, says",
    [
        ({"ce_id": None}, None, "id"),
        ({"ce_specversion": None}, None, "specversion"),
        ({"ce_specversion": "0.3"}, None, "specversion"),
        ({"ce_budget": "lots"}, None, "budget"),
        ({"ce_type": "a b"}, None, "type"),
        ({"ce_tenant": "x.>"}, None, "tenant"),
        ({"ce_time": "yesterday"}, None, "time"),
        ({"content_type": "application/xml"}, None, "is not JSON"),
        ({"CE-ID": "other"}, None, "given twice"),
        ({"ce_source": "caf\udce9"}, None, "not UTF-8"),
        ({}, b"{not json", "data not JSON"),
        ({}, b'"caf\xc3"', "not UTF-8"),
        ({}, b"[" * 10_000 + b"]" * 10_000, "nested too deep"),
        ({}, b"[" * 33 + b"]" * 33, "nests 33 levels"),
    ],
)
def test_bad_binary_messages_raise_only_malformed_event_error(
    overrides: dict[str, str | None], body: bytes | None, says: str
) -> None:
    headers, good_body = _binary(**overrides)
    with pytest.raises(envelope.MalformedEventError) as err:
        envelope.decode(good_body if body is None else body, headers)
    assert says in str(err.value), err.value
    assert "binary mode" in str(err.value) or "nests" in says, err.value


def test_a_structured_body_without_ce_headers_stays_structured() -> None:
    e = envelope.new_event("release.proposed", {"id": "r1"})
    assert not envelope.is_binary({"Nats-Msg-Id": "1", "traceparent": "t"})
    assert envelope.decode(envelope.encode(e), {"Nats-Msg-Id": "1"}) == e


def test_signed_content_covers_binary_attributes() -> None:
    headers, body = _binary()
    assert envelope.signed_content({"Nats-Msg-Id": "1"}, body) == body  # structured: the body
    signed = envelope.signed_content(headers, body)
    assert signed != body and signed.endswith(b"\0" + body)
    assert envelope.signed_content({**headers, "ce-id": "b-2"}, body) != signed
    assert envelope.signed_content({**headers, "Nats-Msg-Id": "x"}, body) == signed
    # NATS strips outer blanks of header values: so does what the signature covers.
    assert envelope.signed_content({**headers, "ce-id": " b-1 "}, body) == signed


def test_an_event_that_cannot_be_headers_is_refused_in_binary_mode() -> None:
    e = envelope.new_event("release.proposed", {"id": "r1"}, source="a\r\nce-id: forged")
    with pytest.raises(envelope.MalformedEventError, match="line break"):
        envelope.binary_message(e)
