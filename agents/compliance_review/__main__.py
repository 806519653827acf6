"""`python -m agents.compliance_review` — the same as `mesh run agents.compliance_review`."""

from mesh.agent import run_agent_module

run_agent_module(__package__)
