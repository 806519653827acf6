"""`ScriptedModel`: a local Anthropic Messages API that answers with the verdict a test scripts.

    async with ScriptedModel("reject", "scripted: no second approver") as model:
        os.environ.update(model.environ())    # or the `scripted_model` fixture does it for you
        ...                                   # agents served from now on use the Claude brain
        model.requests[0]["system"]           # what the agent sent: its prompt.md

It is a `FakeAnthropic` (real HTTP on 127.0.0.1, the real `anthropic` SDK on the other side)
whose every answer is one call of the tool the request forces, with `answer` as its input. An
agent with a prompt picks the Claude brain when MESH_MODEL names a model (`environ()` sets it
with the key and ANTHROPIC_BASE_URL) and reads them when it starts serving: set them before
`agent.serve` / `MeshHarness`.
Or, with no environment at all, swap the Claude brain in for one agent, even while it serves:

    with agent.override(model.brain(agent)):
        ...                                   # this agent now asks the scripted model
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from mesh.testing.fake_anthropic import FakeAnthropic

if TYPE_CHECKING:
    from mesh.agent import Agent
    from mesh.models import ClaudeBrain

TEST_API_KEY = "test-key-for-the-local-fake"
# The SDK-known model the scripted brain asks for (the fake answers whatever is asked).
DEFAULT_MODEL = "claude-sonnet-5-5"


class ScriptedModel(FakeAnthropic):
    """Answers every request with `answer` as the forced tool's input (a Verdict by default)."""

    def __init__(
        self,
        vote: str = "approve",
        *reasons: str,
        answer: dict[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(self._respond, host=host, port=port)
        self.answer: dict[str, Any] = {}
        if answer is not None:
            self.answer = dict(answer)
        else:
            self.script(vote, *reasons)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    def script(self, vote: str = "approve", *reasons: str, **fields: Any) -> None:
        """Answer with this verdict from now on (`fields`: e.g. confidence=0.4)."""
        self.answer = {"vote": vote, "reasons": list(reasons) or ["scripted"], **fields}

    def _respond(self, request: dict[str, Any]) -> dict[str, Any]:
        return dict(self.answer)

    @property
    def system_prompts(self) -> list[str]:
        """The system prompt of every request so far, as text."""
        out = []
        for r in self.requests:
            system = r.get("system", "")
            if isinstance(system, list):  # content blocks
                system = "".join(b.get("text", "") for b in system if isinstance(b, dict))
            out.append(str(system))
        return out

    def brain(self, agent: Agent) -> ClaudeBrain:
        """A Claude brain with `agent`'s prompt and output type that calls this server (for
        `agent.override(...)`; no ANTHROPIC_* variables needed)."""
        import anthropic

        from mesh.models import ClaudeBrain

        client = anthropic.AsyncAnthropic(
            base_url=self.base_url, api_key=TEST_API_KEY, max_retries=0
        )
        return ClaudeBrain(
            system_prompt=agent.system_prompt() or "",
            output_type=agent.output_type,
            client=client,
        )

    def environ(self) -> dict[str, str]:
        """The variables that point the Claude brain (the anthropic SDK) at this server, and
        MESH_MODEL that makes prompted agents use it (the key alone does not: docs/models.md)."""
        return {
            "ANTHROPIC_BASE_URL": self.base_url,
            "ANTHROPIC_API_KEY": TEST_API_KEY,
            "MESH_MODEL": f"anthropic:{DEFAULT_MODEL},rules",
        }
