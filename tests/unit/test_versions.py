"""The composite version (mesh.versions): it names code, prompt, model configuration and tools,
changes when any of them does, and only then (a restart of the same thing gives the same)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.agent import Agent
from mesh.models import AbstainBrain, ChainBrain, ClaudeBrain, RulesBrain
from mesh.settings import Settings
from mesh.verdict import Verdict
from mesh.versions import HASH_LEN, split

ROOT = Path(__file__).resolve().parents[2]


def _agent(prompt: str = "Review releases.", label: str | None = "2.0") -> Agent:
    agent = Agent("security-review", prompt=prompt, version=label)

    @agent.rules
    def review(release: dict) -> Verdict:  # type: ignore[type-arg]
        return Verdict.approve("fine")

    return agent


def _claude(model: str = "claude-sonnet-4-5", max_tokens: int = 1024) -> ClaudeBrain:
    # No request is made: the client is only stored.
    return ClaudeBrain(
        system_prompt="Review releases.",
        output_type=Verdict,
        model=model,
        client=object(),  # type: ignore[arg-type]
        max_tokens=max_tokens,
    )


def _chain(model: str = "claude-sonnet-4-5", timeout: float = 20.0) -> ChainBrain:
    return ChainBrain([_claude(model), AbstainBrain(Verdict)], timeouts=[timeout, None])


def test_the_version_is_the_label_and_twelve_hex_digits() -> None:
    label, digest = split(_agent().version(RulesBrain(lambda r: None)))
    assert label == "2.0" and len(digest) == HASH_LEN
    int(digest, 16)


def test_the_same_inputs_give_the_same_version() -> None:
    assert _agent().version(_chain()) == _agent().version(_chain())


def test_a_prompt_change_changes_the_version() -> None:
    assert _agent("Review releases.").version(_chain()) != _agent("Review carefully.").version(
        _chain()
    )


@pytest.mark.parametrize(
    "other",
    [
        lambda: _chain(model="claude-opus-4-1"),  # another model
        lambda: _chain(timeout=5.0),  # another attempt timeout in the chain
        lambda: ChainBrain([_claude(max_tokens=2048), AbstainBrain(Verdict)], timeouts=[20, None]),
        lambda: RulesBrain(lambda r: None),  # rules instead of the chain
    ],
)
def test_a_model_configuration_change_changes_the_version(other: object) -> None:
    assert _agent().version(_chain()) != _agent().version(other())  # type: ignore[operator]


def test_the_label_is_the_human_part_only() -> None:
    v1, v2 = _agent(label="2.0").version(None), _agent(label="2.1").version(None)
    assert split(v1)[1] == split(v2)[1] and v1 != v2


def test_the_label_falls_back_to_the_environment_then_the_card(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MESH_AGENT_VERSION", "canary-7")
    labelled = _agent(label=None).version(None, card_version="1.0.0", settings=Settings())
    assert split(labelled)[0] == "canary-7"
    monkeypatch.delenv("MESH_AGENT_VERSION")
    plain = _agent(label=None).version(None, card_version="1.0.0", settings=Settings())
    assert split(plain)[0] == "1.0.0"


_SHIPPED = (
    "from agents.security_review.agent import agent;"
    "print(agent.version(agent.brain(), card_version=agent.card().version))"
)


def _shipped(seed: str, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _SHIPPED],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": seed, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_a_restart_of_the_same_agent_gives_the_same_version() -> None:
    """Two processes (different hash seeds, as two starts would have): the same version; a
    model configured otherwise (MESH_MODEL) gives another."""
    first, second = _shipped("1"), _shipped("2")
    assert first == second and first.startswith("1.0.0+")
    assert (
        _shipped(
            "1", MESH_MODEL="anthropic:claude-sonnet-4-5,rules", ANTHROPIC_API_KEY="test-not-used"
        )
        != first
    )


def test_mesh_canary_version_says_what_the_agent_would_run_as(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`mesh canary version MODULE`: the version a start here would register (so a policy can
    name a candidate before it takes any event)."""
    import msgspec
    from typer.testing import CliRunner

    from mesh.cli import app

    monkeypatch.setenv("MESH_AGENT_VERSION", "2.0")
    ran = CliRunner().invoke(app, ["canary", "version", "agents.security_review", "--json"])
    assert ran.exit_code == 0, ran.output
    shown = msgspec.json.decode(ran.stdout)
    assert shown["agent"] == "security-review"
    assert shown["version"] == _shipped("3", MESH_AGENT_VERSION="2.0")


def test_a_tool_the_model_may_call_is_part_of_the_version() -> None:
    from mesh.tools import model_tool

    @model_tool(description="Look a drug up in the formulary.")
    async def formulary(drug: str) -> str:
        return drug

    def with_tools(*tools: object) -> ClaudeBrain:
        return ClaudeBrain(
            system_prompt="Review releases.",
            output_type=Verdict,
            model="claude-sonnet-4-5",
            client=object(),  # type: ignore[arg-type]
            tools=list(tools),  # type: ignore[arg-type]
        )

    assert _agent().version(with_tools()) == _agent().version(_claude())
    assert _agent().version(with_tools(formulary)) != _agent().version(with_tools())
