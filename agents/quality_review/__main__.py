"""`python -m agents.quality_review` — the same as `mesh run agents.quality_review`."""

from mesh import Agent

Agent.run_module(__package__)
