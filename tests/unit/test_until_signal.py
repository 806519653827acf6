"""Ctrl-C for the long-running commands (`mesh demo`, `mesh up`, …): a cancel that a library
loses is repeated, and the command still exits 130; a command that takes the stop as its end
(`mesh up`) ends as it chose."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest
import typer

from mesh.cli import running


def _interrupt_soon() -> None:
    asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGINT)


@pytest.fixture(autouse=True)
def _fast_recancel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(running, "RECANCEL_S", 0.2)


def test_a_lost_cancel_is_repeated_and_the_command_exits_130() -> None:
    reached: list[str] = []

    async def loses_one() -> str:
        _interrupt_soon()
        # As Python 3.11's wait_for (inside nats-py's requests) can: the cancel is dropped.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)
        reached.append("ran on")
        await asyncio.sleep(30)  # the repeated cancel ends this wait
        reached.append("never")
        return "done"

    with pytest.raises(typer.Exit) as stopped:
        running._until_signal(loses_one())
    assert stopped.value.exit_code == 130
    assert reached == ["ran on"]


def test_a_cancel_lost_at_the_end_still_exits_130() -> None:
    async def loses_the_last() -> str:
        _interrupt_soon()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)
        return "done"  # finished before the repeat: the signal still decides the exit code

    with pytest.raises(typer.Exit) as stopped:
        running._until_signal(loses_the_last())
    assert stopped.value.exit_code == 130


def test_a_command_that_takes_the_stop_as_its_end_ends_as_it_chose() -> None:
    async def until_stopped() -> str:
        _interrupt_soon()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()  # what `_until_stopped` does for `mesh up`
        await asyncio.sleep(0.5)  # its clean-up, past RECANCEL_S: not cancelled again
        return "stopped cleanly"

    assert running._until_signal(until_stopped()) == "stopped cleanly"
