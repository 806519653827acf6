"""The registry heartbeat under trouble (issue 12 §2): a put that fails or hangs is retried
sooner than the next beat, each miss is a warning, and the entry declares the capacity given."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.js.kv import KeyValue

from mesh.bus import Bus
from mesh.cards import load_card, with_interfaces
from mesh.registry import Registration, Registry
from tests.support.samples import write_card
from tests.support.waits import eventually

pytestmark = pytest.mark.integration


class FlakyKV:
    """The real bucket, but heartbeat puts number `fail` raise and number `hang` never end."""

    def __init__(self, kv: KeyValue, *, fail: set[int], hang: set[int]) -> None:
        self.kv = kv
        self.fail = fail
        self.hang = hang
        self.puts = 0
        self.landed = 0

    async def put(self, key: str, value: bytes) -> int:
        self.puts += 1
        if self.puts in self.fail:
            raise ConnectionError("injected: the server is gone")
        if self.puts in self.hang:
            await asyncio.Event().wait()
        self.landed += 1
        revision: int = await self.kv.put(key, value)
        return revision

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kv, name)


async def test_failed_and_hanging_beats_are_retried_soon_and_said(
    bus: Bus, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry(bus)
    # Put 1 is the registration itself; beats 2 and 3 fail, 4 hangs, then they land again.
    flaky = FlakyKV(await reg._kv(), fail={2, 3}, hang={4})

    async def kv() -> FlakyKV:
        return flaky

    monkeypatch.setattr(reg, "_kv", kv)
    card = with_interfaces(
        load_card(write_card(tmp_path, "beater", "s1")),
        http_url=None,
        nats_subject="mesh.a2a.beater",
    )
    with caplog.at_level(logging.INFO, logger="mesh.registry"):
        async with reg.registered(card, "i1", capacity=7) as entry:
            assert entry.capacity == 7
            await eventually(lambda: flaky.landed >= 3, "beats land again", timeout=20)
            stored = await flaky.kv.get(entry.key)
            assert msgspec.json.decode(stored.value or b"", type=Registration).capacity == 7

    failures = [r.getMessage() for r in caplog.records if "heartbeat of" in r.getMessage()]
    failed = [m for m in failures if " failed " in m]
    assert len(failed) == 3, failures
    assert "ConnectionError" not in failed[0] and "injected" in failed[0]
    assert "(TimeoutError)" in failed[2]  # the hanging put was given up, not waited on for ever
    # Each retry is asked for sooner than a whole beat (the delay said, not a measured time).
    delays = [float(m) for f in failed for m in re.findall(r"retrying in ([0-9.]+)s", f)]
    assert len(delays) == 3 and all(d < reg.heartbeat_s for d in delays), failed
    assert any("landed again" in m for m in failures)


async def test_an_old_entry_without_capacity_still_decodes() -> None:
    old = b'{"agent":"a","instance":"i","card":{},"skills":[],"seen_at":1.0,"ttl_s":6.0}'
    assert msgspec.json.decode(old, type=Registration).capacity == 0
