"""Under zero trust, an agent's own NATS permissions let it delegate (read the registry, send
A2A requests) and keep an event's budget (read and write the budgets bucket)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mesh import Agent, Verdict, budget, subjects
from mesh.a2a.client import AgentClient, status_text, task_of, task_state, user_message
from mesh.bus import Bus
from mesh.delegate import delegate
from mesh.errors import BudgetExceededError
from mesh.identity import IdentityDir
from mesh.server import EmbeddedServer
from mesh.settings import Settings
from tests.support.samples import Proposal, write_card

pytestmark = pytest.mark.integration


async def test_an_agent_may_delegate_and_spend_under_its_own_identity(
    identities: IdentityDir, tmp_path: Path
) -> None:
    asker_id = identities.issue("agent", "perm-asker")
    helper_id = identities.issue("agent", "perm-helper")
    asker = Agent("perm-asker", card=write_card(tmp_path, "perm-asker", "skill-perm-asker"))
    helper = Agent("perm-helper", card=write_card(tmp_path, "perm-helper", "skill-perm-helper"))

    async def ask(p: Proposal) -> Verdict:
        scope = budget.current.get()
        assert scope is not None and scope.ledger is not None
        async with scope.ledger.model_call(scope, model="m", prompt_text="x", max_tokens=5) as r:
            r.settle("m", 1, 1)  # a KV reservation and settlement as this agent
        return await delegate("skill-perm-helper", p)

    def help_(p: Proposal) -> Verdict:
        return Verdict.approve("helped")

    asker.rules(ask)
    helper.rules(help_)
    with EmbeddedServer(auth=identities) as server:

        def as_(identity: Path) -> Settings:
            return Settings(nats_url=server.url, identity=identity, heartbeat_s=0.3, card_ttl_s=1.5)

        async with await Bus.connect(server.url) as op:
            await op.ensure()
            async with (
                await Bus.connect(settings=as_(asker_id)) as asker_bus,
                await Bus.connect(settings=as_(helper_id)) as helper_bus,
                helper.serve(helper_bus, http=False, settings=as_(helper_id)),
                asker.serve(asker_bus, http=False, settings=as_(asker_id)),
            ):
                meta: dict[str, Any] = {
                    "tenant": "acme",
                    "eventId": "evt-perm",
                    **budget.Budget(tokens=10_000, tool_calls=5).metadata(),
                }
                sent = await AgentClient(op).send(
                    "perm-asker", user_message(data={"id": "p"}, metadata=meta), timeout=20
                )
                task = task_of(sent)
                assert task_state(task) == "TASK_STATE_COMPLETED", status_text(task)
            spent = await budget.BudgetLedger(op).read(
                subjects.budget_event_key("acme", "evt-perm")
            )
    assert (spent.tokens, spent.tool_calls) == (2, 2)  # one model call, one delegation


async def test_a_tenants_concurrency_quota_holds_across_agent_processes(
    identities: IdentityDir, tmp_path: Path
) -> None:
    """Two agents (two identities, two connections: as two processes would be) share the tenant's
    `concurrent_calls` through the budgets bucket; a dead holder's slot comes back after its
    lease."""
    models = tmp_path / "models.toml"
    models.write_text("[tenants.noisy]\nconcurrent_calls = 1\n")
    scope = budget.CallScope(tenant="noisy", event_id="evt-conc")
    ids = {n: identities.issue("agent", n) for n in ("conc-one", "conc-two")}
    with EmbeddedServer(auth=identities) as server:

        def as_(name: str) -> Settings:
            return Settings(nats_url=server.url, identity=ids[name], models_file=models)

        async with await Bus.connect(server.url) as op:
            await op.ensure()
            one, two = as_("conc-one"), as_("conc-two")
            async with await Bus.connect(settings=one) as b1, await Bus.connect(settings=two) as b2:
                first = budget.BudgetLedger(b1, settings=one)
                second = budget.BudgetLedger(b2, settings=two)

                def call(ledger: budget.BudgetLedger) -> Any:
                    return ledger.model_call(scope, model="m", prompt_text="x", max_tokens=5)

                async with call(first):
                    with pytest.raises(BudgetExceededError) as refused:
                        async with call(second):
                            pytest.fail("two calls at once in the mesh with a quota of one")
                    assert refused.value.limit == "tenant_concurrent_calls"
                async with call(second):  # given back: the other process may call now
                    pass
                # A holder that died mid-call: its lease, once past, is taken over.
                kv = await op.kv(subjects.BUDGETS_BUCKET)
                key = subjects.budget_slot_key("noisy", 0)
                await kv.put(key, msgspec.json.encode(budget.Lease(until=time.time() + 3600)))
                with pytest.raises(BudgetExceededError):
                    async with call(first):
                        pass
                await kv.put(key, msgspec.json.encode(budget.Lease(until=time.time() - 1)))
                async with call(first):
                    held = msgspec.json.decode((await kv.get(key)).value or b"", type=budget.Lease)
                    assert held.until > time.time()


async def test_a_process_holding_the_whole_quota_refuses_without_asking_the_bucket(
    identities: IdentityDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood's calls pile up where its slow calls run: once this process holds all of its
    tenant's slots, a further call is refused by a local check, with no round trip to the
    budgets bucket (the noisy-neighbour bench's refusals cost the other tenant nothing else)."""
    models = tmp_path / "models.toml"
    models.write_text("[tenants.noisy]\nconcurrent_calls = 2\n")
    scope = budget.CallScope(tenant="noisy", event_id="evt-local")
    ident = identities.issue("agent", "conc-local")
    with EmbeddedServer(auth=identities) as server:
        async with await Bus.connect(server.url) as op:
            await op.ensure()
            settings = Settings(nats_url=server.url, identity=ident, models_file=models)
            async with await Bus.connect(settings=settings) as b:
                ledger = budget.BudgetLedger(b, settings=settings)
                kv = await ledger._bucket()
                assert kv is not None
                asked: list[str] = []
                for op_name in ("create", "get", "update"):
                    real = getattr(kv, op_name)

                    def counting(*a: Any, _real: Any = real, _n: str = op_name, **k: Any) -> Any:
                        asked.append(_n)
                        return _real(*a, **k)

                    monkeypatch.setattr(kv, op_name, counting)

                def call() -> Any:
                    return ledger.model_call(scope, model="m", prompt_text="x", max_tokens=5)

                async with call(), call():
                    took = list(asked)
                    assert "create" in took  # the slots were taken in the bucket
                    with pytest.raises(BudgetExceededError) as refused:
                        async with call():
                            pytest.fail("three calls at once with a quota of two")
                    assert refused.value.limit == "tenant_concurrent_calls"
                    assert asked == took  # refused here: nothing asked of the bucket
                async with call():  # both given back: the bucket is asked again
                    assert len(asked) > len(took)
