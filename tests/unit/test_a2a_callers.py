"""Who may call an agent (mesh.a2a.auth), in process: bearer tokens against a trust file, the
refusal both transports send, the cards that say so, and messageId de-duplication per caller.
The same attacks over a real network are in tests/integration/test_a2a_auth.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from a2a.helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import AgentCard, Message, Part, Role, SendMessageRequest, Task

from agents.conformance.app import without_a2a_auth
from agents.conformance.executor import ConformanceExecutor
from mesh.a2a import dispatch, jsonrpc
from mesh.a2a.auth import Authenticator, PrincipalUser, Unauthenticated
from mesh.a2a.server import A2AServer
from mesh.cards import BEARER_SCHEME, card_to_dict, load_card, parse_card, with_interfaces
from mesh.errors import ConfigError
from mesh.identity import Signer, Trust, mint_token, save_trust, verify_token
from mesh.settings import Settings

ISSUER = Signer.generate()


def _trust(*issuers: Signer) -> Trust:
    trust = Trust()
    for signer in issuers or (ISSUER,):
        trust.add(signer, "operator", "operator")
    return trust


def _token(name: str = "p", tenant: str = "acme", *, issuer: Signer = ISSUER, **kw: Any) -> str:
    return mint_token(issuer, name=name, role="publisher", tenant=tenant, **kw)


def _card(authenticated: bool = True) -> AgentCard:
    return with_interfaces(
        load_card("conformance"),
        http_url="http://agent/",
        nats_subject="mesh.a2a.conformance",
        authenticated=authenticated,
    )


# -- the authenticator ----------------------------------------------------------------------------
def test_a_valid_token_names_its_principal_and_owner() -> None:
    user = Authenticator(_trust()).authenticate(f"Bearer {_token('alice', 'acme')}")
    assert isinstance(user, PrincipalUser) and user.is_authenticated
    assert user.user_name == "acme/publisher:alice"
    # The scheme is case-insensitive (RFC 7235), surrounding space is not part of the token.
    assert Authenticator(_trust()).authenticate(f"  bearer  {_token()} ").user_name


@pytest.mark.parametrize(
    "header, reason",
    [
        (None, "needs a bearer token"),
        ("", "needs a bearer token"),
        ("Bearer", "needs a bearer token"),
        ("Basic dXNlcjpwYXNz", "needs a bearer token"),
        ("Bearer not-a-jwt", "not a JWT"),
        (f"Bearer {_token(ttl_s=-60)}", "expired"),
        (f"Bearer {_token(issuer=Signer.generate())}", "not signed by a trusted issuer"),
        (f"Bearer {_token()[:-4]}AAAA", "does not verify"),
    ],
    ids=["none", "empty", "no-token", "basic", "garbage", "expired", "untrusted", "tampered"],
)
def test_what_does_not_authenticate(header: str | None, reason: str) -> None:
    with pytest.raises(Unauthenticated, match=reason) as err:
        Authenticator(_trust()).authenticate(header)
    missing = reason == "needs a bearer token"
    assert err.value.missing == missing
    challenge = err.value.challenge
    assert challenge.startswith('Bearer realm="quorum-mesh"')
    assert ('error="invalid_token"' in challenge) != missing  # RFC 6750 §3.1
    assert (header or "x").split()[-1] not in challenge or missing  # never the token


def test_a_token_is_verified_once_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    import mesh.a2a.auth as auth_module

    checks: list[str] = []

    def counting(trust: Trust, token: str) -> Any:
        checks.append(token)
        return verify_token(trust, token)

    monkeypatch.setattr(auth_module, "verify_token", counting)
    auth = Authenticator(_trust())
    token = _token(ttl_s=60)
    for _ in range(3):
        assert auth.authenticate(f"Bearer {token}").is_authenticated
    assert len(checks) == 1  # remembered
    # Past its expiry the remembered token is checked again (and the check refuses it).
    later = time.time() + 120
    monkeypatch.setattr(
        auth_module, "time", SimpleNamespace(time=lambda: later, monotonic=time.monotonic)
    )
    assert auth.authenticate(f"Bearer {token}").is_authenticated  # PyJWT's clock is the real one
    assert len(checks) == 2


def test_a_revoked_issuer_is_refused_once_the_trust_file_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_trust(_trust(), tmp_path / "trust.json")
    monkeypatch.setattr("mesh.a2a.auth._RELOAD_EVERY_S", 0.0)  # look at the file every time
    auth = Authenticator.from_settings(Settings(trust=path, insecure=""), agent="a")
    token = _token()
    assert auth.authenticate(f"Bearer {token}").is_authenticated  # verified and remembered
    revoked = _trust()
    revoked.revoke(ISSUER.kid)
    save_trust(revoked, path)
    os.utime(path, (time.time() + 5, time.time() + 5))  # a new mtime, whatever the clock's grain
    with pytest.raises(Unauthenticated, match="not signed by a trusted issuer"):
        auth.authenticate(f"Bearer {token}")


def test_insecure_a2a_lets_everyone_in_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mesh.a2a.auth"):
        auth = Authenticator.from_settings(Settings(insecure="bus,a2a"), agent="loud-agent")
    assert not auth.required
    assert not auth.authenticate(None).is_authenticated
    assert not auth.authenticate("Bearer whatever").is_authenticated  # not even looked at
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "loud-agent" in record.getMessage()
    assert "WITHOUT AUTHENTICATION" in record.getMessage()


def test_no_trust_file_is_a_clear_error(tmp_path: Path) -> None:
    nowhere = Settings(trust=None, home=tmp_path, insecure="")
    with pytest.raises(ConfigError, match="trust file"):
        Authenticator.from_settings(nowhere, agent="a")
    # MESH_INSECURE=bus does not switch A2A authentication off: still an error, not a pass.
    with pytest.raises(ConfigError, match="MESH_INSECURE=a2a to answer"):
        Authenticator.from_settings(nowhere.model_copy(update={"insecure": "bus"}), agent="a")


def test_authentication_is_on_by_default() -> None:
    assert Authenticator.from_settings(Settings(), agent="a").required
    assert A2AServer(_card(), ConformanceExecutor()).auth.required
    # The conformance launcher, and only it, switches it off.
    assert not Authenticator.from_settings(without_a2a_auth(Settings()), agent="c").required


# -- the refusal, on HTTP ------------------------------------------------------------------------
class _Counting(AgentExecutor):  # type: ignore[misc]
    """Completes every task, counting how often it ran."""

    def __init__(self) -> None:
        self.runs = 0

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        self.runs += 1
        assert context.message is not None
        task = context.current_task or new_task_from_user_message(context.message)
        await event_queue.enqueue_event(task)
        text = "".join(p.text for p in context.message.parts)
        await TaskUpdater(event_queue, task.id, task.context_id).complete(
            Message(role=Role.ROLE_AGENT, message_id=f"r-{task.id}", parts=[Part(text=text)])
        )

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError


def _rpc(method: str, params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).encode()


MESSAGE = {"role": "ROLE_USER", "messageId": "m-1", "parts": [{"text": "hi"}]}
EVERY_METHOD = [
    _rpc("SendMessage", {"message": MESSAGE}),
    _rpc("SendStreamingMessage", {"message": MESSAGE}),
    _rpc("GetTask", {"id": "x"}),
    _rpc("ListTasks", {}),
    _rpc("CancelTask", {"id": "x"}),
    _rpc("SubscribeToTask", {"id": "x"}),
    _rpc("CreateTaskPushNotificationConfig", {"taskId": "x", "url": "https://93.184.215.14/"}),
    _rpc("GetTaskPushNotificationConfig", {"taskId": "x", "id": "c"}),
    _rpc("ListTaskPushNotificationConfigs", {"taskId": "x"}),
    _rpc("DeleteTaskPushNotificationConfig", {"taskId": "x", "id": "c"}),
    _rpc("GetExtendedAgentCard", {}),
    _rpc("NoSuchMethod", {}),
    b"not json at all",
]


async def test_http_refuses_every_method_without_a_token_but_serves_the_public_card() -> None:
    executor = _Counting()
    server = A2AServer(_card(), executor, auth=Authenticator(_trust()))
    bad = {"A2A-Version": "1.0", "Authorization": f"Bearer {_token(ttl_s=-1)}"}
    transport = httpx.ASGITransport(app=server.http_app())
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as http:
            for body in EVERY_METHOD:
                for headers in ({"A2A-Version": "1.0"}, bad):
                    r = await http.post("/", content=body, headers=headers)
                    assert r.status_code == 401, (body, r.text)
                    assert r.headers["www-authenticate"].startswith('Bearer realm="quorum-mesh"')
                    assert r.headers["content-type"] == "application/json"
                    doc = r.json()
                    assert doc["id"] is None
                    assert doc["error"]["code"] == jsonrpc.UNAUTHENTICATED
            card = await http.get("/.well-known/agent-card.json")
            good = {"A2A-Version": "1.0", "Authorization": f"Bearer {_token()}"}
            served = await http.post("/", content=EVERY_METHOD[0], headers=good)
    finally:
        await server.aclose()
    assert executor.runs == 1  # only the authenticated request reached the agent
    assert served.json()["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
    assert card.status_code == 200
    declared = card.json()
    assert declared["securitySchemes"][BEARER_SCHEME]["httpAuthSecurityScheme"] == {
        "scheme": "Bearer",
        "bearerFormat": "JWT",
        "description": declared["securitySchemes"][BEARER_SCHEME]["httpAuthSecurityScheme"][
            "description"
        ],
    }
    assert declared["securityRequirements"] == [{"schemes": {BEARER_SCHEME: {}}}]


async def test_the_refusal_is_the_same_bytes_for_both_transports() -> None:
    auth = Authenticator(_trust())
    refused = dispatch.authenticate(auth, None)
    assert isinstance(refused, dispatch.Answer)
    assert refused.challenge == 'Bearer realm="quorum-mesh"'
    assert json.loads(refused.body) == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {
            "code": jsonrpc.UNAUTHENTICATED,
            "message": "Unauthenticated: this agent needs a bearer token",
        },
    }
    user = dispatch.authenticate(auth, f"Bearer {_token('bob', 'beta')}")
    assert isinstance(user, PrincipalUser)
    context = dispatch.call_context({"Authorization": "Bearer x", "A2A-Version": "1.0"}, user=user)
    assert context.user.user_name == "beta/publisher:bob"
    assert "authorization" not in context.state["headers"]


# -- cards ----------------------------------------------------------------------------------------
def test_live_cards_declare_the_bearer_scheme_only_when_it_is_checked() -> None:
    secured, open_ = card_to_dict(_card(True)), card_to_dict(_card(False))
    parse_card(secured)  # a2a-sdk's types take it
    scheme = secured["securitySchemes"][BEARER_SCHEME]["httpAuthSecurityScheme"]
    assert (scheme["scheme"], scheme["bearerFormat"]) == ("Bearer", "JWT")
    assert secured["securityRequirements"] == [{"schemes": {BEARER_SCHEME: {}}}]
    # No mTLS: agents serve no TLS, so the card does not offer it.
    assert [k for v in secured["securitySchemes"].values() for k in v] == ["httpAuthSecurityScheme"]
    assert "securitySchemes" not in open_ and "securityRequirements" not in open_
    # Declared once, however often the runtime fills a card in.
    again = card_to_dict(
        with_interfaces(_card(True), http_url=None, nats_subject="s", authenticated=True)
    )
    assert again["securityRequirements"] == secured["securityRequirements"]


# -- messageId de-duplication, per caller --------------------------------------------------------
def _as(name: str, tenant: str) -> ServerCallContext:
    user = Authenticator(_trust()).authenticate(f"Bearer {_token(name, tenant)}")
    return ServerCallContext(user=user, state={"headers": {"a2a-version": "1.0"}})


def _send(text: str, message_id: str = "same-id") -> SendMessageRequest:
    return SendMessageRequest(
        message=Message(role=Role.ROLE_USER, message_id=message_id, parts=[Part(text=text)])
    )


async def test_a_reused_message_id_is_a_repeat_only_for_the_caller_who_sent_it() -> None:
    executor = _Counting()
    server = A2AServer(_card(), executor, InMemoryTaskStore(), auth=Authenticator(_trust()))
    handler = server.handler
    alice, bob = _as("alice", "acme"), _as("bob", "beta")
    try:
        first = await handler.on_message_send(_send("alice's secret"), alice)
        again = await handler.on_message_send(_send("alice's secret"), alice)
        bobs = await handler.on_message_send(_send("bob's own"), bob)
        # At the same time, from both: each still gets their own.
        both = await asyncio.gather(
            handler.on_message_send(_send("a2", "m-2"), alice),
            handler.on_message_send(_send("b2", "m-2"), bob),
        )
    finally:
        await server.aclose()
    assert isinstance(first, Task) and isinstance(again, Task) and isinstance(bobs, Task)
    assert again.id == first.id  # alice's retry: the task she has
    assert bobs.id != first.id  # bob: a task of his own, made for him
    assert [p.text for p in bobs.status.message.parts] == ["bob's own"]
    assert "alice" not in str(bobs)
    a2, b2 = both
    assert isinstance(a2, Task) and isinstance(b2, Task) and a2.id != b2.id
    assert executor.runs == 4
