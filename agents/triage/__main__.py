"""`python -m agents.triage` — the same as `mesh run agents.triage`."""

from mesh import Agent

Agent.run_module(__package__)
