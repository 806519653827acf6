"""`mesh eval`: how often an agent, or a whole policy, says what a labelled dataset says it
should (issue 18, point 3).

A dataset is JSONL, one case a line: `{"id": …, "data": <event data>, "expected": "approve"}`,
or `expected` a mapping whose keys name what is evaluated (an agent name, a skill id, or
`decision` for a policy's outcome), so one file can label every reviewer at once
(agents/datasets/reviewers.jsonl). Past decisions exported with `export_decisions` are cases
too: the decision's outcome and each voter's vote are their labels.

Against an agent, each case is asked over the mesh exactly as the coordinator asks a voter (an
A2A SendMessage over NATS with the question's metadata), and the answer counts only if its
signature verifies with the key the instance's verified card binds (`mesh.votes.refusal`, what
`coordinator.dispatch` checks): an unsigned or forged answer is `invalid`, never agreement.
Against a policy, every skill's agent is asked the same way and the votes are tallied in-process
by the decision core's own count (`coordinator.decide.count`): real agents, no ledger, nothing
published, so evaluating never touches a tenant's decisions.

Every case gets a fresh event id per run (the agents answer a repeated messageId with the task
they already have). Latency is the call's, as the caller saw it; tokens and cost are what the
answer's metadata says (`inputTokens`, `outputTokens`, `costUsd`), absent when it says nothing.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from coordinator.decide import count, unanswered
from coordinator.policy import Policy
from mesh import envelope, subjects, votes
from mesh.a2a.client import AgentClient, artifact_metadata, task_of, user_message, verdict_of
from mesh.errors import (
    AgentCallError,
    AgentTimeoutError,
    ConfigError,
    NoAnswerError,
    NotFoundError,
)
from mesh.records import CallOutcome, Vote
from mesh.registry import Registry, RegistryView

EVAL_TENANT = "eval"  # the tenant named in eval questions (nothing is published for it)
DECISION = "decision"  # the label key of a policy's outcome


@dataclass(frozen=True)
class Case:
    id: str
    data: Any
    expected: Mapping[str, str]  # what is evaluated → its label ("*": any)


def load(path: Path) -> list[Case]:
    """The cases of a JSONL dataset; ConfigError naming the line of the first bad one."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise NotFoundError(f"cannot read the dataset {path}: {e.strerror}") from None
    cases = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            cases.append(_case(doc, n))
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(
                f"{path}:{n}: not a case ({e})",
                hint='each line: {"data": …, "expected": "approve"} or an exported decision',
            ) from None
    if not cases:
        raise ConfigError(f"{path} holds no cases")
    return cases


def _case(doc: dict[str, Any], n: int) -> Case:
    if "decision" in doc and "event" in doc:  # an exported decision
        d = doc["decision"]
        labels = {DECISION: str(d["outcome"])}
        for v in d.get("votes", []):
            if v.get("verdict"):
                labels[v["agent"]] = labels[v["skill"]] = str(v["verdict"]["vote"])
        return Case(str(doc["event"]["id"]), doc["event"].get("data"), labels)
    expected = doc["expected"]
    labels = (
        {"*": expected}
        if isinstance(expected, str)
        else {str(k): str(v) for k, v in expected.items()}
    )
    return Case(str(doc.get("id", n)), doc["data"], labels)


@dataclass(frozen=True)
class Result:
    case: str
    expected: str | None  # None: the case has no label for this target
    got: str  # approve/reject/abstain, a policy outcome, or what went wrong (timeout, invalid…)
    latency_ms: float
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    error: str = ""


@dataclass
class Report:
    target: str
    results: list[Result] = field(default_factory=list)

    @property
    def labelled(self) -> list[Result]:
        return [r for r in self.results if r.expected is not None]

    @property
    def agreement(self) -> float | None:
        """Share of labelled cases answered as labelled (None: nothing labelled)."""
        labelled = self.labelled
        if not labelled:
            return None
        return sum(r.got == r.expected for r in labelled) / len(labelled)

    def confusion(self) -> dict[str, dict[str, int]]:
        """expected → got → cases."""
        table: dict[str, Counter[str]] = {}
        for r in self.labelled:
            table.setdefault(str(r.expected), Counter())[r.got] += 1
        return {k: dict(sorted(v.items())) for k, v in sorted(table.items())}

    def latency(self) -> dict[str, float]:
        ms = sorted(r.latency_ms for r in self.results)
        if not ms:
            return {}
        p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
        return {"p50": round(statistics.median(ms), 2), "p95": round(p95, 2), "max": ms[-1]}

    def usage(self) -> dict[str, float | int | None]:
        def total(values: Iterable[float | int | None]) -> float | int | None:
            known = [v for v in values if v is not None]
            return sum(known) if known else None

        return {
            "input_tokens": total(r.input_tokens for r in self.results),
            "output_tokens": total(r.output_tokens for r in self.results),
            "cost_usd": total(r.cost_usd for r in self.results),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "cases": len(self.results),
            "labelled": len(self.labelled),
            "agreement": self.agreement,
            "confusion": self.confusion(),
            "latency_ms": self.latency(),
            "usage": self.usage(),
            "disagreements": [
                {"case": r.case, "expected": r.expected, "got": r.got, "error": r.error}
                for r in self.labelled
                if r.got != r.expected
            ],
        }


def side_by_side(one: Report, other: Report) -> dict[str, Any]:
    """Where two targets answered the same cases differently, and how often they agree."""
    theirs = {r.case: r for r in other.results}
    both = [(r, theirs[r.case]) for r in one.results if r.case in theirs]
    differ = [
        {"case": a.case, "expected": a.expected, one.target: a.got, other.target: b.got}
        for a, b in both
        if a.got != b.got
    ]
    return {
        "cases": len(both),
        "agreement_between": (len(both) - len(differ)) / len(both) if both else None,
        "differences": differ,
    }


# -- asking ---------------------------------------------------------------------------------------
class Evaluator:
    """Asks live agents about cases, checking signed votes as the coordinator does."""

    def __init__(self, bus: Any, *, timeout_s: float = 10.0, concurrency: int = 4) -> None:
        self.bus = bus
        self.client = AgentClient(bus)
        self.view = RegistryView(Registry(bus))
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.run_id = uuid.uuid4().hex[:12]

    async def __aenter__(self) -> Evaluator:
        await self.view.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.view.stop()

    async def skill_of(self, agent: str) -> str:
        """The first skill of a live `agent` (its card's)."""
        for reg in await Registry(self.bus).live():
            if reg.agent == agent:
                skills = reg.card.get("skills") or []
                if skills:
                    return str(skills[0]["id"])
        raise NoAnswerError(
            f"no live agent {agent!r}", hint="see `mesh agents` for what is running"
        )

    async def agent(
        self, agent: str, cases: Sequence[Case], *, skill: str = "", labels: str = ""
    ) -> Report:
        """`agent` on every case, against the labels of `labels` (default: its own name or
        skill; a candidate version compared with a stable one takes the stable one's)."""
        skill = skill or await self.skill_of(agent)
        report = Report(agent)
        gate = asyncio.Semaphore(self.concurrency)

        async def one(case: Case) -> Result:
            async with gate:
                vote, meta, ms = await self.ask(agent, skill, case)
            keys = (labels,) if labels else (agent, skill)
            return _result(case, _label(case, *keys), vote, meta, ms)

        report.results = list(await asyncio.gather(*(one(c) for c in cases)))
        return report

    async def policy(self, name: str, policy: Policy, cases: Sequence[Case]) -> Report:
        """Each case through every skill's live agent, tallied by the decision core's count."""
        agents = {}
        for skill in policy.skills:
            live = self.view.agents_with_skill(skill)
            if not live:
                raise NoAnswerError(
                    f"no live agent has skill {skill!r} (policy {name})",
                    hint="see `mesh agents` for what is running",
                )
            agents[skill] = live[0]
        report = Report(name)
        gate = asyncio.Semaphore(self.concurrency)

        async def one(case: Case) -> Result:
            started = time.monotonic()
            async with gate:
                asked = await asyncio.gather(
                    *(self.ask(agents[s], s, case, policy=policy) for s in policy.skills)
                )
            tally = count(
                policy, {s: a[0] for s, a in zip(policy.skills, asked, strict=True)}, final=True
            )
            ms = round((time.monotonic() - started) * 1000, 2)
            usage = [_usage(a[1]) for a in asked]
            return Result(
                case.id,
                case.expected.get(DECISION, case.expected.get("*")),
                tally.outcome,
                ms,
                input_tokens=_sum(u[0] for u in usage),
                output_tokens=_sum(u[1] for u in usage),
                cost_usd=_sum(u[2] for u in usage),
                error="" if tally.outcome in ("approved", "rejected") else tally.reason,
            )

        report.results = list(await asyncio.gather(*(one(c) for c in cases)))
        return report

    async def ask(
        self, agent: str, skill: str, case: Case, *, policy: Policy | None = None
    ) -> tuple[Vote, dict[str, Any], float]:
        """One signed-checked vote of `agent` on `case`, the answer's metadata, the latency."""
        event_id = f"eval-{self.run_id}-{case.id}"
        event = envelope.new_event("eval.case", case.data, tenant=EVAL_TENANT, event_id=event_id)
        message = user_message(
            data=event.data,
            message_id=subjects.vote_message_id(EVAL_TENANT, event_id, skill),
            metadata={
                "eventId": event_id,
                "eventType": event.type,
                "tenant": EVAL_TENANT,
                "skill": skill,
            },
        )
        started = time.monotonic()
        outcome: CallOutcome = "voted"
        try:
            task = task_of(await self.client.send(agent, message, timeout=self.timeout_s))
            verdict = verdict_of(task)
        except AgentCallError as e:
            outcome = "timeout" if isinstance(e, AgentTimeoutError) else "unavailable"
            return _failed(skill, agent, outcome, str(e), policy), {}, _ms(started)
        except (ValueError, msgspec.ValidationError) as e:
            return _failed(skill, agent, "error", str(e), policy), {}, _ms(started)
        meta = artifact_metadata(task)
        refusal = None
        if self.view.checks_votes:
            question = votes.Question(
                agent=agent,
                tenant=EVAL_TENANT,
                event_id=event_id,
                skill=skill,
                message_id=message.message_id,
            )
            output, signed = votes.signed_output(task)
            binding = (
                self.view.binding(agent, signed.instance)
                if isinstance(signed, votes.VoteSignature)
                else None
            )
            refusal = votes.refusal(question, output, signed, binding)
        if refusal is not None:
            vote = msgspec.structs.replace(
                _failed(skill, agent, "invalid", refusal, policy), verdict=verdict
            )
        else:
            vote = Vote(
                skill=skill, agent=agent, outcome=outcome, counted_as=verdict.vote, verdict=verdict
            )
        return vote, meta, _ms(started)


def _failed(
    skill: str, agent: str, outcome: CallOutcome, error: str, policy: Policy | None
) -> Vote:
    """No usable answer: counted as the policy counts one (as the coordinator does)."""
    counts = unanswered(policy) if policy is not None else None
    return Vote(skill=skill, agent=agent, outcome=outcome, counted_as=counts, error=error)


def _label(case: Case, *keys: str) -> str | None:
    for key in (*keys, "*"):
        if key in case.expected:
            return case.expected[key]
    return None


def _usage(meta: Mapping[str, Any]) -> tuple[int | None, int | None, float | None]:
    def num(key: str) -> Any:
        value = meta.get(key)
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    tokens_in, tokens_out, cost = num("inputTokens"), num("outputTokens"), num("costUsd")
    return (
        int(tokens_in) if tokens_in is not None else None,
        int(tokens_out) if tokens_out is not None else None,
        float(cost) if cost is not None else None,
    )


def _sum(values: Iterable[Any]) -> Any:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _result(
    case: Case, expected: str | None, vote: Vote, meta: Mapping[str, Any], ms: float
) -> Result:
    tokens_in, tokens_out, cost = _usage(meta)
    got = vote.verdict.vote if vote.outcome == "voted" and vote.verdict else vote.outcome
    return Result(case.id, expected, got, ms, tokens_in, tokens_out, cost, vote.error)


def _ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000, 2)


# -- past decisions as a dataset ------------------------------------------------------------------
async def export_decisions(
    bus: Any, *, tenant: str | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """Past decisions with the events they decided, as dataset lines (`{"event", "decision"}`):
    their outcome and each voter's vote become the labels. Reads MESH_DECISIONS and MESH_EVENTS
    (the operator's reads); an event no longer in MESH_EVENTS (aged out) is skipped."""
    from mesh.bus import read_stream
    from mesh.records import decision_decoder

    decisions = {}
    filt = f"{subjects.DECISIONS_ROOT}.{tenant}.>" if tenant else None
    for m in await read_stream(bus, subjects.DECISIONS_STREAM, filter_subject=filt):
        try:
            d = decision_decoder.decode(m.data)
        except msgspec.DecodeError:
            continue
        decisions[(d.tenant, d.event_id)] = d
    lines = []
    efilt = f"{subjects.EVENTS_ROOT}.{tenant}.>" if tenant else None
    for m in await read_stream(bus, subjects.EVENTS_STREAM, filter_subject=efilt):
        try:
            e = envelope.decode(m.data, m.headers)
        except envelope.MalformedEventError:
            continue
        found = decisions.get((e.tenant, e.id))
        if found is not None:
            lines.append({"event": envelope.to_builtins(e), "decision": msgspec.to_builtins(found)})
    return lines[-limit:]
