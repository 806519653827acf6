"""The quality-review agent: cards/quality-review.json + rules.py (+ prompt.md for Claude)."""

from pathlib import Path

from agents.quality_review.rules import review
from mesh import Agent

agent = Agent("quality-review", prompt=Path(__file__).with_name("prompt.md"))
agent.rules(review)
