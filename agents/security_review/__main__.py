"""`python -m agents.security_review` — the same as `mesh run agents.security_review`."""

from agents.security_review.agent import agent

agent.main()
