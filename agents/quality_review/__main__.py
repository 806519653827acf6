"""`python -m agents.quality_review` — the same as `mesh run agents.quality_review`."""

from mesh.agent import run_agent_module

run_agent_module(__package__)
