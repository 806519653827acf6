"""`python -m agents.compliance_review` — the same as `mesh run agents.compliance_review`."""

from mesh import Agent

Agent.run_module(__package__)
