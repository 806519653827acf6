"""Masking before the model: fields by JSON path, detectors, restoring, counting."""

from __future__ import annotations

import json

import pytest

from mesh.errors import ConfigError
from mesh.redact import Redactor, parse_path

SECRETS = {
    "email": "jane.doe@example.org",
    "phone": "+44 20 7946 0958",
    "iban": "GB82 WEST 1234 5698 7654 32",
    "card": "4111 1111 1111 1111",
    "aws_key": "AKIAIOSFODNN7EXAMPLE",
}


def payload() -> dict[str, object]:
    return {
        "patient": {"name": "Jane Doe", "mrn": 98761},
        "notes": [
            f"contact {SECRETS['email']} or {SECRETS['phone']}",
            f"refund to {SECRETS['iban']}, card {SECRETS['card']}",
            f"leaked key {SECRETS['aws_key']}",
        ],
        "build": 2024113012345,  # a long number that is no phone, card or IBAN
        "version": "1.2.3",
    }


def test_fields_and_detectors_are_masked_and_counted() -> None:
    r = Redactor(fields=["$.patient.name", "$.patient.mrn"], detectors=sorted(SECRETS))
    masked = r.mask(payload())
    text = json.dumps(masked.value)
    for value in [*SECRETS.values(), "Jane Doe", "98761"]:
        assert value not in text, value
    assert masked.counts == {"field": 2, "email": 1, "card": 1, "iban": 1, "phone": 1, "aws_key": 1}
    assert masked.value["build"] == 2024113012345 and masked.value["version"] == "1.2.3"
    # The same value gets the same placeholder: the model can still tell they are one.
    again = r.mask({"a": SECRETS["email"], "b": SECRETS["email"]})
    assert again.value["a"] == again.value["b"] == "[[EMAIL_1]]"
    assert SECRETS["email"] not in repr(again)


def test_restore_puts_values_back_into_the_answer() -> None:
    r = Redactor(fields=["$.patient.mrn"], detectors=["email"])
    masked = r.mask(payload())
    mrn = masked.value["patient"]["mrn"]
    answer = {"reasons": ["write to [[EMAIL_1]]"], "mrn": mrn, "other": "[[EMAIL_9]]"}
    assert masked.restore(answer) == {
        "reasons": [f"write to {SECRETS['email']}"],
        "mrn": 98761,  # a whole placeholder comes back with its original type
        "other": "[[EMAIL_9]]",  # not one this payload made
    }


def test_luhn_and_iban_checks_spare_lookalikes() -> None:
    r = Redactor(detectors=["card", "iban"])
    masked = r.mask(["4111 1111 1111 1112", "GB82 WEST 1234 5698 7654 33"])
    assert masked.value == ["4111 1111 1111 1112", "GB82 WEST 1234 5698 7654 33"]


def test_paths_with_wildcards() -> None:
    assert parse_path("$.a[*].b[0]") == ["a", None, "b", 0]
    r = Redactor(fields=["$.people[*].name"])
    masked = r.mask({"people": [{"name": "A"}, {"name": "B"}, {"x": 1}]})
    assert masked.value == {"people": [{"name": "[[FIELD_1]]"}, {"name": "[[FIELD_2]]"}, {"x": 1}]}
    with pytest.raises(ConfigError, match="not a JSON path"):
        Redactor(fields=["people.name"])
    with pytest.raises(ConfigError, match="unknown redaction detector"):
        Redactor(detectors=["ssn"])
