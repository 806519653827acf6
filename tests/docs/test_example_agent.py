"""docs/write-an-agent.md end to end: the guide's agent (tests/docs/example_agent), its card in a
cards folder, the guide's policy file, a coordinator and the three reviewers — deciding the
sample releases `mesh demo` decides — and the agent run as its own process with `mesh run`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.compliance_review.agent import agent as compliance
from agents.quality_review.agent import agent as quality
from agents.security_review.agent import agent as security
from mesh import Bus
from mesh.identity import IdentityDir
from mesh.natsauth import ensure_identity
from mesh.registry import Registry
from mesh.server import EmbeddedServer
from mesh.settings import Settings
from mesh.testing import MeshHarness, verdict_of
from mesh.testing.harness import load_policies
from tests.docs.blocks import REPO, page_blocks
from tests.docs.example_agent.agent import agent as four_eyes

pytestmark = pytest.mark.integration

SAMPLES = REPO / "agents" / "samples"
EXAMPLE = REPO / "tests" / "docs" / "example_agent"
START_TIMEOUT_S = 30.0
AGENTS = (security, compliance, quality, four_eyes)


@pytest.fixture(autouse=True)
def cards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The repository's cards plus the guide's `cards/four-eyes.json`, as MESH_CARDS_DIR."""
    folder = tmp_path / "cards"
    folder.mkdir()
    for card in [*(REPO / "cards").glob("*.json"), EXAMPLE / "four-eyes.json"]:
        shutil.copy(card, folder / card.name)
    monkeypatch.setenv("MESH_CARDS_DIR", str(folder))
    return folder


def guide_policies() -> dict[str, Any]:
    """The policy file the guide tells you to write (its TOML block with the new skill)."""
    [block] = [b for b in page_blocks("write-an-agent.md", "toml") if "four-eyes" in b.code]
    doc: dict[str, Any] = tomllib.loads(block.code)
    # The guide shows the file after the change: the other policies of the project stay.
    project = tomllib.loads((REPO / "coordinator" / "policies.toml").read_text())
    return {**project, **doc}


def sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / name).read_text())
    return data


@pytest.mark.parametrize(
    ("sample_file", "outcome"),
    [
        ("release_clean.json", "approved"),
        ("release_secret.json", "rejected"),
        ("release_phi.json", "rejected"),
        ("release_untested.json", "rejected"),
    ],
)
async def test_four_eyes_votes_on_the_demo_releases(sample_file: str, outcome: str) -> None:
    release = sample(sample_file)
    async with MeshHarness(*AGENTS, policies=guide_policies()) as m:
        decision = await m.decision(await m.publish("release.proposed", release))
    assert decision.outcome == outcome, decision
    assert [v.agent for v in decision.votes] == [
        "security-review",
        "compliance-review",
        "quality-review",
        "four-eyes",
    ]
    vote = decision.votes[-1]
    assert vote.outcome == "voted" and vote.verdict is not None, vote
    # Every sample was approved by someone other than its author.
    assert vote.verdict.vote == "approve", vote
    approver = release["approvals"][0]["by"]
    assert vote.verdict.reasons == [f"approved by {approver}, not the author"]


async def test_a_self_approved_release_is_rejected_and_a_review_requested() -> None:
    release = sample("release_clean.json")
    release["approvals"] = [{"by": release["author"].upper(), "role": "engineer"}]
    async with MeshHarness(*AGENTS, policies=guide_policies()) as m:
        event_id = await m.publish("release.proposed", release, tenant="acme")
        decision = await m.decision(event_id)
        request = await m.event("release.review_requested")
    # What the agent publishes is in the guide's `ignore` list: not dead-lettered as unknown.
    assert load_policies(guide_policies()).ignored("release.review_requested")
    assert decision.outcome == "rejected"
    assert decision.reason.endswith("unanimous needs no rejects"), decision.reason
    four = decision.votes[-1]
    assert four.verdict is not None and four.verdict.vote == "reject"
    assert four.verdict.reasons == [f"only the author ({release['author']}) approved it"]
    assert (request.tenant, request.data["release_id"]) == ("acme", release["id"])
    assert request.data["author"] == release["author"]


async def test_the_card_is_what_the_guide_shows() -> None:
    card = four_eyes.card()
    assert card.name == "four-eyes" and card.version == "1.0.0"
    assert [s.id for s in card.skills] == ["release-four-eyes-review"]
    assert four_eyes.system_prompt() == (EXAMPLE / "prompt.md").read_text()
    assert [h.durable for h in four_eyes.event_handlers] == ["agent-four-eyes-request_review"]


# -- `mesh run`, as the guide says ---------------------------------------------------------------
def _stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM (what Ctrl-C or a supervisor sends), bounded wait; the process's output."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out.decode(errors="replace")


@pytest.fixture
def agent_process(
    cards: Path, identities: IdentityDir
) -> Iterator[tuple[EmbeddedServer, subprocess.Popen[bytes]]]:
    """`mesh run tests.docs.example_agent` (in your project: `mesh run agents.four_eyes`), as
    its own agent identity, once the operator has made the mesh's streams (as `mesh up` does)."""
    identity = ensure_identity(identities, "agent", "four-eyes")
    with EmbeddedServer() as server:
        asyncio.run(_ensure_streams(server.url))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "ANTHROPIC_"))}
        env.update(
            MESH_IDENTITY=str(identity),
            MESH_TRUST=str(identities.trust_path),
            MESH_NATS_URL=server.url,
            MESH_CARDS_DIR=str(cards),
            MESH_HEARTBEAT_S="0.5",
            MESH_ALLOW_MODEL_REQUESTS="0",
            PYTHONPATH=str(REPO),
        )
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mesh"), "run", "tests.docs.example_agent"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield server, proc
        finally:
            _stop(proc)


async def _ensure_streams(url: str) -> None:
    async with await Bus.connect(url, name="operator") as bus:
        await bus.ensure()


async def test_mesh_run_serves_the_agent(
    agent_process: tuple[EmbeddedServer, subprocess.Popen[bytes]],
) -> None:
    server, proc = agent_process
    settings = Settings(heartbeat_s=0.5, card_ttl_s=3.0)
    async with await Bus.connect(server.url, name="test", settings=settings) as bus:
        await bus.ensure()
        registry = Registry(bus)
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                while not [r for r in await registry.live() if r.agent == "four-eyes"]:
                    assert proc.poll() is None, "mesh run exited early"
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"four-eyes not registered within {START_TIMEOUT_S:g}s") from None
        async with MeshHarness(bus=bus) as m:
            task = await m.call("four-eyes", sample("release_secret.json"))
    assert verdict_of(task).vote == "approve"  # bob.nguyen approved alice.moreau's release
    out = await asyncio.to_thread(_stop, proc)
    assert proc.returncode == 0, out[-3000:]
    assert "brain rules" in out, out[-3000:]
