"""The console's pure parts: sessions, sign-in, Origin, redaction, the SVG plots."""

from __future__ import annotations

import time

import pytest

from mesh.console import auth, data, svg
from mesh.identity import Signer, Trust, mint_token


def _trust() -> tuple[Trust, Signer]:
    operator = Signer.generate()
    trust = Trust()
    trust.add(operator, "operator", "operator")
    return trust, operator


def test_a_token_signs_in_its_principal_and_the_session_survives_only_untouched() -> None:
    trust, operator = _trust()
    token = mint_token(operator, name="ana", role="reader", tenant="acme")
    user = auth.sign_in(trust, token)
    assert (user.name, user.role, user.tenant) == ("ana", "reader", "acme")
    assert user.sees("acme") and not user.sees("globex") and not user.may_act

    sessions = auth.Sessions()
    cookie = sessions.dump(user)
    assert token not in cookie
    assert sessions.load(cookie, trust) == user
    # Any change to the cookie, or another console's key, and there is no session.
    payload, mac = cookie.rsplit(".", 1)
    forged = payload.replace(payload[5], "A" if payload[5] != "A" else "B", 1)
    assert sessions.load(f"{forged}.{mac}", trust) is None
    assert auth.Sessions().load(cookie, trust) is None
    assert sessions.load(cookie, trust, now=user.expires + 1) is None
    # Revoking the issuer's key ends every session it vouched for.
    trust.revoke(user.issuer)
    assert sessions.load(cookie, trust) is None


def test_who_cannot_sign_in() -> None:
    trust, operator = _trust()
    with pytest.raises(auth.SignInError, match="cannot sign in"):
        auth.sign_in(trust, mint_token(operator, name="a", role="agent", tenant="*"))
    with pytest.raises(auth.SignInError, match="expired"):
        auth.sign_in(trust, mint_token(operator, name="a", role="reader", tenant="t", ttl_s=-5))
    stranger = Signer.generate()
    with pytest.raises(auth.SignInError, match="trusted issuer"):
        auth.sign_in(trust, mint_token(stranger, name="a", role="operator", tenant="*"))
    with pytest.raises(auth.SignInError):
        auth.sign_in(trust, "")
    # A session lasts at most SESSION_MAX_S, whatever the token's own lifetime.
    user = auth.sign_in(trust, mint_token(operator, name="o", role="operator", tenant="*"))
    assert user.expires <= time.time() + auth.SESSION_MAX_S + 1
    assert user.may_act and user.all_tenants


def test_same_origin() -> None:
    base = "http://127.0.0.1:8780"
    assert auth.same_origin({"origin": base}, base)
    assert auth.same_origin({"referer": base + "/dead-letters?x=1"}, base)
    assert not auth.same_origin({}, base)
    assert not auth.same_origin({"origin": "null"}, base)
    assert not auth.same_origin({"origin": "http://127.0.0.1:8781"}, base)
    assert not auth.same_origin({"origin": "http://evil.example", "referer": base}, base)


def test_redaction_masks_secret_looking_fields_at_any_depth() -> None:
    body = b'{"a": 1, "Password": "p", "nested": [{"api_key": "k", "ok": "v"}], "token": 3}'
    shown = data.preview(body)
    for secret in ('"p"', '"k"', "3\n"):
        assert secret not in shown
    assert '"ok": "v"' in shown and shown.count(data.MASK) == 3
    assert data.preview(b"\xff not json") == "\\xff not json"


def test_plots_escape_labels_and_draw_what_they_are_given() -> None:
    evil = "<script>alert(1)</script>"
    plot = svg.bars("t", [(evil, 3.0, "n"), ("b", 1.0, "")])
    assert "<script>" not in plot and "&lt;script&gt;" in plot
    assert plot.count("<rect") == 2
    cols = svg.stacked_columns("d", [("10:00", {"approved": 2, "rejected": 1}), ("10:01", {})])
    assert cols.count("<rect") == 2 + 3  # two stacked parts, three legend swatches
    assert "nothing yet" in svg.bars("empty", [])


def test_the_inbox_answers_only_as_a_key_the_desk_believes_for_people() -> None:
    from types import SimpleNamespace

    from mesh.console.approvals import BusApprovals

    def inbox(role: str) -> BusApprovals:
        key = Signer.generate()
        identity = SimpleNamespace(role=role, signing_seed="x", signer=lambda: key)
        return BusApprovals(lambda: SimpleNamespace(identity=identity), Trust)  # type: ignore[arg-type, return-value]

    assert inbox("console").available and inbox("operator").available
    # A console run as a reader or publisher would sign answers the desk refuses: it says so.
    assert not inbox("reader").available and not inbox("publisher").available
    assert not BusApprovals(lambda: SimpleNamespace(identity=None), Trust).available  # type: ignore[arg-type, return-value]
