"""The security-review agent: cards/security-review.json + rules.py (+ prompt.md for Claude)."""

from pathlib import Path

from agents.security_review.rules import review
from mesh import Agent

agent = Agent("security-review", prompt=Path(__file__).with_name("prompt.md"))
agent.rules(review)
