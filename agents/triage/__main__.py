"""`python -m agents.triage` — the same as `mesh run agents.triage`."""

from agents.triage.agent import agent

agent.main()
