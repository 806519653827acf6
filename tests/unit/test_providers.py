"""Brain chains from configuration, the provider clients they build (no network), prices."""

from __future__ import annotations

from pathlib import Path

import anthropic
import pytest

from mesh.errors import ConfigError
from mesh.models import ChainBrain, ClaudeBrain, RulesBrain, build_brain
from mesh.providers import (
    DEFAULT_PRICES,
    ModelSpec,
    agent_models,
    build_client,
    parse_chain,
    price_of,
    startup_problems,
    tenant_quota,
)
from mesh.settings import Settings
from mesh.verdict import Verdict


def rules(payload: object) -> Verdict:
    return Verdict.approve("rules")


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MESH_MODEL", "MESH_MODEL_SECURITY_REVIEW", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)


def models_file(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return Settings(models_file=path)


def test_chain_syntax() -> None:
    assert parse_chain("anthropic:claude-sonnet-5-5, claude-haiku-5-5 ,rules", where="x") == (
        ModelSpec("anthropic", "claude-sonnet-5-5"),
        ModelSpec("anthropic", "claude-haiku-5-5"),
        "rules",
    )
    with pytest.raises(ConfigError, match="is not a brain"):
        parse_chain("openai:gpt", where="MESH_MODEL")
    with pytest.raises(ConfigError, match="never tried"):
        parse_chain("rules,anthropic:claude-sonnet-5-5", where="MESH_MODEL")


def test_per_agent_beats_mesh_wide_and_env_beats_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = models_file(
        tmp_path,
        '[default]\nchain = ["abstain"]\n'
        '[agent.security-review]\nchain = ["vertex:claude-sonnet-5-5", "rules"]\ntimeout_s = 7\n',
    )
    assert agent_models("quality-review", settings).chain == ("abstain",)
    own = agent_models("security-review", settings)
    assert own.chain == (ModelSpec("vertex", "claude-sonnet-5-5"), "rules")
    assert own.timeout_s == 7
    monkeypatch.setenv("MESH_MODEL", "bedrock:anthropic.claude-haiku-5-5")
    assert agent_models("quality-review", settings).source == "MESH_MODEL"
    assert agent_models("security-review", settings).source == "models file"
    monkeypatch.setenv("MESH_MODEL_SECURITY_REVIEW", "rules")
    assert agent_models("security-review", settings).chain == ("rules",)


def test_nothing_configured_is_the_rules_whatever_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    assert agent_models("x", Settings()).chain == ("rules",)


def test_bedrock_and_vertex_build_their_sdk_clients_without_network(tmp_path: Path) -> None:
    settings = models_file(
        tmp_path,
        '[providers.bedrock]\naws_region = "eu-central-1"\n'
        '[providers.vertex]\nregion = "europe-west1"\nproject_id = "demo"\n',
    )
    bedrock = build_client(ModelSpec("bedrock", "m"), timeout_s=5, settings=settings)
    assert type(bedrock) is anthropic.AsyncAnthropicBedrock
    assert bedrock.base_url.host == "bedrock-runtime.eu-central-1.amazonaws.com"
    vertex = build_client(ModelSpec("vertex", "m"), timeout_s=5, settings=settings)
    assert type(vertex) is anthropic.AsyncAnthropicVertex
    assert vertex.base_url.host == "europe-west1-aiplatform.googleapis.com"
    direct = build_client(ModelSpec("anthropic", "m"), timeout_s=5, settings=settings)
    assert type(direct) is anthropic.AsyncAnthropic
    # The chain's own clients do not retry: the next entry of the chain does.
    assert bedrock.max_retries == vertex.max_retries == direct.max_retries == 0


def test_a_chain_of_providers_becomes_claude_brains_then_rules(tmp_path: Path) -> None:
    settings = models_file(
        tmp_path,
        '[default]\nchain = ["bedrock:anthropic.claude-sonnet-5-5", '
        '"vertex:claude-haiku-5-5", "rules"]\n'
        '[providers.bedrock]\naws_region = "eu-central-1"\n'
        '[providers.vertex]\nregion = "europe-west1"\n',
    )
    brain, notes = build_brain(
        agent="a", rules=rules, system_prompt="Vote.", output_type=Verdict, settings=settings
    )
    assert notes == []
    assert isinstance(brain, ChainBrain)
    first, second, last = brain.brains
    assert isinstance(first, ClaudeBrain) and type(first.client) is anthropic.AsyncAnthropicBedrock
    assert isinstance(second, ClaudeBrain) and type(second.client) is anthropic.AsyncAnthropicVertex
    assert isinstance(last, RulesBrain)
    assert brain.name == "bedrock:anthropic.claude-sonnet-5-5 → vertex:claude-haiku-5-5 → rules"


def test_startup_check_says_what_is_wrong_and_what_happens_instead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv(
        "MESH_MODEL", "anthropic:claude-sonnet-5-5,vertex:claude-sonnet-5-5,bedrock:x,rules"
    )
    brain, notes = build_brain(
        agent="a", rules=rules, system_prompt="Vote.", output_type=Verdict, settings=Settings()
    )
    assert isinstance(brain, RulesBrain)
    assert notes == [
        "anthropic:claude-sonnet-5-5: skipped: no ANTHROPIC_API_KEY",
        "vertex:claude-sonnet-5-5: skipped: no Google Cloud region (MESH_VERTEX_REGION)",
        "bedrock:x: skipped: no AWS region (MESH_BEDROCK_REGION or AWS_REGION)",
        "will use: rules",
    ]
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    assert startup_problems(ModelSpec("anthropic", "claude-nonesuch-9")) == [
        "unknown model 'claude-nonesuch-9' (the anthropic SDK does not list it)"
    ]


def test_abstain_only_ends_a_verdict_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_MODEL", "abstain")
    brain, _ = build_brain(agent="a", rules=None, system_prompt=None, output_type=Verdict)
    assert brain.name == "abstain"
    with pytest.raises(ConfigError, match="only end the chain of an agent that answers a Verdict"):
        build_brain(agent="a", rules=None, system_prompt=None, output_type=dict)


def test_prices_come_from_the_file_else_the_table(tmp_path: Path) -> None:
    settings = models_file(
        tmp_path,
        '[prices."claude-sonnet-5-5"]\ninput_per_mtok = 2.5\noutput_per_mtok = 10\n'
        '[tenants."*"]\nconcurrent_calls = 2\n[tenants.acme]\ncost_per_day_usd = 5.0\n',
    )
    assert price_of("claude-sonnet-5-5", settings) == (2.5, 10.0)
    assert price_of("claude-haiku-4-5", settings) == DEFAULT_PRICES["claude-haiku-4-5"]
    assert price_of("claude-unknown", settings) == max(DEFAULT_PRICES.values())
    assert tenant_quota("acme", settings).cost_per_day_usd == 5.0
    assert tenant_quota("other", settings).concurrent_calls == 2


def test_the_models_file_in_the_docs_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text()
    [block] = [b for b in text.split("```toml\n")[1:] if "[providers.vertex]" in b]
    settings = models_file(tmp_path, block.split("```", 1)[0])
    own = agent_models("compliance-review", settings)
    assert own.chain[-1] == "abstain" and own.redact_fields == ("$.author", "$.approvals[*].by")
    assert own.redact_detectors == ("email", "phone", "iban", "card", "aws_key")
    assert tenant_quota("acme", settings).concurrent_calls == 4
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    vertex = build_client(ModelSpec("vertex", "m"), timeout_s=1, settings=settings)
    assert vertex.region == "europe-west1" and vertex.project_id == "my-project"
