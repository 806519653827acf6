"""`python -m agents.quality_review` — the same as `mesh run agents.quality_review`."""

from agents.quality_review.agent import agent

agent.main()
