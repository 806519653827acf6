"""`mesh demo` as a real process: NATS, coordinator and three agents, nine sample cases."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.procs import Ran, mesh_env, run_mesh

pytestmark = pytest.mark.e2e

DEMO_TIMEOUT_S = 120.0
# The demo runs with the product's own liveness clocks: its "hung" case pauses an agent for about
# the policy's 2 x 1.5 s, which a short card TTL would turn into a different scenario.

# title -> (expected outcome, the agent whose vote decides it)
EXPECTED: dict[str, tuple[str, str | None]] = {
    "clean release": ("approved", None),
    "AWS key in the diff": ("rejected", "security-review"),
    "health data, no privacy review": ("rejected", "compliance-review"),
    "code changed, tests not": ("rejected", "quality-review"),
    "clean release, quality-review hung": ("rejected", "quality-review"),
    "clinical change, safety officer approves in the inbox": ("approved", None),
    "clinical change, nobody answers: escalated, then silence denies": ("rejected", None),
    "malformed JSON": ("dlq:malformed", None),
    "unknown event type": ("dlq:unknown_type", None),
}


def _vote(record: dict[str, Any], agent: str) -> dict[str, Any]:
    votes = [v for v in record["votes"] if v["agent"] == agent]
    assert len(votes) == 1, f"expected one vote by {agent}: {record['votes']}"
    return votes[0]


def _explain(ran: Ran, cwd: Path) -> str:
    """What went wrong, readably: each case's outcome, then the tail of every process log."""
    lines = [f"`mesh {' '.join(ran.args)}` exited {ran.returncode}"]
    try:
        lines += [f"  {c['title']}: {c['outcome']} (expected {c['expect']})" for c in ran.json()]
    except ValueError:
        lines.append(f"--- stdout ---\n{ran.stdout[-3000:]}")
    lines.append(f"--- stderr ---\n{ran.stderr[-2000:]}")
    for log in sorted(cwd.glob("mesh-demo-*/**/*.log")):
        lines.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-2000:]}")
    return "\n".join(lines)


def test_demo_json_outcomes(tmp_path: Path) -> None:
    ran = run_mesh(
        ["demo", "--json"],
        cwd=tmp_path,
        env=mesh_env(tmp_path, fast_clocks=False),
        timeout=DEMO_TIMEOUT_S,
    )
    assert ran.returncode == 0, _explain(ran, tmp_path)
    assert "Traceback" not in ran.stderr, str(ran)
    cases = ran.json()
    by_title = {c["title"]: c for c in cases}
    assert len(cases) == 9
    assert set(by_title) == set(EXPECTED)
    assert len({c["event_id"] for c in cases}) == 9

    for title, (outcome, _) in EXPECTED.items():
        case = by_title[title]
        assert case["ok"] is True, case
        assert case["outcome"] == outcome == case["expect"], case
        assert case["record"] is not None, case

    clean = by_title["clean release"]["record"]
    assert clean["outcome"] == "approved"
    assert clean["event_id"] == by_title["clean release"]["event_id"]
    assert clean["rule"] == "unanimous"
    assert {v["agent"] for v in clean["votes"]} == {
        "security-review",
        "compliance-review",
        "quality-review",
    }
    for v in clean["votes"]:
        assert v["outcome"] == "voted" and v["verdict"]["vote"] == "approve", v
    assert clean["reason"] == "all 3 non-abstaining voters approved", clean["reason"]

    for title in (
        "AWS key in the diff",
        "health data, no privacy review",
        "code changed, tests not",
    ):
        record = by_title[title]["record"]
        assert record["outcome"] == "rejected", record
        vote = _vote(record, EXPECTED[title][1] or "")
        assert vote["outcome"] == "voted", vote
        assert vote["verdict"]["vote"] == "reject", vote
        assert vote["counted_as"] == "reject", vote
        assert vote["verdict"]["reasons"], vote
        # a reject that was cast, said as one; nothing about silence
        assert record["reason"] == "1 rejected; unanimous needs no rejects", record["reason"]

    hung = by_title["clean release, quality-review hung"]["record"]
    assert hung["outcome"] == "rejected"
    quality = _vote(hung, "quality-review")
    assert quality["outcome"] == "timeout", quality
    assert quality["counted_as"] == "reject", quality
    assert "verdict" not in quality, quality
    for agent in ("security-review", "compliance-review"):
        assert _vote(hung, agent)["verdict"]["vote"] == "approve"
    # The reason says what happened: the hung reviewer gave no answer, and the policy counted
    # that as a reject. It is not reported as a reject it cast.
    reason = hung["reason"]
    assert re.match(r"release-quality-review: no answer (in [\d.]+ s|by the deadline)", reason), (
        reason
    )
    assert "→ counted as reject (policy)" in reason, reason
    assert reason.endswith("1 counted as reject for no answer; unanimous needs no rejects"), reason
    assert not re.search(r"\b\d+ rejected|vetoed", reason), reason

    # People in the quorum: one approves through the inbox; nobody answers the other.
    signed_off = by_title["clinical change, safety officer approves in the inbox"]["record"]
    person = signed_off["votes"][-1]
    assert person["skill"] == "human:clinical-safety-officer", person
    assert (person["agent"], person["counted_as"]) == ("human:demo-safety-officer", "approve")
    assert person["signature"] and person["verdict"]["reasons"], person
    silent = by_title["clinical change, nobody answers: escalated, then silence denies"]["record"]
    nobody = silent["votes"][-1]
    assert (nobody["outcome"], nobody["counted_as"]) == ("timeout", "reject"), nobody
    # Escalated before the silence counted: both roles were asked.
    assert "asked: clinical-safety-officer, head-of-safety" in nobody["error"], nobody

    malformed = by_title["malformed JSON"]["record"]
    assert malformed["reason"] == "malformed", malformed
    assert malformed["subject"].endswith(".release.proposed"), malformed
    unknown = by_title["unknown event type"]["record"]
    assert unknown["reason"] == "unknown_type", unknown
    assert unknown["event_type"] == "invoice.created", unknown
    assert unknown["event_id"] == by_title["unknown event type"]["event_id"], unknown


def test_demo_human_output(tmp_path: Path) -> None:
    ran = run_mesh(
        ["demo"], cwd=tmp_path, env=mesh_env(tmp_path, fast_clocks=False), timeout=DEMO_TIMEOUT_S
    )
    assert ran.returncode == 0, _explain(ran, tmp_path)
    assert "9/9 outcomes as expected" in ran.stdout, str(ran)
    assert "Traceback" not in ran.stdout + ran.stderr, str(ran)
    for title in EXPECTED:
        assert title in ran.stdout, title
    # the hung case's reason, as the demo prints it: a timeout named as such, not a vote
    hung = re.search(r"rule unanimous: (release-quality-review: no answer[^\n]*)", ran.stdout)
    assert hung is not None, ran.stdout
    assert "→ counted as reject (policy)" in hung[1], hung[1]
