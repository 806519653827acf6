"""`python -m agents.four_eyes` — the same as `mesh run agents.four_eyes`."""

from mesh import Agent

Agent.run_module(__package__)  # settings checked first: a bad one is one line, not a traceback
