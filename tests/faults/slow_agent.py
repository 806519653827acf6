"""`python -m tests.faults.slow_agent`: an agent that sleeps `delay_s` (from the payload) and
then votes `vote` (default approve). Its card is `$MESH_CARDS_DIR/<name>.json`, so the test
chooses its skill; the name is `$SLOW_AGENT_NAME` (default slow-review).

It logs `slow agent received <tag>` when a message arrives (the tag is the payload's
`fault_tag`), so a test can wait until it is mid-task before killing it.
"""

from __future__ import annotations

import asyncio
import logging
import os

import msgspec

from mesh import Agent, Verdict

log = logging.getLogger("tests.faults.slow_agent")


class SlowInput(msgspec.Struct, forbid_unknown_fields=False):
    delay_s: float = 0.0
    vote: str = "approve"
    fault_tag: str = ""


agent = Agent(os.environ.get("SLOW_AGENT_NAME", "slow-review"))


@agent.rules
async def review(p: SlowInput) -> Verdict:
    log.info("slow agent received %s (sleeping %.1fs)", p.fault_tag, p.delay_s)
    if p.delay_s > 0:
        await asyncio.sleep(p.delay_s)
    return Verdict(vote=p.vote, reasons=[f"slow agent says {p.vote}"])  # type: ignore[arg-type]


if __name__ == "__main__":
    agent.main()
