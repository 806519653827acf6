"""The compliance-review agent: cards/compliance-review.json + rules.py (+ prompt.md for Claude)."""

from pathlib import Path

from agents.compliance_review.rules import review
from mesh import Agent

agent = Agent("compliance-review", prompt=Path(__file__).with_name("prompt.md"))
agent.rules(review)
