"""`mesh demo`: the whole mesh as separate processes, sample events, a table of outcomes.

Each case waits for its own outcome, so the table is deterministic: the rules brain is
deterministic, and the "too slow" case pauses the quality-review process with SIGSTOP (a real
hung process, not a flag in the agent) so the policy's timeout rule decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg

import agents
from coordinator import policy
from mesh import envelope, natsauth, subjects
from mesh.bus import Bus
from mesh.dev.launcher import HomeLock, Topology, issue_identities
from mesh.dev.topology import Plan
from mesh.errors import ConfigError
from mesh.identity import IdentityDir
from mesh.records import DeadLetter, Decision, dead_letter_decoder, decision_decoder
from mesh.server import EmbeddedServer
from mesh.settings import get_settings

SAMPLES = Path(agents.__file__).parent / "samples"


@dataclass
class Case:
    title: str
    event_type: str
    expect: str  # approved | rejected | dlq:<reason>
    sample: str | None = None  # file in agents/samples
    raw: bytes | None = None  # published as-is (not an envelope)
    pause: str | None = None  # child to SIGSTOP while this case runs
    # Waits for a person (the demo policy's `release.clinical`): what the scripted approver
    # answers through the inbox ("approve" or "reject"), or None: nobody answers.
    person: str | None = None


CASES = [
    Case("clean release", "release.proposed", "approved", sample="release_clean.json"),
    Case("AWS key in the diff", "release.proposed", "rejected", sample="release_secret.json"),
    Case(
        "health data, no privacy review", "release.proposed", "rejected", sample="release_phi.json"
    ),
    Case("code changed, tests not", "release.proposed", "rejected", sample="release_untested.json"),
    Case(
        "clean release, quality-review hung",
        "release.proposed",
        "rejected",
        sample="release_clean.json",
        pause="quality-review",
    ),
    Case(
        "clinical change, safety officer approves in the inbox",
        "release.clinical",
        "approved",
        sample="release_clean.json",
        person="approve",
    ),
    Case(
        "clinical change, nobody answers: escalated, then silence denies",
        "release.clinical",
        "rejected",
        sample="release_clean.json",
    ),
    Case("malformed JSON", "release.proposed", "dlq:malformed", raw=b'{"id": "rel-9", "servi'),
    Case("unknown event type", "invoice.created", "dlq:unknown_type", sample="release_clean.json"),
]


@dataclass
class Result:
    case: Case
    event_id: str
    outcome: str
    decision: Decision | None = None
    dead_letter: DeadLetter | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome == self.case.expect


class _Outcomes:
    """Collects decisions and dead letters by event id from core subscriptions."""

    def __init__(self) -> None:
        self.by_id: dict[str, Decision | DeadLetter] = {}
        self.arrived = asyncio.Condition()

    async def on_decision(self, msg: Msg) -> None:
        d = decision_decoder.decode(msg.data)
        await self._put(d.event_id, d)

    async def on_dead_letter(self, msg: Msg) -> None:
        d = dead_letter_decoder.decode(msg.data)
        await self._put(d.event_id or "", d)

    async def _put(self, key: str, value: Decision | DeadLetter) -> None:
        async with self.arrived:
            self.by_id[key] = value
            self.arrived.notify_all()

    async def wait(self, event_id: str, timeout: float) -> Decision | DeadLetter | None:
        async with self.arrived:
            # `asyncio.timeout`, not `wait_for`: on Python 3.11 `wait_for` can swallow a Ctrl-C
            # that lands as the outcome arrives, and the demo then ran on after "stopping…".
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.arrived.wait_for(lambda: event_id in self.by_id)
            return self.by_id.get(event_id)


# `mesh demo` adds this to the shipped policies: people after the agents, on short clocks.
DEMO_POLICY = """
# `mesh demo` only: a clinical change a clinical safety officer signs off after the agents;
# unanswered for 3 s, the head of safety may answer too; unanswered for 6 s, silence rejects.
["release.clinical"]
skills = ["release-security-review", "release-quality-review"]
rule = { kind = "unanimous" }
agent_timeout_s = 1.5
deadline_s = 4.0
decision_type = "release.clinical.decided"
humans = [{ role = "clinical-safety-officer", wait_s = 6, escalate = [
    { role = "head-of-safety", after_s = 3 } ] }]
"""
APPROVER_ROLE = "clinical-safety-officer"
HUMAN_WAIT_S = 6.0


async def _scripted_approver(person: Bus, event_id: str, answer: str) -> None:
    """What a person does in `mesh approvals`: find the request, read it, answer it, signed."""
    from mesh import approvals

    assert person.identity is not None
    while True:  # bounded by the case's own timeout (the task is cancelled then)
        found = await approvals.inbox(person, "default", None)
        request = next(
            (r for r in found.values() if r.event_id == event_id and r.status == "open"), None
        )
        if request is not None:
            break
        await asyncio.sleep(0.1)
    vote = approvals.answer(
        person.identity.signer(),
        request,
        by=person.identity.name,
        answer="approve" if answer == "approve" else "reject",
        reason="dose range checked against the formulary (scripted approver)",
    )
    await approvals.submit(person, vote)


async def run_cases(
    bus: Bus,
    topo: Topology,
    cases: list[Case],
    *,
    publisher: Bus | None = None,
    person: Bus | None = None,
) -> list[Result]:
    """Publish each case (as `publisher`, default `bus`) and wait for its outcome on `bus`;
    `person` answers the cases that wait for one."""
    publisher = publisher or bus
    outcomes = _Outcomes()
    await bus.nc.subscribe(f"{subjects.DECISIONS_ROOT}.>", cb=outcomes.on_decision)
    await bus.nc.subscribe(f"{subjects.DLQ_ROOT}.>", cb=outcomes.on_dead_letter)
    await bus.nc.flush()
    results = []
    for case in cases:
        event_id = f"demo-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        approver = (
            asyncio.create_task(_scripted_approver(person, event_id, case.person))
            if person is not None and case.person is not None
            else None
        )
        with _paused(topo, case.pause):
            if case.raw is not None:
                await publisher.publish(
                    subjects.event("default", case.event_type),
                    case.raw,
                    msg_id=publisher.event_msg_id("default", event_id),
                )
            else:
                assert case.sample is not None
                data = json.loads((SAMPLES / case.sample).read_text())
                await publisher.publish_event(
                    envelope.new_event(
                        case.event_type, data, event_id=event_id, source="mesh://demo"
                    )
                )
            got = await outcomes.wait(event_id, timeout=20)
        if approver is not None:
            approver.cancel()
            with contextlib.suppress(BaseException):
                await approver
        seconds = time.monotonic() - started
        if isinstance(got, Decision):
            results.append(Result(case, event_id, got.outcome, decision=got, seconds=seconds))
        elif isinstance(got, DeadLetter):
            results.append(
                Result(case, event_id, f"dlq:{got.reason}", dead_letter=got, seconds=seconds)
            )
        else:
            results.append(Result(case, event_id, "no outcome within 20s", seconds=seconds))
    return results


@contextlib.contextmanager
def _paused(topo: Topology, name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    child = topo.child(name)
    child.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        child.proc.send_signal(signal.SIGCONT)


def check(plan: Plan) -> None:
    """The cases need the agents they pause to be in the plan (`demo = true` in mesh.toml)."""
    names = {a.name for a in plan.agents}
    for case in CASES:
        if case.pause is not None and case.pause not in names:
            raise ConfigError(
                f"{plan.source}: `mesh demo` pauses {case.pause} in its case "
                f"{case.title!r}, but no [[agents]] table for it has demo = true",
                hint=f"mark the agent {case.pause} with demo = true (the shipped mesh.toml does)",
            )


async def demo(plan: Plan, log_dir: Path | None = None) -> tuple[list[Result], Path]:
    """Start the plan's processes from scratch in a temp store, run the cases, stop
    everything.

    Secured like `mesh up`: a fresh identity folder in `log_dir`, one identity per process, the
    server admitting exactly them. The demo itself creates the streams as the operator and
    publishes the sample events as a publisher of the tenant `default`."""
    check(plan)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="mesh-demo-"))
    # Its folder is its own (a second demo given the same folder refuses, as `mesh up` does).
    with HomeLock(log_dir, "mesh demo"):
        return await _demo(plan, log_dir)


async def _demo(plan: Plan, log_dir: Path) -> tuple[list[Result], Path]:
    ids = IdentityDir.init(log_dir / "identity")
    issue_identities(ids, plan)  # before the server starts: it admits them from the start
    publisher_identity = natsauth.ensure_identity(ids, "publisher", "demo", tenant="default")
    approver_identity = ids.issue(
        "human", "demo-safety-officer", tenant="default", claims=[APPROVER_ROLE]
    )
    policy_file = log_dir / "policies.toml"
    policy_file.write_text(policy.DEFAULT_FILE.read_text() + DEMO_POLICY)
    operator = get_settings().model_copy(
        update={"identity": ids.operator_path, "trust": ids.trust_path, "nats_creds": None}
    )
    with EmbeddedServer(log_dir / "jetstream", auth=ids) as server:
        topo = Topology(
            server.url,
            log_dir / "logs",
            identities=ids,
            extra_env={"MESH_POLICY_FILE": str(policy_file)},
        )
        try:
            async with await Bus.connect(server.url, name="demo", settings=operator) as bus:
                await bus.ensure()  # before any other process: only the operator may
                topo.start(plan)
                publisher = operator.model_copy(update={"identity": publisher_identity})
                async with await Bus.connect(
                    server.url, name="demo-publisher", settings=publisher
                ) as pub:
                    await topo.wait_ready(bus, agents=plan.instances)
                    as_person = operator.model_copy(update={"identity": approver_identity})
                    async with await Bus.connect(
                        server.url, name="demo-approver", settings=as_person
                    ) as person:
                        results = await run_cases(bus, topo, CASES, publisher=pub, person=person)
        finally:
            topo.stop()
    return results, log_dir


def votes_summary(decision: Decision) -> list[str]:
    marks = {"approve": "✓", "reject": "✗", "abstain": "-"}
    lines = []
    for v in decision.votes:
        name = (v.agent or v.skill).removesuffix("-review")
        if v.outcome == "voted" and v.verdict:
            reason = "; ".join(v.verdict.reasons)
            lines.append(
                f"{marks[v.verdict.vote]} {name:<10} {v.verdict.vote:<7} "
                f"{v.latency_ms:>5.0f} ms  {reason}"
            )
        else:
            counted = f" → counts as {v.counted_as}" if v.counted_as else ""
            what = v.error if v.brain == "" and v.skill.startswith("human:") else ""
            lines.append(
                f"⏱ {name:<10} {v.outcome:<7} {v.latency_ms:>5.0f} ms  "
                f"{what or f'{v.attempts} attempt(s)'}, no vote{counted}"
            )
    return lines


def as_json(results: list[Result]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        record = r.decision or r.dead_letter
        out.append(
            {
                "title": r.case.title,
                "event_id": r.event_id,
                "expect": r.case.expect,
                "outcome": r.outcome,
                "ok": r.ok,
                "record": msgspec.to_builtins(record) if record else None,
            }
        )
    return out
