"""`python -m agents.compliance_review` — the same as `mesh run agents.compliance_review`."""

from agents.compliance_review.agent import agent

agent.main()
