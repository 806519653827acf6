"""Kept for the integration tests that import from here: the names now live in `tests.support`
(one `eventually`, one voting agent, one card writer). New code imports from there."""

from __future__ import annotations

from tests.support.samples import Proposal, jsonrpc, voting_agent, write_card
from tests.support.waits import eventually

__all__ = ["Proposal", "eventually", "jsonrpc", "voting_agent", "write_card"]
