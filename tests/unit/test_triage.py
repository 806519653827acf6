"""The triage agent's deterministic rules and the ticket contract."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from agents.tickets import TicketCreated, TicketTriaged
from agents.triage.rules import triage


def ticket(title: str, body: str = "", **kw: Any) -> TicketCreated:
    return TicketCreated(id="T-1", title=title, body=body, reporter="r@example.com", **kw)


@pytest.mark.parametrize(
    "title, body, priority, team",
    [
        ("Checkout is down", "nobody can pay", "p1", "payments"),
        ("Major outage in eu-west-1", "", "p1", "platform"),
        ("API down for everyone", "", "p1", "platform"),
        ("Data loss after migration", "rows were deleted", "p1", "platform"),
        ("We lost all data in the project", "", "p1", "platform"),
        ("Possible breach", "customer emails leaked on a paste site", "p1", "security"),
        ("PHI visible to other tenants", "", "p1", "security"),
        ("Patient records were exposed in the export", "", "p1", "security"),
        ("CVE-2024-3094 in our base image", "", "p2", "security"),
        ("Customer charged twice", "two identical charges on the card", "p2", "payments"),
        ("Dashboard latency", "p99 went from 200ms to 4s, lots of timeouts", "p2", "platform"),
        ("Invoice shows the wrong VAT", "", "p3", "payments"),
        ("Export button is broken", "it crashes the tab", "p3", "support"),
        ("Something odd with my profile", "", "p3", "support"),
        ("How do I rotate an API key?", "a question about the docs", "p4", "support"),
        ("Feature request: dark mode", "would be nice", "p4", "support"),
    ],
)
def test_priority_and_team(title: str, body: str, priority: str, team: str) -> None:
    result = triage(ticket(title, body))
    assert (result.priority, result.team) == (priority, team)
    assert result.ticket_id == "T-1"


@pytest.mark.parametrize(
    "title",
    [
        "Drop-down menu renders off screen",  # "down" without saying something is down
        "Download page shows an old version",
        "Memory leak in the worker after a day",  # a leak that is a bug, not a security incident
        "Greek letter phi is rendered as a box",  # the acronym counts only in capitals
    ],
)
def test_look_alike_words_are_not_p1(title: str) -> None:
    result = triage(ticket(title))
    assert result.priority != "p1"
    assert result.team != "security"


@pytest.mark.parametrize(
    "title, raised",
    [
        ("Something odd with my profile", "p2"),
        ("Dashboard latency", "p1"),
        ("How do I rotate a key?", "p3"),
        ("Major outage", "p1"),  # p1 is the top: nothing to raise to
    ],
)
def test_enterprise_raises_one_level(title: str, raised: str) -> None:
    result = triage(ticket(title, customer_tier="enterprise"))
    assert result.priority == raised
    assert "enterprise" in result.labels
    assert any(r.startswith("enterprise customer") for r in result.reasons)


def test_unknown_tier_counts_as_standard() -> None:
    assert triage(ticket("Dashboard latency", customer_tier="premium")).priority == "p2"


def test_reasons_quote_the_words_that_decided() -> None:
    result = triage(ticket("Billing API is down", "invoices fail with 500s"))
    assert result.priority == "p1"
    assert result.team == "payments"  # money outranks platform for ownership
    assert result.reasons[0] == "p1: outage ('is down')"
    assert result.reasons[-1] == "team payments: 'Billing', 'invoices'"
    assert result.labels == ["outage", "billing", "degraded", "bug"]


def test_security_outranks_other_teams() -> None:
    result = triage(ticket("Outage after breach", "billing data leaked"))
    assert result.team == "security"
    assert "breach" in result.labels and "outage" in result.labels


def test_service_names_the_team_but_not_the_urgency() -> None:
    result = triage(ticket("Page looks wrong", service="billing-api"))
    assert (result.priority, result.team) == ("p3", "payments")
    assert result.labels == []
    assert "'billing (service)'" in result.reasons[-1]


def test_defaults_say_so() -> None:
    result = triage(ticket("Hello"))
    assert result.reasons == [
        "p3: no urgency words (default)",
        "team support: no team words (default)",
    ]


def test_contract_ignores_unknown_fields_and_requires_the_core() -> None:
    raw = {"id": "T-9", "title": "x", "body": "", "reporter": "r", "channel": "email"}
    assert msgspec.convert(raw, TicketCreated).customer_tier == "standard"
    with pytest.raises(msgspec.ValidationError, match="title"):
        msgspec.convert({"id": "T-9", "body": "", "reporter": "r"}, TicketCreated)
    out = msgspec.to_builtins(triage(msgspec.convert(raw, TicketCreated)))
    assert msgspec.convert(out, TicketTriaged).ticket_id == "T-9"
    with pytest.raises(msgspec.ValidationError, match="priority"):
        msgspec.convert({**out, "priority": "p0"}, TicketTriaged)
