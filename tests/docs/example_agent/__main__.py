"""`python -m agents.four_eyes` — the same as `mesh run agents.four_eyes`."""

from .agent import agent

agent.main()
