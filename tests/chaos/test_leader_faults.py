"""Break the node that leads a stream, in turn the events stream, the meta group, the decision
ledger (KV) and the decisions stream, while 2,000 releases are decided on a 3-node cluster:

- kill -9 it every ~10 s and start it again on the same store folder and ports 3 s later;
- SIGSTOP it for longer than the cluster's heartbeats, then SIGCONT it: a pause, not a crash.
  The paused node keeps its TCP connections open (clients do not notice for minutes), its peers
  elect new leaders behind its back, and when it wakes up it still believes it leads.

Each round first waits until the cluster is whole (every stream, bucket and the coordinators'
durable has a leader and all peers current). Every published event must end decided or
dead-lettered, none decided twice.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.chaos.support import Rig, leader_rounds

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(420)]

FIRST_AFTER_S = 2.0  # the first fault lands with events in flight
RESTART_AFTER_S = 3.0
PAUSE_S = 9.0  # raft heartbeats are 1 s and elections start after 4-9 s of silence
# One round every EVERY_S at most: kill and restart, or pause, resume and 3 s of quiet.
EVERY_S = {"kill": 10.0, "pause": PAUSE_S + 3.0}


@pytest.mark.parametrize("fault", ["kill", "pause"])
async def test_break_the_stream_leader_over_and_over(fault: str, chaos: Rig) -> None:
    running = await chaos.start_mesh()

    async def kill(node: str) -> str:
        chaos.cluster.kill9(node)
        await asyncio.sleep(RESTART_AFTER_S)
        await chaos.cluster.restart(node)
        return "kill"

    async def pause(node: str) -> str:
        began = time.monotonic()
        chaos.cluster.pause(node)
        try:
            await asyncio.sleep(PAUSE_S)
        finally:
            chaos.cluster.resume(node)
        return f"pause ({time.monotonic() - began:.1f}s)"

    rounds: list[str] = []
    faults = leader_rounds(
        chaos.bus,
        chaos.cluster,
        kill if fault == "kill" else pause,
        rounds,
        first_after_s=FIRST_AFTER_S,
        every_s=EVERY_S[fault],
        alive=running.alive,
    )
    await chaos.check(f"leader-{fault}", running, faults, rounds)
