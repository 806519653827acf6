"""`python -m agents.security_review` — the same as `mesh run agents.security_review`."""

from mesh import Agent

Agent.run_module(__package__)
