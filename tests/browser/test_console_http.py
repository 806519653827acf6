"""The console's guards over plain HTTP (no browser needed, so these run without chromium):
sign-in, the session cookie's attributes, CSRF and Origin on every action, who may act, the
Host check. Each refusal sits next to the same request done right, which succeeds: what is
refused is refused for the reason the test names, not because the action could not work."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from mesh import subjects
from mesh.bus import Bus, read_stream
from mesh.console import create_app
from mesh.console.approvals import PendingApproval, Receipt
from mesh.console.auth import User
from mesh.identity import IdentityDir, load_identity, load_trust
from mesh.records import dead_letter, encoder

pytestmark = pytest.mark.integration

BASE = "http://127.0.0.1"
SUBJECT = subjects.event("acme", "nothing.here")


@dataclass
class Setup:
    client: httpx.AsyncClient
    bus: Bus
    ids: IdentityDir
    dlq_seq: int


@pytest.fixture
async def setup(bus: Bus, identities: IdentityDir) -> AsyncIterator[Setup]:
    record = dead_letter(
        reason="unknown_type", error="no policy", subject=SUBJECT, body=b'{"id": "e1"}'
    )
    ack = await bus.publish(subjects.dlq("acme", "unknown_type"), encoder.encode(record))
    app = create_app(bus=bus, trust=load_trust(identities.trust_path))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        yield Setup(client, bus, identities, ack.seq)


async def _sign_in(client: httpx.AsyncClient, token: str) -> str:
    """Signs `client` in; returns the session's CSRF token, read from a page as a browser would."""
    r = await client.post("/signin", data={"token": token}, headers={"Origin": BASE})
    assert r.status_code == 303, r.text
    page = await client.get("/dead-letters")
    assert page.status_code == 200
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


async def _replays(bus: Bus) -> int:
    return len(await read_stream(bus, subjects.EVENTS_STREAM, filter_subject=SUBJECT))


async def test_an_action_without_its_csrf_token_or_from_elsewhere_is_refused(
    setup: Setup,
) -> None:
    client, seq = setup.client, setup.dlq_seq
    csrf = await _sign_in(client, load_identity(setup.ids.operator_path).token)
    url = f"/dead-letters/{seq}/replay"

    refused = [
        ({}, {"Origin": BASE}),  # no CSRF token
        ({"csrf": "guessed"}, {"Origin": BASE}),  # a wrong one
        ({"csrf": csrf}, {"Origin": "http://evil.example"}),  # another site's page
        ({"csrf": csrf}, {}),  # neither Origin nor Referer
        ({"csrf": csrf}, {"Referer": "http://evil.example/x"}),
    ]
    for form, headers in refused:
        r = await client.post(url, data=form, headers=headers)
        assert r.status_code == 403, (form, headers, r.status_code)
        assert "refused" in r.text
    assert await _replays(setup.bus) == 0

    r = await client.post(url, data={"csrf": csrf}, headers={"Origin": BASE})
    assert r.status_code == 303, r.text
    assert r.headers["location"].startswith("/dead-letters?done=replayed")
    assert await _replays(setup.bus) == 1

    # The referer of the console's own page does as well as its Origin.
    r = await client.post(url, data={"csrf": csrf}, headers={"Referer": f"{BASE}/dead-letters"})
    assert r.status_code == 303
    # Sign-out is an action too.
    assert (await client.post("/signout", data={}, headers={"Origin": BASE})).status_code == 403


async def test_sign_in_cookie_and_who_may_act(setup: Setup) -> None:
    client = setup.client
    # No anonymous access: every page sends you to sign in; the live stream says 401.
    r = await client.get("/decisions")
    assert r.status_code == 303 and r.headers["location"].startswith("/signin")
    assert (await client.get("/live")).status_code == 401
    # Sign-in from another site is refused, whatever the token.
    token = load_identity(setup.ids.operator_path).token
    r = await client.post(
        "/signin", data={"token": token}, headers={"Origin": "http://evil.example"}
    )
    assert r.status_code == 403
    # A machine identity cannot sign in.
    agent = load_identity(setup.ids.issue("agent", "console-test-agent")).token
    r = await client.post("/signin", data={"token": agent}, headers={"Origin": BASE})
    assert r.status_code == 401 and "cannot sign in" in r.text

    r = await client.post("/signin", data={"token": token}, headers={"Origin": BASE})
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert "secure" not in cookie  # plain http on loopback: a Secure cookie would never return
    assert token.lower() not in cookie  # the session names the user; it is not the token

    # A reader of acme looks but does not act, even with its own valid CSRF token.
    reader = load_identity(setup.ids.issue("reader", "acme-viewer", tenant="acme")).token
    client.cookies.clear()
    csrf = await _sign_in(client, reader)
    r = await client.post(
        f"/dead-letters/{setup.dlq_seq}/replay", data={"csrf": csrf}, headers={"Origin": BASE}
    )
    assert r.status_code == 403 and "may look but not act" in r.text
    # A tampered cookie is no session.
    session = client.cookies.get("mesh_console") or ""
    client.cookies.set("mesh_console", session[:-2] + ("AA" if session[-2:] != "AA" else "BB"))
    assert (await client.get("/decisions")).status_code == 303


async def test_another_host_name_gets_nothing(setup: Setup) -> None:
    # DNS rebinding: a page on a name that resolves to 127.0.0.1 reaches the port, not the app.
    r = await setup.client.get("/signin", headers={"Host": "evil.example"})
    assert r.status_code == 400
    assert (await setup.client.get("/signin")).status_code == 200


async def test_no_framing_no_foreign_script_no_open_redirect(setup: Setup) -> None:
    client = setup.client
    page = await client.get("/signin")
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["cache-control"] == "no-store"
    token = load_identity(setup.ids.operator_path).token
    for target, lands in (
        ("/dead-letters", "/dead-letters"),
        ("//evil.example/x", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example", "/"),
    ):
        r = await client.post(
            "/signin", data={"token": token, "next": target}, headers={"Origin": BASE}
        )
        assert r.status_code == 303 and r.headers["location"] == lands, (target, r.headers)


# -- the approvals inbox, over a stand-in for issue 15's approvals -------------------------------
class FakeApprovals:
    """Two approvals waiting (acme's, globex's) and what was decided: the console's half of the
    inbox only (listing per tenant, deciding with CSRF), not human approvals themselves. It
    lists acme's to globex's users too, as a faulty adapter would: the console must still
    show and accept only the user's tenant's."""

    available = True

    def __init__(self) -> None:
        self.items = [
            PendingApproval(
                "ap-acme",
                "acme",
                "e1",
                "release.proposed",
                0.0,
                "ship acme?",
                {"diff": "+1", "api_key": "sk-secret"},
                may_answer=True,
            ),
            PendingApproval(
                "ap-globex",
                "globex",
                "e2",
                "release.proposed",
                0.0,
                "ship globex?",
                may_answer=True,
            ),
            # Shown to look at, not to answer (the user holds no role asked).
            PendingApproval("ap-look", "acme", "e3", "release.proposed", 0.0, "look only"),
        ]
        self.decided: list[tuple[str, str, bool, str, str]] = []

    async def pending(self, user: User) -> list[PendingApproval]:
        return list(self.items)

    async def decide(self, approval_id: str, *, user: User, approve: bool, reason: str) -> Receipt:
        self.decided.append((approval_id, user.tenant, approve, reason, f"{user.role}:{user.name}"))
        return Receipt(False, "the coordinator said no")


async def test_the_inbox_shows_a_tenant_its_approvals_and_takes_a_decision(
    bus: Bus, identities: IdentityDir
) -> None:
    approvals = FakeApprovals()
    app = create_app(bus=bus, trust=load_trust(identities.trust_path), approvals=approvals)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        reader = load_identity(identities.issue("reader", "acme-approver", tenant="acme")).token
        csrf = await _sign_in(client, reader)
        page = (await client.get("/approvals")).text
        assert "ship acme?" in page and "ship globex?" not in page and "ap-globex" not in page
        assert "sk-secret" not in page  # evidence is masked like dead-letter bodies

        def post(approval: str, form: dict[str, str]) -> Any:
            return client.post(f"/approvals/{approval}", data=form, headers={"Origin": BASE})

        assert (await post("ap-acme", {"decision": "approve", "reason": "ok"})).status_code == 403
        assert (
            await post("ap-globex", {"csrf": csrf, "decision": "approve", "reason": "ok"})
        ).status_code == 404
        assert (await post("ap-acme", {"csrf": csrf, "decision": "approve"})).status_code == 400
        assert page.count('<form method="post" action="/approvals/') == 1  # not ap-look's
        look = await post("ap-look", {"csrf": csrf, "decision": "approve", "reason": "ok"})
        assert look.status_code == 403 and "may look but not answer" in look.text
        assert approvals.decided == []
        r = await post("ap-acme", {"csrf": csrf, "decision": "deny", "reason": "no tests"})
        assert r.status_code == 303, r.text
        # The receipt is what the user sees next: refused, and why.
        shown = (await client.get(r.headers["location"])).text
        assert "REFUSED" in shown and "the coordinator said no" in shown
    assert approvals.decided == [("ap-acme", "acme", False, "no tests", "reader:acme-approver")]


async def test_a_live_stream_ends_when_its_sessions_issuer_is_revoked(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mesh.console import live as console_live
    from mesh.console import serving
    from mesh.identity import Signer, Trust, mint_token

    monkeypatch.setattr(console_live, "LIVE_RECHECK_S", 0.1)
    issuer = Signer.generate()
    trust = Trust()
    trust.add(issuer, "operator", "issuer")
    app = create_app(bus=bus, trust=trust)  # this object is the trust: changed in place below
    async with serving(app, port=0) as url, httpx.AsyncClient(base_url=url) as client:
        token = mint_token(issuer, name="ops", role="operator", tenant="*")
        r = await client.post("/signin", data={"token": token}, headers={"Origin": url})
        assert r.status_code == 303

        async def lines_until_the_end() -> list[str]:
            seen: list[str] = []
            async with client.stream("GET", "/live") as live:
                async for line in live.aiter_lines():
                    seen.append(line)
                    if line == "event: ready":
                        trust.revoke(issuer.kid)
            return seen

        # The stream ends by itself, instead of running until the browser goes.
        seen = await asyncio.wait_for(lines_until_the_end(), 10)
    assert "event: ready" in seen
