"""Signing: what zero trust costs per vote and per decision, against the unsigned work it wraps.

Every figure is CPU time in this process (one core), the signed operation next to its unsigned
baseline measured in the same run:

- vote, agent side: `mesh.votes.VoteSigner.sign` vs encoding the same verdict (msgspec JSON);
- vote, coordinator side: `mesh.votes.signed_output` + `refusal` (read and verify) vs reading
  the task's output alone;
- decision: `mesh.records.sign_decision` and `decision_refusal` vs encoding the decision;
- event: `mesh.records.event_signature` / `event_principal` vs encoding the envelope;
- audit record: hashed and signed vs hashed only (the chain before issue 11);
- ledger: one claim and four saves through `coordinator.ledger.Ledger` on a `MemoryStore`,
  signed and verified vs unsigned.

Then the crypto a 3-voter decision costs the coordinator: 3 vote verifies, 1 event verify, 1
decision signature, 5 ledger writes and 4 audit records (decision + 3 votes).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec
from a2a.helpers import new_data_part
from a2a.types import Artifact, Task, TaskState, TaskStatus

from bench.common import Sized, banner, fmt, md_table
from coordinator.ledger import Ledger, MemoryStore
from mesh import envelope, records, subjects, votes
from mesh.audit import GENESIS, AuditRecord
from mesh.identity import Signer, Trust, b64
from mesh.records import Decision, Vote
from mesh.signing import Binding
from mesh.verdict import Verdict


@dataclass
class Opts(Sized):
    SIZES: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"n": 2_000},
        "smoke": {"n": 50},
    }
    n: int = 10_000


def _us(fn: Callable[[], object], n: int) -> float:
    fn()  # warm
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


async def _aus(fn: Callable[[], Any], n: int) -> float:
    await fn()
    t = time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.perf_counter() - t) / n * 1e6


def _vote_rows(n: int, trust: Trust) -> dict[str, float]:
    key = Signer.generate()
    signer = votes.VoteSigner("security-review", "i1", key)
    question = votes.Question(
        agent="security-review",
        tenant="acme",
        event_id="evt-000001",
        skill="release-security-review",
        message_id=subjects.vote_message_id("acme", "evt-000001", "release-security-review"),
    )
    output = msgspec.to_builtins(
        Verdict.reject("AWS access key id in config/prod.env line 3", "left-pad is not pinned")
    )
    now = time.time()
    binding = Binding(
        agent="security-review",
        instance="i1",
        key=b64(key.public),
        subjects=[],
        iat=now,
        exp=now + 600,
    )
    meta = signer.sign(question, output)
    task = Task(
        id="t",
        context_id="c",
        status=TaskStatus(state=TaskState.TASK_STATE_COMPLETED),
        artifacts=[Artifact(artifact_id="a", parts=[new_data_part(output)])],
    )
    task.artifacts[0].metadata.update({votes.SIGNATURE_KEY: meta})

    def verify() -> None:
        read, signed = votes.signed_output(task)
        assert votes.refusal(question, read, signed, binding) is None

    return {
        "vote_encode_us": _us(lambda: msgspec.json.encode(output), n),
        "vote_sign_us": _us(lambda: signer.sign(question, output), n),
        "vote_read_us": _us(lambda: votes.signed_output(task), n),
        "vote_read_verify_us": _us(verify, n),
    }


def _decision_rows(n: int, coordinator: Signer, publisher: Signer, trust: Trust) -> dict[str, Any]:
    decision = Decision(
        event_id="evt-000001",
        event_type="release.proposed",
        tenant="acme",
        decision_type="release.decided",
        outcome="approved",
        reason="3 of 3 approved",
        rule="unanimous",
        votes=[
            Vote(skill=f"s{i}", agent=f"a{i}", outcome="voted", verdict=Verdict.approve())
            for i in range(3)
        ],
        decided_at=time.time(),
        latency_ms=12.0,
    )
    signed = records.sign_decision(coordinator, decision)
    assert records.decision_refusal(trust, signed) is None
    event = envelope.new_event("release.proposed", {"files": ["a.py"]}, tenant="acme")
    body = envelope.encode(event)
    subject = subjects.event("acme", event.type)
    header = records.event_signature(publisher, subject, body)
    assert records.event_principal(trust, subject, body, header)[0]
    record = AuditRecord("acme", "vote", "evt-000001", "coordinator:c1", time.time(), {}, GENESIS)

    def audit_hash() -> None:
        record.hash = record.digest()

    def audit_sign() -> None:
        record.hash = record.digest()
        record.signature = coordinator.sign("audit", record.hash.encode())

    return {
        "decision_encode_us": _us(lambda: records.encoder.encode(decision), n),
        "decision_sign_us": _us(lambda: records.sign_decision(coordinator, decision), n),
        "decision_verify_us": _us(lambda: records.decision_refusal(trust, signed), n),
        "event_encode_us": _us(lambda: envelope.encode(event), n),
        "event_sign_us": _us(lambda: records.event_signature(publisher, subject, body), n),
        "event_verify_us": _us(lambda: records.event_principal(trust, subject, body, header), n),
        "audit_hash_us": _us(audit_hash, n),
        "audit_hash_sign_us": _us(audit_sign, n),
        "sha256_us": _us(lambda: hashlib.sha256(body).hexdigest(), n),
    }


async def _ledger_rows(n: int, coordinator: Signer, trust: Trust) -> dict[str, float]:
    """One claim and four saves (three votes and the outcome), signed and not."""
    counter = iter(range(10**9))

    def cycle(ledger: Ledger) -> Callable[[], Any]:
        async def run() -> None:
            got = await ledger.claim(f"acme.e{next(counter)}", stream_seq=1, deadline_s=10)
            assert not isinstance(got, bool) and hasattr(got, "state")
            for _ in range(4):
                await ledger.save(got, got.state)  # type: ignore[union-attr]

        return run

    plain = Ledger(MemoryStore(), "c1", 2.0)
    signed = Ledger(MemoryStore(), "c1", 2.0, signer=coordinator, trust=trust)
    rounds = max(10, n // 5)
    return {
        "ledger_5_writes_us": await _aus(cycle(plain), rounds),
        "ledger_5_writes_signed_us": await _aus(cycle(signed), rounds),
    }


async def run(opts: Opts) -> dict[str, Any]:
    banner(f"signing: {opts.n} operations per row, one core, in this process")
    trust = Trust()
    coordinator, publisher = Signer.generate(), Signer.generate()
    trust.add(coordinator, "coordinator", "c1")
    trust.add(publisher, "publisher", "shop")
    r: dict[str, Any] = {}
    r.update(_vote_rows(opts.n, trust))
    r.update(_decision_rows(opts.n, coordinator, publisher, trust))
    r.update(await _ledger_rows(opts.n, coordinator, trust))
    ledger_extra = r["ledger_5_writes_signed_us"] - r["ledger_5_writes_us"]
    per_decision = (
        3 * (r["vote_read_verify_us"] - r["vote_read_us"])
        + (r["event_verify_us"])
        + r["decision_sign_us"]
        + ledger_extra
        + 4 * (r["audit_hash_sign_us"] - r["audit_hash_us"])
    )
    r["signing_coordinator_us_per_decision_3_voters"] = per_decision
    r["signing_agent_us_per_vote"] = r["vote_sign_us"]
    r["signing_coordinator_us_per_vote"] = r["vote_read_verify_us"] - r["vote_read_us"]
    rows = [
        ("vote: agent signs", r["vote_sign_us"], "encode verdict", r["vote_encode_us"]),
        (
            "vote: coordinator reads + verifies",
            r["vote_read_verify_us"],
            "read output only",
            r["vote_read_us"],
        ),
        ("decision: sign", r["decision_sign_us"], "encode", r["decision_encode_us"]),
        ("decision: verify", r["decision_verify_us"], "encode", r["decision_encode_us"]),
        ("event: sign (publisher)", r["event_sign_us"], "encode", r["event_encode_us"]),
        ("event: verify (coordinator)", r["event_verify_us"], "encode", r["event_encode_us"]),
        ("audit record: hash + sign", r["audit_hash_sign_us"], "hash only", r["audit_hash_us"]),
        (
            "ledger: claim + 4 saves, signed",
            r["ledger_5_writes_signed_us"],
            "unsigned",
            r["ledger_5_writes_us"],
        ),
    ]
    table = md_table(
        ["operation", "µs", "baseline", "baseline µs", "ratio"],
        [
            (op, fmt(us, 1), base, fmt(b, 1), f"{us / b:.0f}x" if b > 0 else "-")
            for op, us, base, b in rows
        ],
    )
    summary = (
        f"Crypto per 3-voter decision on the coordinator: {per_decision:.0f} µs of CPU "
        f"(3 vote verifies, 1 event verify, 1 decision signature, the ledger's 5 signed writes, "
        f"4 signed audit records); per vote: agent {r['vote_sign_us']:.0f} µs, coordinator "
        f"{r['signing_coordinator_us_per_vote']:.0f} µs."
    )
    print(table, "\n\n" + summary, flush=True)
    markdown = f"## Signing\n\n{table}\n\n{summary}\n"
    return {"results": {k: round(v, 2) for k, v in r.items()}, "markdown": markdown}


if __name__ == "__main__":
    print(asyncio.run(run(Opts.make("quick")))["results"])
