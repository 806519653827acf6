"""The console driven the way a person uses it, in headless Chromium: sign in, watch an event
published with `mesh publish` become a decision live, open it, replay a dead letter, and see
nothing of another tenant, approve a waiting human approval and see the decision arrive. Each
test saves screenshots of the pages it visits (into docs/console/, which docs/console.md shows,
only with UPDATE_SCREENSHOTS=1: tests/browser/support.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from mesh import approvals
from mesh.console import data
from tests.browser.support import Console, shot, sign_in
from tests.support.waits import eventually

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "agents" / "samples"
WAIT_MS = 30_000


def _sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / name).read_text())
    return data


async def mesh_publish(console: Console, *args: str) -> str:
    """`mesh publish ARGS` as its own process against the harness's server, as the run's
    operator (as a user next to `mesh up` would); the event id it prints."""
    env = {**os.environ, "MESH_NATS_URL": console.mesh.url, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from mesh.cli import main; main()",
        "publish",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=str(ROOT),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip().split()[0]


async def expect_page(page: Any) -> None:
    """The page rendered, not the console's error page (whose message then fails the test)."""
    if await page.locator("#error").count():
        raise AssertionError(f"{page.url}: {await page.inner_text('main')}")


async def test_sign_in_see_a_published_event_decided_live_and_open_it(
    console: Console, browser: Any
) -> None:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    await page.goto(f"{console.url}/signin")
    await shot(page, "signin")
    # A wrong token is refused, saying why (and nothing of the token).
    await page.fill("#token", "not-a-token")
    await page.click("#signin")
    assert "not a JWT" in await page.inner_text("#signin-error")
    await context.close()

    page = await sign_in(browser, console, console.token())
    assert "operator:" in await page.inner_text("#who")
    await page.wait_for_selector("#live-state:has-text('live:')")

    event_id = await mesh_publish(
        console, "release.proposed", f"@{SAMPLES / 'release_clean.json'}", "--tenant", "acme"
    )
    # The event appears while it is being decided, then its decision, without a reload.
    await page.wait_for_selector(f"#live-events li.event[data-event='{event_id}']")
    row = page.locator(f"#decisions tr.decision[data-event='{event_id}']")
    await row.wait_for()
    assert "approved" in await row.inner_text()
    assert "verified" in await row.inner_text()
    rejected = await console.mesh.publish(
        "release.proposed", _sample("release_secret.json"), tenant="acme"
    )
    rejected_row = page.locator(f"#decisions tr.decision[data-event='{rejected}']")
    assert "rejected" in await rejected_row.inner_text()
    await page.reload()  # the plots are drawn when the page is: now with this decision
    await page.wait_for_selector("svg[aria-label='decisions per minute by outcome'] rect")
    await shot(page, "decisions")
    row = page.locator(f"#decisions tr.decision[data-event='{event_id}']")

    await row.locator("a").click()
    await page.wait_for_url(f"**/decisions/acme/{event_id}")
    await expect_page(page)
    assert await page.inner_text("#verdict") == "approved"
    assert "verified" in await page.inner_text("#signature")
    votes = await page.inner_text("#votes")
    for agent in ("security-review", "compliance-review", "quality-review"):
        assert agent in votes
    assert "no secrets" in votes  # the security reviewer's reason
    assert "verified" in await page.inner_text("#audit-state")
    await shot(page, "decision")

    await page.goto(f"{console.url}/agents")
    table = await page.inner_text("#agents")
    assert "security-review" in table and "signed" in table
    await shot(page, "agents")

    await page.goto(f"{console.url}/audit")
    await page.wait_for_selector("#audit td:has-text('acme')")
    await shot(page, "audit")


async def test_replay_a_dead_letter(console: Console, browser: Any) -> None:
    # A type no policy knows: dead-lettered (unknown_type), replayable to its subject.
    event_id = await console.mesh.publish("nothing.here", {"x": 1, "password": "hunter2"})
    await console.mesh.dead_letter(event_id)
    page = await sign_in(browser, console, console.token())
    await page.goto(f"{console.url}/dead-letters")
    row = page.locator("#dead-letters tr", has_text=event_id)
    await row.wait_for()
    await shot(page, "dead-letters")

    await row.locator("a").first.click()
    body = await page.inner_text("#body")
    assert "hunter2" not in body and '"x": 1' in body  # the secret-looking field is masked
    await shot(page, "dead-letter")
    await page.click("#replay")
    await page.wait_for_url("**/dead-letters?done=*")
    assert "replayed" in await page.inner_text("#done")
    # Published again: the harness (subscribed to every event) sees it a second time.
    await eventually(
        lambda: len([e for e in console.mesh.events("nothing.here") if e.id == event_id]) >= 2,
        "the replayed event on its subject",
        timeout=30,
    )

    await page.goto(f"{console.url}/dead-letters/purge")
    await shot(page, "purge")


async def test_a_tenant_sees_none_of_another_tenants_data(console: Console, browser: Any) -> None:
    mesh = console.mesh
    acme_decided = await mesh.publish(
        "release.proposed", _sample("release_clean.json"), tenant="acme"
    )
    acme_dead = await mesh.publish("nothing.here", {"acme": True}, tenant="acme")
    globex_decided = await mesh.publish(
        "release.proposed", _sample("release_secret.json"), tenant="globex"
    )
    await mesh.decision(acme_decided)
    await mesh.dead_letter(acme_dead)
    await mesh.decision(globex_decided)

    page = await sign_in(browser, console, console.token("reader", "globex-viewer", "globex"))
    assert "tenant globex" in await page.inner_text("#who")
    await page.wait_for_selector(f"#decisions tr[data-event='{globex_decided}']")
    await page.wait_for_selector("#live-state:has-text('live:')")
    # Live: an acme event published before a globex one would arrive first if it could.
    acme_live = await mesh.publish("nothing.else", {"acme": 2}, tenant="acme")
    globex_live = await mesh.publish("nothing.else", {"globex": 2}, tenant="globex")
    await page.wait_for_selector(f"#live-events li[data-event='{globex_live}']")
    html = await page.content()
    for acme_id in (acme_decided, acme_dead, acme_live):
        assert acme_id not in html

    # Asking for acme by name changes nothing: the server decides what a reader sees.
    await page.goto(f"{console.url}/decisions?tenant=acme")
    assert acme_decided not in await page.content()
    response = await page.goto(f"{console.url}/decisions/acme/{acme_decided}")
    assert response is not None and response.status == 404
    await page.goto(f"{console.url}/dead-letters?tenant=acme")
    dead = await page.content()
    assert acme_dead not in dead and "acme" not in await page.inner_text("#dead-letters")
    await page.goto(f"{console.url}/audit")
    audit_table = await page.inner_text("#audit")
    assert "globex" in audit_table and "acme" not in audit_table
    # The export, asked for acme with the reader's session cookie: globex's chain only.
    export = await page.request.get(f"{console.url}/audit/export?tenant=acme")
    assert export.status == 200
    assert b'"tenant":"globex"' in await export.body()
    assert b"acme" not in await export.body()
    # A reader looks but does not act.
    await page.goto(f"{console.url}/dead-letters")
    assert await page.locator("button.replay").count() == 0


async def test_a_person_approves_in_the_console_and_the_decision_arrives_live(
    approvals_console: Console, browser: Any
) -> None:
    console = approvals_console
    mesh = console.mesh
    # The reviewers approve; the policy then waits for a release manager.
    event_id = await mesh.publish("release.proposed", _sample("release_clean.json"), tenant="acme")

    async def asked() -> bool:
        found = await approvals.inbox(mesh.bus, "acme", None)
        return any(r.event_id == event_id and r.status == "open" for r in found.values())

    await eventually(asked, "the release manager asked", timeout=60)

    # Someone without the role asked sees nothing waiting; the operator looks, cannot answer.
    nurse = await sign_in(browser, console, console.token("human", "nick", "acme"))
    await nurse.goto(f"{console.url}/approvals")
    await expect_page(nurse)
    assert event_id not in await nurse.content()
    operator = await sign_in(browser, console, console.token())
    await operator.goto(f"{console.url}/approvals")
    item = operator.locator(f"section.approval:has-text('{event_id}')")
    await item.wait_for()
    assert await item.locator("form").count() == 0

    # The release manager: the evidence (the event, the agents' votes and reasons).
    page = await sign_in(browser, console, console.token("human", "rita", "acme"))
    watcher = await page.context.new_page()  # the decisions list, live, beside the inbox
    watcher.set_default_timeout(WAIT_MS)
    await watcher.goto(f"{console.url}/decisions")
    await watcher.wait_for_selector("#live-state:has-text('live:')")
    await page.goto(f"{console.url}/approvals")
    await expect_page(page)
    item = page.locator(f"section.approval:has-text('{event_id}')")
    votes = await item.locator("table.votes").inner_text()
    assert "security-review" in votes and "no secrets" in votes
    # The event's data (masked as a dead letter's preview).
    assert "billing-api" in await item.locator("pre").inner_text()
    assert "release-manager" in await item.inner_text()
    await shot(page, "approvals")
    await item.locator("input[name=reason]").fill("reviewed the diff and the votes")
    await item.locator("button.approve").click()
    await page.wait_for_url("**/approvals?done=*")
    done = page.locator("#done")
    assert await done.get_attribute("data-receipt") == "accepted", await done.inner_text()

    # The decision arrives on the live list without a reload, made with the person's vote.
    row = watcher.locator(f"#decisions tr.decision[data-event='{event_id}']")
    await row.wait_for()
    assert "approved" in await row.inner_text()
    decision = await mesh.decision(event_id)
    human = decision.votes[-1]
    assert (human.agent, human.brain, human.counted_as) == (
        "human:rita",
        "human via console",
        "approve",
    )

    # The audit trail says who answered, and through what.
    async def answered() -> list[dict[str, Any]]:
        records = await data.audit_of_event(mesh.bus, "acme", event_id)
        return [r for r in records if (r.get("data") or {}).get("act") == "answered"]

    [record] = await eventually(answered, "the answer's audit record", timeout=30)
    assert record["data"]["note"] == "answered via console by rita"
    assert record["data"]["signed"]["via"] == "console"
    # And nothing waits any more.
    await page.goto(f"{console.url}/approvals")
    assert event_id not in await page.inner_text("main")
