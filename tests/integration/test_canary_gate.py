"""The canary gate on a real nats-server, with real processes: two versions of one voter (the
same code, labels 1.0 and 2.0, the candidate contrary), a coordinator whose policy asks the
candidate in shadow. The candidate disagrees on every event; past the policy's threshold it
is stopped: the canaries bucket says so, a `canary_stopped` audit record and an alert are
written once, and later decisions no longer ask it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg
from typer.testing import CliRunner

from coordinator.canary import ALERT_KIND, SYSTEM_TENANT, Book, CanaryState, key_of
from mesh import envelope, subjects
from mesh.audit import AuditRecord
from mesh.bus import Bus
from mesh.cli import app
from mesh.cli._common import EXIT_NOT_FOUND
from mesh.registry import Registry
from mesh.server import EmbeddedServer
from mesh.settings import Settings
from tests.support import samples
from tests.support.launcher import CARD_TTL_S, HEARTBEAT_S, ProcessMesh, clocks
from tests.support.outcomes import Outcomes
from tests.support.waits import all_alive, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

AGENT, SKILL, TYPE = "gate", "gate-review", "vote.canary"
MIN_SAMPLE = 4


@pytest.fixture
def settings() -> Settings:
    return Settings(heartbeat_s=HEARTBEAT_S, card_ttl_s=CARD_TTL_S, http_port=0)


@pytest.fixture
def procs(nats_server: EmbeddedServer, bus: Bus, tmp_path: Path) -> Iterator[ProcessMesh]:
    with ProcessMesh(nats_server.url, tmp_path, clocks(), server=nats_server) as mesh:
        yield mesh


async def _versions(bus: Bus) -> dict[str, str]:
    """label → composite version of the live replicas of AGENT."""
    return {
        r.version.rpartition("+")[0]: r.version
        for r in await Registry(bus).live()
        if r.agent == AGENT
    }


async def test_a_shadow_candidate_that_disagrees_is_stopped_audited_and_alerted(
    procs: ProcessMesh, bus: Bus
) -> None:
    stable = procs.voter(AGENT, SKILL, {"MESH_AGENT_VERSION": "1.0"})
    candidate = procs.voter(AGENT, SKILL, {"MESH_AGENT_VERSION": "2.0", "VOTER_CONTRARY": "1"})
    await procs.wait_agents(bus, [AGENT], pids=[stable.proc.pid, candidate.proc.pid])
    versions = await _versions(bus)
    assert set(versions) == {"1.0", "2.0"} and versions["1.0"] != versions["2.0"]
    cand = versions["2.0"]
    shadow = {
        "agent": AGENT,
        "version": cand,
        "share": 1.0,
        "min_sample": MIN_SAMPLE,
        "max_disagreement": 0.5,
    }
    policy = procs.policy(
        {TYPE: samples.policy([SKILL], decision_type="vote.canary.decided", shadow=shadow)}
    )
    coordinator = procs.coordinator(policy)
    await procs.wait_consuming(coordinator)

    alerts: list[Msg] = []

    async def on_alert(msg: Msg) -> None:
        alerts.append(msg)

    sub = await bus.nc.subscribe(subjects.alert("*", ">"), cb=on_alert)
    outcomes = Outcomes(bus)
    kv = await bus.kv(subjects.CANARIES_BUCKET)

    async def state() -> CanaryState | None:
        try:
            entry = await kv.get(key_of(AGENT, cand))
        except Exception:
            return None
        return msgspec.json.decode(entry.value, type=CanaryState) if entry.value else None

    alive = all_alive(stable, candidate, coordinator)
    ids: list[str] = []
    async with outcomes.watching():
        # One event at a time until the gate stops the candidate: each is decided by the stable
        # version (approve) while the candidate, asked in shadow, says reject.
        for i in range(3 * MIN_SAMPLE):
            current = await state()
            if current is not None and current.state == "stopped":
                break
            event_id = f"c{i}"
            ids.append(event_id)
            await bus.publish_event(
                envelope.new_event(TYPE, {"vote": "approve"}, tenant="acme", event_id=event_id)
            )
            missing = await outcomes.wait_all([event_id], timeout=30, alive=alive)
            assert not missing, procs.logs_tail()
            await eventually(
                lambda i=i: _counted(state, i), f"event {event_id} counted by the gate", timeout=10
            )
        stopped = await state()
        assert stopped is not None and stopped.state == "stopped", stopped
        assert stopped.compared == MIN_SAMPLE and stopped.disagreed == MIN_SAMPLE
        for event_id in ids:
            d = outcomes.decision(event_id)
            assert d is not None and d.outcome == "approved"  # the shadow never counted
            assert [v.version for v in d.votes] == [versions["1.0"]]
            (sv,) = d.shadow_votes
            assert sv.shadow and sv.version == cand and sv.verdict is not None
            assert sv.verdict.vote == "reject" and sv.counted_as is None

        # Audited once, in the system chain, and alerted once.
        msg = await bus.js.get_last_msg(
            subjects.AUDIT_STREAM, subjects.audit(SYSTEM_TENANT, "canary_stopped")
        )
        record = msgspec.json.decode(msg.data, type=AuditRecord)
        assert record.kind == "canary_stopped" and record.data["version"] == cand
        await eventually(lambda: len(alerts) == 1, "the alert", timeout=10)
        assert alerts[0].subject == subjects.alert(SYSTEM_TENANT, ALERT_KIND)

        # Stopped: no more traffic to the candidate.
        after = "c-after"
        await bus.publish_event(
            envelope.new_event(TYPE, {"vote": "approve"}, tenant="acme", event_id=after)
        )
        assert not await outcomes.wait_all([after], timeout=30, alive=alive)
        d = outcomes.decision(after)
        assert d is not None and d.outcome == "approved" and not d.shadow_votes
    await sub.unsubscribe()


async def _counted(state: object, i: int) -> bool:
    s = await state()  # type: ignore[operator]
    return s is not None and s.compared >= i + 1


def test_mesh_canary_stop_status_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    """By hand: `mesh canary stop` stops (state, audit record), `status` shows it, `resume`
    forgets it, and resuming what the gate never counted is "not found"."""
    cand = "2.0+0123456789ab"
    with EmbeddedServer() as server:
        monkeypatch.setenv("MESH_NATS_URL", server.url)
        runner = CliRunner()
        assert runner.invoke(app, ["canary", "status", "--json"]).stdout.strip() == "[]"
        stopped = runner.invoke(app, ["canary", "stop", AGENT, cand, "--reason", "bad canary"])
        assert stopped.exit_code == 0, stopped.output
        status = runner.invoke(app, ["canary", "status", "--json"])
        [row] = msgspec.json.decode(status.stdout)
        assert (row["agent"], row["version"], row["state"]) == (AGENT, cand, "stopped")
        assert row["reason"] == "bad canary"
        audited = runner.invoke(app, ["audit", "ls", "--json", "--tenant", SYSTEM_TENANT])
        assert any(r["kind"] == "canary_stopped" for r in msgspec.json.decode(audited.stdout))
        assert runner.invoke(app, ["canary", "resume", AGENT, cand]).exit_code == 0
        assert runner.invoke(app, ["canary", "status", "--json"]).stdout.strip() == "[]"
        missing = runner.invoke(app, ["canary", "resume", AGENT, cand])
        assert missing.exit_code == EXIT_NOT_FOUND, missing.output


async def test_a_canary_that_disagrees_with_its_peers_is_stopped_and_stable_takes_over(
    procs: ProcessMesh, bus: Bus
) -> None:
    """Canary mode, all events to the candidate (share 1.0): its vote counts (the decisions are
    rejected) and disagrees with the peer voter's; past the gate it is stopped and the next
    events are answered by the stable version."""
    peer = procs.voter("peer", "peer-review")
    stable = procs.voter(AGENT, SKILL, {"MESH_AGENT_VERSION": "1.0"})
    candidate = procs.voter(AGENT, SKILL, {"MESH_AGENT_VERSION": "2.0", "VOTER_CONTRARY": "1"})
    await procs.wait_agents(
        bus, [AGENT, "peer"], pids=[peer.proc.pid, stable.proc.pid, candidate.proc.pid]
    )
    versions = await _versions(bus)
    cand = versions["2.0"]
    canary = {"agent": AGENT, "version": cand, "share": 1.0, "min_sample": MIN_SAMPLE}
    body = samples.policy(
        ["peer-review", SKILL], decision_type="vote.canary.decided", canary=canary
    )
    coordinator = procs.coordinator(procs.policy({TYPE: body}))
    await procs.wait_consuming(coordinator)
    alive = all_alive(peer, stable, candidate, coordinator)
    kv = await bus.kv(subjects.CANARIES_BUCKET)

    async def stopped() -> bool:
        try:
            entry = await kv.get(key_of(AGENT, cand))
        except Exception:
            return False
        return msgspec.json.decode(entry.value, type=CanaryState).state == "stopped"

    outcomes = Outcomes(bus)
    async with outcomes.watching():
        before = [f"k{i}" for i in range(MIN_SAMPLE)]
        for event_id in before:
            await bus.publish_event(
                envelope.new_event(TYPE, {"vote": "approve"}, tenant="acme", event_id=event_id)
            )
        assert not await outcomes.wait_all(before, timeout=30, alive=alive), procs.logs_tail()
        for event_id in before:
            d = outcomes.decision(event_id)
            assert d is not None and d.outcome == "rejected"  # the canary's vote counted
            assert [v.version for v in d.votes if v.agent == AGENT] == [cand]
        await eventually(stopped, "the canary stopped by the gate", timeout=15)
        # Every coordinator re-reads the bucket each second; this one stopped it itself.
        after = [f"k-after-{i}" for i in range(3)]
        for event_id in after:
            await bus.publish_event(
                envelope.new_event(TYPE, {"vote": "approve"}, tenant="acme", event_id=event_id)
            )
        assert not await outcomes.wait_all(after, timeout=30, alive=alive), procs.logs_tail()
        for event_id in after:
            d = outcomes.decision(event_id)
            assert d is not None and d.outcome == "approved", d
            assert [v.version for v in d.votes if v.agent == AGENT] == [versions["1.0"]]


async def test_the_book_reads_the_bucket_again_only_when_it_changed(bus: Bus) -> None:
    """A coordinator refreshes its view of the stopped candidates every second. Listing the
    bucket's keys costs an ephemeral consumer that the server keeps for minutes after (they piled
    up to ~300 per coordinator): a refresh of an unchanged bucket must not list it."""
    book, other = await Book.on_bus(bus, name="c1"), await Book.on_bus(bus, name="c2")

    async def consumers() -> int:
        info = await bus.js.stream_info(subjects.kv_stream(subjects.CANARIES_BUCKET))
        return int(info.state.consumer_count)

    await book.refresh()
    await other.stop(AGENT, "2.0+x", "by hand", mode="canary")
    await book.refresh()
    assert book.stopped == {(AGENT, "2.0+x")}
    before = await consumers()
    for _ in range(5):
        await book.refresh()
    assert await consumers() == before
    assert book.stopped == {(AGENT, "2.0+x")}
    assert await other.resume(AGENT, "2.0+x")
    await book.refresh()
    assert book.stopped == frozenset()
