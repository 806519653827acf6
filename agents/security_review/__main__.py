"""`python -m agents.security_review` — the same as `mesh run agents.security_review`."""

from mesh.agent import run_agent_module

run_agent_module(__package__)
