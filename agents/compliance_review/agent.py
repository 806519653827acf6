"""The compliance-review agent: its card (cards/compliance-review.json), its rules, its prompt for Claude."""

from pathlib import Path

from agents.compliance_review.rules import review
from mesh import Agent

agent = Agent("compliance-review", prompt=Path(__file__).with_name("prompt.md"))
agent.rules(review)
