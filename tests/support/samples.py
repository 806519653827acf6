"""What tests and benchmarks send: the release samples, events built from them, agent cards,
policy files, and the test voting agent (whose vote the payload chooses)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec

from mesh import Agent, Verdict, envelope

REPO = Path(__file__).resolve().parents[2]
V1 = {"A2A-Version": "1.0"}  # the header an A2A 1.0 request carries
WAIT_S = 10.0  # an upper bound on any one wait in a test, never a measurement
SAMPLES = REPO / "agents" / "samples"

# The reviewer agents as shipped, by name, and the skills the release policy asks of them.
REVIEWERS = {
    "security-review": "agents.security_review",
    "compliance-review": "agents.compliance_review",
    "quality-review": "agents.quality_review",
}
REVIEWER_SKILLS = [
    "release-security-review",
    "release-compliance-review",
    "release-quality-review",
]
# What the three rule-based reviewers decide, unanimously, for each sample.
SAMPLE_OUTCOME = {
    "clean": "approved",
    "secret": "rejected",
    "phi": "rejected",
    "untested": "rejected",
}

log = logging.getLogger("tests.support.voter")


# -- payloads ---------------------------------------------------------------------------------
def sample_path(kind: str) -> Path:
    """`agents/samples/release_<kind>.json` (kind: clean, secret, phi, untested)."""
    return SAMPLES / f"release_{kind}.json"


def sample(kind: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(sample_path(kind).read_text())
    return data


def release_event(
    event_id: str,
    data: dict[str, Any],
    event_type: str = "release.proposed",
    source: str = "mesh://tests",
) -> envelope.Event:
    return envelope.new_event(event_type, data, event_id=event_id, source=source)


def release_events(
    run: str, count: int, kinds: Iterable[str] = ("clean", "secret", "phi", "clean", "untested")
) -> tuple[list[envelope.Event], dict[str, str]]:
    """`count` release events cycling through the sample kinds, and the outcome the shipped
    reviewers give each (by event id)."""
    kinds = tuple(kinds)
    events, expected = [], {}
    for i in range(count):
        kind = kinds[i % len(kinds)]
        event = release_event(f"{run}-{i:05d}-{kind}", sample(kind))
        expected[event.id] = SAMPLE_OUTCOME[kind]
        events.append(event)
    return events, expected


def jsonrpc(method: str, params: dict[str, Any], rid: int = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}).encode()


# -- cards and policies -----------------------------------------------------------------------
def write_card(folder: Path, name: str, skill: str) -> Path:
    """An A2A card for a test agent with one skill (`folder/<name>.json`, the file an agent
    named `name` finds with MESH_CARDS_DIR=folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    card = {
        "name": name,
        "description": f"test agent {name}",
        "version": "1.0.0",
        "capabilities": {"streaming": True},
        "defaultInputModes": ["application/json"],
        "defaultOutputModes": ["application/json"],
        "skills": [{"id": skill, "name": skill, "description": "test", "tags": ["test"]}],
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(card))
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of plain text is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_policy(
    path: Path, policies: dict[str, dict[str, Any]], *, ignore: Iterable[str] = ()
) -> Path:
    """A policy file the coordinator loads through MESH_POLICY_FILE."""
    lines = [f"ignore = {_toml(list(ignore))}", ""]
    for event_type, body in policies.items():
        lines.append(f"[{json.dumps(event_type)}]")
        lines.extend(f"{k} = {_toml(v)}" for k, v in body.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def policy(skills: list[str], **overrides: Any) -> dict[str, Any]:
    """One event type's policy: unanimous over `skills`, an unanswered vote rejects; the clocks
    are those `release.proposed` ships with unless overridden."""
    body: dict[str, Any] = {
        "skills": list(skills),
        "rule": {"kind": "unanimous"},
        "agent_timeout_s": 1.5,
        "deadline_s": 4.0,
        "retries": 1,
        "timeout_counts_as": "reject",
        "decision_type": "release.decided",
    }
    body.update(overrides)
    return body


def reviewer_policy(**overrides: Any) -> dict[str, Any]:
    """`release.proposed` as shipped (the three reviewers, unanimous), with overrides."""
    return policy(REVIEWER_SKILLS, **overrides)


# -- the test voting agent --------------------------------------------------------------------
class Proposal(msgspec.Struct, forbid_unknown_fields=False):
    """What a test voting agent reads from the payload: how to vote and how long to take."""

    id: str = ""
    vote: str = "approve"
    delay_s: float = 0.0
    fault_tag: str = ""  # logged on arrival, so a test can wait until the agent is mid-task


def vote_as_asked(name: str, *, honour_delay: bool = True) -> Callable[[Proposal], Any]:
    """The handler of a test voting agent: votes what the payload asks, after `delay_s` when
    `honour_delay`; logs `voter <name> received <fault_tag>` on arrival when a tag is given."""

    async def review(p: Proposal) -> Verdict:
        if p.fault_tag:
            log.info("voter %s received %s (sleeping %.1fs)", name, p.fault_tag, p.delay_s)
        if honour_delay and p.delay_s > 0:
            await asyncio.sleep(p.delay_s)
        return Verdict(vote=p.vote, reasons=[f"{name} says {p.vote}"])  # type: ignore[arg-type]

    # Resolved here, not from strings: the agent reads its input type from the annotations.
    review.__annotations__ = {"p": Proposal, "return": Verdict}
    return review


def voting_agent(folder: Path, name: str, skill: str, *, honour_delay: bool = False) -> Agent:
    """An in-process test agent (serve it with `agent.serve`) with a card of its own written to
    `folder`, whose vote is whatever the payload asks for, so tests choose outcomes. Run as a
    process, the same agent is `python -m tests.support.voter`."""
    agent = Agent(name, card=write_card(folder, name, skill))
    agent.rules(vote_as_asked(name, honour_delay=honour_delay))
    return agent
