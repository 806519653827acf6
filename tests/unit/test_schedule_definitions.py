"""Schedules without a server: what a definition says, and the event each firing becomes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mesh import schedules, subjects
from mesh.errors import ConfigError

T0 = datetime(2026, 11, 30, 21, 0, 0, tzinfo=UTC)


def test_a_definition_says_when_and_where_in_adr_51_headers() -> None:
    every = schedules.schedule("sweep", "compliance.sweep", {"a": 1}, tenant="acme", every="90s")
    assert every.headers() == {
        subjects.H_SCHEDULE: "@every 90s",
        subjects.H_SCHEDULE_TARGET: "mesh.sched.fire.acme.sweep",
        "Nats-Schedule-TTL": schedules.FIRING_TTL,
    }
    cron = schedules.schedule("daily", "x.y", cron="0 0 6 * * mon-fri", time_zone="Europe/Paris")
    assert cron.headers()[subjects.H_SCHEDULE] == "0 0 6 * * mon-fri"
    assert cron.headers()[subjects.H_SCHEDULE_TIME_ZONE] == "Europe/Paris"
    assert schedules.schedule("t", "x", every=timedelta(minutes=5)).spec == "@every 300s"
    once = schedules.one_shot("e-1", "x", at=timedelta(seconds=30), now=T0)
    assert once.spec == "@at 2026-11-30T21:00:30Z"
    assert schedules.decode(schedules.encode(every)) == every


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"every": "1s", "cron": "@hourly"}, "exactly one"),
        ({}, "exactly one"),
        ({"every": "soon"}, "duration"),
        ({"every": "1s", "time_zone": "UTC"}, "cron only"),
        ({"every": "1s", "tenant": "a.b"}, "tenant"),
    ],
)
def test_a_bad_schedule_is_refused_naming_why(kwargs: dict[str, str], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        schedules.schedule("s", "x.y", **kwargs)  # type: ignore[arg-type]


def test_a_name_with_a_dot_or_wildcard_is_refused() -> None:
    for name in ("a.b", "a*", "a>", ""):
        with pytest.raises(ConfigError, match="name"):
            schedules.schedule(name, "x", every="1s")


def test_each_firing_is_its_own_event_and_a_redelivery_the_same() -> None:
    sweep = schedules.schedule("sweep", "compliance.sweep", {"a": 1}, tenant="acme", every="1s")
    first = schedules.firing_event(sweep, seq=10, stored=T0)
    again = schedules.firing_event(sweep, seq=10, stored=T0 + timedelta(microseconds=300))
    second = schedules.firing_event(sweep, seq=12, stored=T0 + timedelta(seconds=1))
    assert first.id == again.id
    assert second.id != first.id
    # A stream made anew restarts its sequences: the same sequence at another time is another id.
    assert schedules.firing_event(sweep, seq=10, stored=T0 + timedelta(days=1)).id != first.id
    assert (first.type, first.tenant, first.data, first.time) == (
        "compliance.sweep",
        "acme",
        {"a": 1},
        T0,
    )
    assert first.source == "mesh://schedule/acme/sweep"


def test_a_follow_up_is_named_and_identified_by_its_event_id() -> None:
    one = schedules.one_shot("check-7", "x", at=T0, tenant="acme")
    two = schedules.one_shot("check-7", "x", at=T0 + timedelta(hours=1), tenant="acme")
    other_tenant = schedules.one_shot("check-7", "x", at=T0, tenant="globex")
    assert one.name == two.name != other_tenant.name
    assert schedules.firing_event(one, seq=3, stored=T0).id == "check-7"
    assert schedules.firing_event(two, seq=99, stored=T0).id == "check-7"
    with pytest.raises(ConfigError, match="event id"):
        schedules.one_shot("", "x", at=T0)
    with pytest.raises(ConfigError, match="time zone"):
        schedules.one_shot("e", "x", at=datetime(2026, 1, 1))


def test_a_firing_that_is_not_a_definition_is_not_decoded() -> None:
    with pytest.raises(ValueError, match="not a schedule"):
        schedules.decode(b'{"name": "x"}')
    with pytest.raises(ValueError, match="not a schedule"):
        schedules.decode(b"\xff")


def test_the_same_schedule_built_in_another_key_order_is_the_same_definition() -> None:
    one = schedules.schedule("s", "x", {"a": 1, "b": {"c": 2, "d": 3}}, every="1s")
    two = schedules.schedule("s", "x", {"b": {"d": 3, "c": 2}, "a": 1}, every="1s")
    assert schedules.encode(one) == schedules.encode(two)
