"""The quality-review agent: its card (cards/quality-review.json), its rules, its prompt for Claude."""

from pathlib import Path

from agents.quality_review.rules import review
from mesh import Agent

agent = Agent("quality-review", prompt=Path(__file__).with_name("prompt.md"))
agent.rules(review)
