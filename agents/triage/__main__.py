"""`python -m agents.triage` — the same as `mesh run agents.triage`."""

from mesh.agent import run_agent_module

run_agent_module(__package__)
