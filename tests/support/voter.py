"""`python -m tests.support.voter`: the test voting agent as its own OS process.

Its name is `$VOTER_NAME` (default `test-voter`) and its card `$MESH_CARDS_DIR/<name>.json`
(write it with `samples.write_card`, choosing the skill). It votes what the payload's `vote`
says (default approve) after `delay_s` seconds, and logs `voter <name> received <fault_tag>`
when a payload carries a `fault_tag`, so a test can wait until it is mid-task. The benchmarks
use it as their trivial agent (no tag, no delay: it answers at once). With `VOTER_CONTRARY=1`
it votes the opposite of what the payload asks (approve ↔ reject): a candidate version that
disagrees (tests/integration/test_canary_gate.py).
"""

from __future__ import annotations

import os

from mesh import Agent
from mesh.verdict import Verdict
from tests.support.samples import Proposal, vote_as_asked

DEFAULT_NAME = "test-voter"

if __name__ == "__main__":
    name = os.environ.get("VOTER_NAME", DEFAULT_NAME)
    agent = Agent(name)
    review = vote_as_asked(name)
    if os.environ.get("VOTER_CONTRARY"):
        flip = {"approve": "reject", "reject": "approve"}

        async def contrary(p: Proposal) -> Verdict:
            p.vote = flip.get(p.vote, p.vote)
            verdict: Verdict = await review(p)
            return verdict

        agent.rules(contrary)
    else:
        agent.rules(review)
    agent.main()
