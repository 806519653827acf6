"""Fixtures for the chaos suite: a 3-node nats-server cluster on 127.0.0.1 (R3 streams, fsync on
every write), a bus on it, and coordinator and agent processes pointed at all three nodes.

Not part of `make test`: every test in this folder is skipped unless the run selects the
`chaos` marker (`make chaos`, `pytest -m chaos tests/chaos`) or MESH_CHAOS=1 is set. Teardown
stops everything the test started: agents and coordinators, then the nodes (SIGCONT first for a
paused one).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mesh import subjects
from mesh.bus import Bus
from tests.chaos.support import NODES, Rig, chaos_procs, chaos_settings
from tests.support.launcher import Cluster

HERE = Path(__file__).resolve().parent
_SELECTS_CHAOS = re.compile(r"(?<!not )\bchaos\b")


def _chaos_selected(config: pytest.Config) -> bool:
    if os.environ.get("MESH_CHAOS") == "1":
        return True
    markexpr = str(config.getoption("-m") or "")
    return bool(_SELECTS_CHAOS.search(markexpr))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _chaos_selected(config):
        return
    skip = pytest.mark.skip(reason="chaos suite: `make chaos` (pytest -m chaos) or MESH_CHAOS=1")
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture
def chaos_cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path / "cluster", NODES)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
async def chaos_bus(chaos_cluster: Cluster) -> AsyncIterator[Bus]:
    bus = await Bus.connect(chaos_cluster.url, name="chaos-test", settings=chaos_settings())
    try:
        await bus.ensure()  # R3 streams and buckets, before any child process
        # The agents' task bucket too (as JetStreamTaskStore.open makes it): six replicas
        # starting at once on a fresh cluster race to create it, and one whose lookup lands
        # before the new stream has a leader times out and exits (reported; not what this
        # suite is about).
        await bus.kv(subjects.TASKS_BUCKET, ttl_s=bus.settings.task_ttl_s or None, history=1)
        yield bus
    finally:
        chaos_cluster.resume_all()  # a drain through a paused node would wait for it
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bus.close(), 10)
        with contextlib.suppress(Exception):
            await bus.nc.close()


@pytest.fixture
def chaos(chaos_cluster: Cluster, chaos_bus: Bus, tmp_path: Path) -> Iterator[Rig]:
    procs = chaos_procs(chaos_cluster, tmp_path)
    try:
        yield Rig(chaos_cluster, chaos_bus, procs)
    finally:
        chaos_cluster.resume_all()
        procs.stop()
