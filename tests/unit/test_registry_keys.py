"""The registry view's keys of departed instances; the trust file read again."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from mesh import registry
from mesh.identity import Signer, Trust, b64, save_trust
from mesh.registry import Registration, Registry, RegistryView
from mesh.settings import Settings
from mesh.signing import Binding, CardCheck


def _registry() -> Registry:
    bus = SimpleNamespace(settings=Settings(), nc=SimpleNamespace(is_connected=True))
    return Registry(bus)  # type: ignore[arg-type]


# -- which key may sign an instance's votes (RegistryView.binding) --------------------------------
def _binding(instance: str) -> Binding:
    return Binding(
        agent="rev",
        instance=instance,
        key=b64(Signer.generate().public),
        subjects=["mesh.a2a.rev"],
        iat=time.time(),
        exp=time.time() + 600,
    )


def _reg(instance: str, seen_at: float | None = None) -> Registration:
    return Registration(
        agent="rev",
        instance=instance,
        card={},
        skills=["s"],
        seen_at=time.time() if seen_at is None else seen_at,
        ttl_s=6.0,
    )


def _view(*instances: str) -> tuple[RegistryView, dict[str, Binding]]:
    view = RegistryView(_registry())
    bindings = {}
    for i in instances:
        reg = _reg(i)
        view._keep(reg.key, reg)
        view._bindings[reg.key] = bindings[i] = _binding(i)
    return view, bindings


def test_an_instance_that_left_keeps_its_key_for_a_while() -> None:
    view, bindings = _view("a", "b")
    assert view.binding("rev", "a") == bindings["a"]
    view._forget("rev.a")  # its entry was deleted (a clean stop) or replaced by a refused one
    assert view.instances("rev") == [view._entries["rev.b"]]
    assert view.binding("rev", "a") == bindings["a"]
    assert view.binding("rev", "nobody") is None
    assert view.binding("other", "a") is None  # the key is per agent and instance
    assert view.binding("rev", "a.b") is None  # not an instance id


def test_departed_keys_are_forgotten_after_a_time_and_bounded_in_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(registry, "DEPARTED_MAX", 2)
    view, _ = _view("a", "b", "c")
    for i in "abc":
        view._forget(f"rev.{i}")
    assert [view.binding("rev", i) is not None for i in "abc"] == [False, True, True]
    monkeypatch.setattr(registry, "DEPARTED_KEEP_S", 0.0)
    view, _ = _view("a")
    view._forget("rev.a")
    assert view.binding("rev", "a") is None


def test_an_entry_whose_heartbeats_stopped_is_forgotten_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    view, bindings = _view("a")
    view._keep("rev.a", _reg("a", seen_at=time.time() - 6.0 - registry.DEPARTED_KEEP_S / 2))
    assert view.instances("rev") == []  # not live
    assert view.binding("rev", "a") == bindings["a"]  # but its last answers still verify
    view._keep("rev.a", _reg("a", seen_at=time.time() - 6.0 - registry.DEPARTED_KEEP_S - 1))
    assert view.binding("rev", "a") is None


def test_an_instance_whose_card_expired_is_not_routed_to() -> None:
    view, bindings = _view("a")
    view._bindings["rev.a"] = msgspec.structs.replace(bindings["a"], exp=time.time() - 1)
    assert view.instances("rev") == []
    assert view.agents_with_skill("s") == []


# -- the trust file is read again while a reader runs ---------------------------------------------
def test_the_trust_file_is_read_again_and_a_change_forgets_cached_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "TRUST_RELOAD_S", 0.0)
    path = tmp_path / "trust.json"
    trust = Trust()
    save_trust(trust, path)
    reg = _registry()
    reg.bus.settings = Settings(trust=path, insecure="")
    first = reg.verifier
    reg._checked[b"digest"] = CardCheck(None)
    assert reg.verifier is first and reg._checked  # unchanged file: same verifier, same cache
    trust.add(Signer.generate(), "agent", "rev")
    save_trust(trust, path)
    assert reg.verifier is not first and not reg._checked
    path.unlink()  # gone (or being rewritten): the last one is kept
    assert reg.verifier.trust == trust
