"""The compliance-review agent: cards/compliance-review.json + rules.py (+ prompt.md for Claude).

The prompt is filled from the domain rules (agents/rules.toml or MESH_RULES_FILE) when the
module loads, so a bad rules file stops the agent at start with a message naming the key."""

from pathlib import Path

from agents.compliance_review.rules import review
from agents.domain_rules import render_prompt
from mesh import Agent

agent = Agent("compliance-review", prompt=render_prompt(Path(__file__).with_name("prompt.md")))
agent.rules(review)
