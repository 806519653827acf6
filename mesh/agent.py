"""The agent runtime: an agent is its card plus one typed handler.

    agent = Agent("security-review", prompt=Path(__file__).with_name("prompt.md"))

    @agent.rules
    def review(release: ReleaseProposal) -> Verdict: ...

The handler's annotations are the contract: the input type decodes the A2A message's data part
(or JSON text), the output type is the artifact. Which brain answers is configuration
(docs/models.md: MESH_MODEL, MESH_MODEL_<AGENT>, the models file): the rules by default, or a
chain of models (Claude through the same output type, by tool use) ending in the rules or an
abstention. Each task runs under a `mesh.budget.CallScope` (tenant, event, what is left of the
budget, delegation depth): a model call that would not fit is not made, and the agent answers
`budget_exceeded` (an abstaining Verdict, for agents that vote; a failed task otherwise).

An agent may also (or only) react to domain events; see `mesh.events` for the guarantees:

    @agent.on_event("ticket.created")
    async def triage(ticket: TicketCreated, ctx: EventContext) -> None:
        await ctx.publish("ticket.triaged", TicketTriaged(...))

An agent with event handlers but no `@agent.rules` still serves its card over A2A and stays in
the registry (registry readers need a card that says where it listens), but rejects every
message with a status that says it only reacts to events.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import signal
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, get_type_hints

import msgspec
from a2a.helpers import new_data_part, new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.server.tasks import InMemoryTaskStore, TaskStore, TaskUpdater
from a2a.types import AgentCard, Part, TaskState
from google.protobuf import struct_pb2
from opentelemetry.trace import SpanKind

from mesh import budget, subjects, telemetry, versions
from mesh._internal import http as http_server
from mesh._internal.loop import run as run_loop
from mesh.a2a.auth import Authenticator
from mesh.a2a.lean import NO_DATA, LeanMessage, Outcome
from mesh.a2a.server import A2AServer, GrpcListener
from mesh.a2a.taskstore import JetStreamTaskStore
from mesh.bus import Bus
from mesh.cards import load_card, with_interfaces
from mesh.errors import BudgetExceededError, ConfigError, InputError, MeshError
from mesh.events import (
    DEFAULT_ACK_WAIT_S,
    DEFAULT_BACKOFF,
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_DELIVER,
    EventHandler,
    HandlerFn,
    consuming,
    event_handler,
)
from mesh.identity import Signer
from mesh.models import (
    Brain,
    ChainBrain,
    ClaudeBrain,
    RulesBrain,
    Thought,
    model_requests_allowed,
    probe,
    select_brain,
)
from mesh.registry import Registration, Registry, new_instance_id
from mesh.settings import Settings, get_settings
from mesh.tools import DENIED_KEY, ModelTool, denied_report
from mesh.verdict import Verdict
from mesh.votes import SIGNATURE_KEY, VoteSigner

log = logging.getLogger(__name__)


class Agent:
    def __init__(
        self,
        name: str,
        *,
        card: str | Path | None = None,
        prompt: str | Path | None = None,
        version: str | None = None,
        tools: Sequence[ModelTool] = (),
    ) -> None:
        self.name = name
        # What its models may call (mesh.tools), each call guarded by Cedar before it runs.
        self.tools: list[ModelTool] = list(tools)
        self._version_label = version  # the human part of the composite version (mesh.versions)
        self._card_source = card or name
        self._prompt = prompt
        self._handler: Callable[..., Any] | None = None
        self.input_type: Any = None
        self.output_type: Any = None
        self.event_handlers: list[EventHandler] = []
        self._override: Brain | None = None  # what `override` swapped in (tests)

    # -- definition -----------------------------------------------------------------------------
    def rules(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Register the deterministic handler; its annotations define input and output."""
        hints = get_type_hints(fn)
        params = list(inspect.signature(fn).parameters.values())
        extra_required = [p.name for p in params[1:] if p.default is inspect.Parameter.empty]
        if not params or params[0].name not in hints or "return" not in hints or extra_required:
            raise ConfigError(
                f"{self.name}: the handler must take one annotated argument (any others need "
                "defaults) and annotate its return type",
                hint="e.g. def review(release: ReleaseProposal) -> Verdict",
            )
        self._handler = fn
        self.input_type = hints[params[0].name]
        self.output_type = hints["return"]
        return fn

    def on_event(
        self,
        event_type: str,
        *,
        max_deliver: int = DEFAULT_MAX_DELIVER,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        ack_wait_s: float = DEFAULT_ACK_WAIT_S,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> Callable[[HandlerFn], HandlerFn]:
        """Register an async handler for `event_type`, at least once, on a shared durable.

        `backoff[i]` is the pause after the (i+1)-th failed delivery (the last value repeats);
        `ack_wait_s` is how long a replica that stopped answering keeps an event.
        """

        def register(fn: HandlerFn) -> HandlerFn:
            handler = event_handler(
                self.name,
                fn,
                event_type,
                max_deliver=max_deliver,
                backoff=backoff,
                ack_wait_s=ack_wait_s,
                concurrency=concurrency,
            )
            if any(h.durable == handler.durable for h in self.event_handlers):
                raise ConfigError(f"{self.name}: two event handlers named {handler.name}")
            self.event_handlers.append(handler)
            return fn

        return register

    def card(self) -> AgentCard:
        card = load_card(self._card_source)
        if card.name != self.name:
            raise ConfigError(f"card {self._card_source} is named {card.name!r}, not {self.name!r}")
        return card

    def version(
        self,
        brain: Brain | None = None,
        *,
        card_version: str = "",
        settings: Settings | None = None,
    ) -> str:
        """This agent's composite version (`mesh.versions`): `label+hash12` of its code,
        prompt, brain chain and tools; `brain` as `serve` picked it."""
        return versions.composite(
            versions.label_of(self._version_label, card_version, settings),
            code=versions.code_of(self._handler),
            prompt=self.system_prompt(),
            model=versions.brain_config(brain),
            tools=versions.tools_of(brain),
        )

    def system_prompt(self) -> str | None:
        if self._prompt is None:
            return None
        path = Path(self._prompt)
        return path.read_text() if path.suffix == ".md" and path.exists() else str(self._prompt)

    def brain(self) -> Brain:
        if self._handler is None or self.output_type is None:
            raise ConfigError(
                f"agent {self.name} has no handler",
                hint="decorate one: @agent.rules or @agent.on_event",
            )
        return select_brain(
            agent=self.name,
            rules=self._handler,
            system_prompt=self.system_prompt(),
            output_type=self.output_type,
            tools=self.tools,
        )

    @contextlib.contextmanager
    def override(self, brain: Brain | Callable[[Any], Any]) -> Iterator[Brain]:
        """Answer with `brain` (a `Brain`, or a function taken as rules) instead of the brain
        `serve` picked, until the block exits — in instances already serving too (read per
        message). For tests: `with agent.override(lambda release: Verdict.reject("no")): ...`;
        `mesh.testing.ScriptedModel.brain(agent)` gives a Claude brain on a local fake."""
        if self._handler is None:
            raise ConfigError(f"agent {self.name} has no @agent.rules handler to override")
        swapped = cast("Brain", brain) if hasattr(brain, "think") else RulesBrain(brain)
        previous, self._override = self._override, swapped
        try:
            yield swapped
        finally:
            self._override = previous

    def decode_input(self, data: Any) -> Any:
        try:
            return msgspec.convert(data, self.input_type, strict=False)
        except msgspec.ValidationError as e:
            raise InputError(f"input is not a {_type_name(self.input_type)}: {e}") from None

    # -- running --------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def serve(
        self, bus: Bus | None = None, *, http: bool = True, settings: Settings | None = None
    ) -> AsyncIterator[RunningAgent]:
        """Serve A2A over NATS (and, unless `http=False`, over HTTP — JSON-RPC and HTTP+JSON — and
        gRPC: docs/bindings.md), registered and heartbeating, until the block exits."""
        settings = settings or (bus.settings if bus else get_settings())
        card = self.card()
        # Events-only agents have no brain: A2A messages are answered with a rejection.
        brain = self.brain() if self._handler or not self.event_handlers else None
        log.info("agent %s: brain %s", self.name, brain.name if brain else "none (events only)")
        # Computed once, at start: the card carries it (signed), so every reader agrees.
        version = self.version(brain, card_version=card.version, settings=settings)
        card.version = version
        if brain is not None:
            for line in await probe(brain, local_only=not model_requests_allowed()):
                log.warning("agent %s: %s", self.name, line)
        async with contextlib.AsyncExitStack() as stack:
            if bus is None:
                bus = await Bus.connect(name=f"agent:{self.name}", settings=settings)
                stack.push_async_callback(bus.close)
            await bus.ensure()
            await telemetry.keep_spans_in_jetstream(bus)
            instance = new_instance_id()
            # This instance's own key: in memory only, it signs the votes of this process and
            # nothing else; the card binds it, signed with the process's identity.
            key = Signer.generate()
            subject = subjects.a2a(self.name)
            direct = subjects.a2a_instance(self.name, instance)
            registry = Registry(bus)
            store = await _task_store(bus, self.name, settings)
            # The card must say where this instance listens, so the HTTP socket is bound first
            # and the server is built once, with the live card.
            sock = http_server.bind(settings) if http else None
            http_url = http_server.advertised_url(settings, sock.getsockname()[1]) if sock else None
            # gRPC likewise: bound now (its port goes in the card), served once the server is.
            grpc_listener = GrpcListener.bind(settings) if http else None
            if grpc_listener is not None:
                stack.push_async_callback(grpc_listener.aclose)
            grpc_url = grpc_listener.url if grpc_listener else None
            # Who may call: decided once from this agent's settings, for the card it declares
            # and the server that enforces it.
            auth = Authenticator.from_settings(settings, agent=self.name)
            live = with_interfaces(
                card,
                http_url=http_url,
                nats_subject=subject,
                authenticated=auth.required,
                grpc_url=grpc_url,
            )
            # Re-signed in place while we run (a new expiry): HTTP serves the same object.
            bound = registry.bind(live, instance, direct_subject=direct, key=key)
            executor = _Executor(
                self,
                brain,
                VoteSigner(self.name, instance, key),
                ledger=budget.BudgetLedger(bus, settings=settings),
                bus=bus,
                version=version,
            )
            server = A2AServer(
                bound.card,
                executor,
                task_store=store,
                push_allow_private=settings.push_allow_private,
                auth=auth,
                # Any replica can follow a task another replica runs (SubscribeToTask).
                event_stream=store.events() if isinstance(store, JetStreamTaskStore) else None,
                # Blocking SendMessage over NATS skips a2a-sdk's per-request machinery when the
                # brain answers at once (mesh.a2a.lean; MESH_A2A_LEAN=0 turns it off).
                answerer=executor if settings.a2a_lean else None,
            )
            if sock is not None:
                await stack.enter_async_context(http_server.serving(server, sock))
            await stack.enter_async_context(server.grpc_serving(grpc_listener))
            # Shared subject (replicas share work in a queue group) and this replica's own, so a
            # caller can steer around a replica that is failing (coordinator/routing.py).
            # Both share the server's slots; a request past them is answered "busy" at once.
            sub = await server.subscribe(bus.nc, subject, queue=self.name)
            own = await server.subscribe(bus.nc, direct)
            stack.push_async_callback(server.aclose)
            stack.push_async_callback(server.drain)
            stack.push_async_callback(sub.unsubscribe)
            stack.push_async_callback(own.unsubscribe)
            # The capacity callers may count on (coordinator admission): the server's slots.
            reg = await stack.enter_async_context(
                registry.registered(bound, capacity=server.max_concurrency)
            )
            # Entered last so it exits first: in-flight handlers drain while the bus is still up.
            if self.event_handlers:
                await stack.enter_async_context(consuming(bus, self.event_handlers))
            log.info(
                "agent %s/%s serving on %s, %s and gRPC %s",
                self.name,
                instance,
                subject,
                http_url,
                grpc_url or "(off)",
            )
            yield RunningAgent(self, bound.card, reg, http_url, subject, brain, grpc_url)

    @staticmethod
    def run_module(package: str | None) -> None:
        """`python -m <package>`: run the `agent` its `agent.py` defines, as `mesh run` does
        (an agent's `__main__.py` is `Agent.run_module(__package__)`).

        Settings are checked before the module is imported, because an agent module may read
        them as it is defined (a prompt rendered from a rules file): a `MESH_*` variable that
        does not parse is one line and exit code 3 there too, not an import-time traceback."""
        import importlib

        from mesh._internal.logs import configure_process

        if not package:
            raise SystemExit("error: Agent.run_module(__package__) belongs in a __main__.py")
        configure_process()
        importlib.import_module(f"{package}.agent").agent.main()

    def main(self) -> None:
        """Run until SIGINT/SIGTERM (what `mesh run` and `Agent.run_module` call)."""
        from mesh._internal.logs import configure_process
        from mesh.errors import exit_code

        configure_process()
        telemetry.setup(f"mesh-agent-{self.name}")
        try:
            _run(self._run_forever(), uvloop=get_settings().uvloop)
        except MeshError as e:
            log.error("%s", e)
            raise SystemExit(exit_code(e)) from None  # the `mesh` command's codes (docs/cli.md)
        except KeyboardInterrupt:  # Ctrl-C before the loop's handlers were in place
            raise SystemExit(130) from None

    async def _run_forever(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with self.serve():
            await stop.wait()
            log.info("agent %s: stopping (draining in-flight work)", self.name)


def _run(main: Coroutine[Any, Any, None], *, uvloop: bool) -> None:
    """The agent process's loop: uvloop unless MESH_UVLOOP=0 (mesh._internal.loop)."""
    run_loop(main, uvloop=uvloop)


@dataclass
class RunningAgent:
    agent: Agent
    card: AgentCard
    registration: Registration
    http_url: str | None
    subject: str
    brain: Brain | None  # None: the agent only reacts to events
    grpc_url: str | None = None  # `host:port`; None when gRPC is off


async def _task_store(bus: Bus, agent: str, settings: Settings) -> TaskStore | JetStreamTaskStore:
    """MESH_TASK_STORE: `jetstream` (default) shares tasks between replicas and keeps them over
    restarts (its event stream lets SubscribeToTask follow a task another replica runs);
    `memory` keeps them in this process only."""
    if settings.task_store == "memory":
        return InMemoryTaskStore()
    return await JetStreamTaskStore.open(bus, agent)


class _Executor(AgentExecutor):
    """Turns an A2A message into one handler call and a task with a typed artifact.

    Two ways in, one answer (`_outcome`): a2a-sdk's executor interface (`execute`, events through
    a TaskUpdater) and the lean SendMessage over NATS (`answer`, mesh.a2a.lean), which builds the
    task itself from the same outcome."""

    def __init__(
        self,
        agent: Agent,
        brain: Brain | None,
        votes: VoteSigner,
        *,
        ledger: budget.BudgetLedger | None = None,
        bus: Bus | None = None,
        version: str = "",
    ) -> None:
        self.agent = agent
        self.brain = brain
        self.votes = votes
        self.ledger = ledger
        self.bus = bus
        self.version = version

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message = context.message
        assert message is not None
        view = LeanMessage.of(message)
        with self._span(context.call_context, view.metadata, context.context_id or ""):
            await self._execute(view, context, event_queue)

    @contextlib.contextmanager
    def _span(
        self, call: ServerCallContext | None, metadata: Mapping[str, Any], context_id: str
    ) -> Iterator[None]:
        """One task, under an `invoke_agent` server span that continues the caller's trace (the
        request headers carry it, over HTTP and over NATS alike)."""
        headers = (call.state.get("headers") if call is not None else None) or {}
        labels = {"agent": self.agent.name, "tenant": str(metadata.get("tenant", ""))}
        token = telemetry.call_labels.set(labels)
        try:
            with telemetry.tracer().start_as_current_span(
                f"invoke_agent {self.agent.name}",
                context=telemetry.extract(headers),
                kind=SpanKind.SERVER,
                attributes={
                    telemetry.GEN_AI_OPERATION: "invoke_agent",
                    telemetry.GEN_AI_AGENT_NAME: self.agent.name,
                    telemetry.GEN_AI_CONVERSATION_ID: context_id,
                    "mesh.event.id": str(metadata.get("eventId", "")),
                },
            ):
                # The event's budget, hops and headers, for model calls and delegations
                # made while answering (both paths: the SDK's and the lean one).
                scope = budget.CallScope(
                    tenant=labels["tenant"],
                    event_id=str(metadata.get("eventId", "")),
                    budget=budget.Budget.from_metadata(metadata),
                    hops=_int(metadata.get(subjects.META_HOPS)),
                    agent=self.agent.name,
                    ledger=self.ledger,
                    bus=self.bus,
                    headers=dict(headers),
                )
                scope_token = budget.current.set(scope)
                try:
                    yield
                finally:
                    budget.current.reset(scope_token)
        finally:
            telemetry.call_labels.reset(token)

    async def _execute(
        self, view: LeanMessage, context: RequestContext, event_queue: EventQueue
    ) -> None:
        message = context.message
        assert message is not None
        # a2a-sdk requires the Task to be enqueued before any status update.
        task = context.current_task or new_task_from_user_message(message)
        await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        outcome = await self._outcome(view, updater.start_work)
        if outcome.artifact_parts:
            await updater.add_artifact(
                outcome.artifact_parts,
                name=outcome.artifact_name,
                metadata=outcome.artifact_metadata,
            )
        reason = updater.new_agent_message(outcome.reason) if outcome.reason else None
        await updater.update_status(outcome.state, message=reason)

    # -- the lean path (mesh.a2a.lean.Answerer) -------------------------------------------------
    def immediate(self, metadata: Mapping[str, Any]) -> bool:
        """Rules (and an events-only agent's rejection) answer at once; a model does not,
        unless its tenant's quota refuses the call at once: this process holds every model-call
        slot of the tenant (`metadata`'s), so the answer is `budget_exceeded` with no round trip.
        A flood's refused calls then cost the agent the lean path's work, not the SDK's (its
        task, queue and three store writes: bench/README.md, "Noisy neighbour").

        A slot given back between this check and the brain's own (a few awaits later) lets the
        call go ahead on the lean path: it is made as usual, only without the `working` state
        in the task store while it runs."""
        brain = self.agent._override or self.brain
        if brain is None or isinstance(brain, RulesBrain):
            return True
        return (
            self.ledger is not None
            and _takes_tenant_slot_first(brain)
            and self.ledger.refuses_at_once(str(metadata.get("tenant", "")))
        )

    async def answer(self, message: LeanMessage, context: ServerCallContext) -> Outcome:
        with self._span(context, message.metadata, message.context_id):
            return await self._outcome(message, None)

    async def _outcome(
        self, message: LeanMessage, start_work: Callable[[], Awaitable[None]] | None
    ) -> Outcome:
        """What the agent answers `message`; `start_work` marks the task working before a
        model is asked (the SDK path's `working` state)."""
        brain = self.agent._override or self.brain  # Agent.override, read per message
        if brain is None:
            types = ", ".join(h.event_type for h in self.agent.event_handlers)
            text = f"{self.agent.name} only reacts to events ({types}); it takes no messages"
            return Outcome(TaskState.TASK_STATE_REJECTED, reason=[Part(text=text)])
        try:
            payload = self._input(message)
        except InputError as e:
            return Outcome(TaskState.TASK_STATE_REJECTED, reason=[Part(text=str(e))])
        if start_work is not None and not isinstance(brain, RulesBrain):
            # A model call takes seconds: say so. Rules answer at once, and each status is a
            # task-store write, so they go straight from submitted to completed.
            await start_work()
        try:
            thought = await brain.think(payload)
        except BudgetExceededError as e:
            if self.agent.output_type is not Verdict:
                text = f"{BUDGET_EXCEEDED}: {e.message}"
                return Outcome(TaskState.TASK_STATE_FAILED, reason=[Part(text=text)])
            # A signed answer, so the coordinator counts it (as an abstention) and does not
            # retry a call that would be refused again; `brain` tells the policy why.
            thought = Thought(
                output=Verdict.abstain(f"{BUDGET_EXCEEDED}: {e.message}"), brain=BUDGET_EXCEEDED
            )
        except MeshError as e:
            return Outcome(TaskState.TASK_STATE_FAILED, reason=[Part(text=f"{brain.name}: {e}")])
        output = msgspec.to_builtins(thought.output)
        # Signed by this instance for the question as asked (mesh.votes): the coordinator
        # counts the answer only if the signature verifies with the key our card binds.
        question = self.votes.question(message.message_id, message.metadata)
        return Outcome(
            TaskState.TASK_STATE_COMPLETED,
            artifact_parts=[_data_part(output)],
            artifact_name=_type_name(self.agent.output_type).lower(),
            artifact_metadata={
                "brain": thought.brain,
                "inputTokens": thought.usage.input_tokens,
                "outputTokens": thought.usage.output_tokens,
                "pid": os.getpid(),
                # Each tool call Cedar denied: the decision's audit record names them.
                **({DENIED_KEY: denied} if (denied := denied_report(thought.tool_uses)) else {}),
                # Informational: the coordinator takes a vote's version from the signing
                # instance's verified card, never from here.
                versions.VERSION_KEY: self.version,
                SIGNATURE_KEY: self.votes.sign(question, output),
            },
        )

    def _input(self, message: LeanMessage) -> Any:
        """The handler's typed input, decoded straight from the request's JSON on the lean
        path. Its objects' member order differs from the SDK path's (a protobuf map's): where
        that order could reach the handler (a dict or untyped field) or an error's text (which
        names the first bad field), the data is put in the SDK path's order first, so both
        paths hand the handler the same value and answer the same error."""
        if message.json_order and not self._order_free:
            message.data, message.json_order = message.in_protobuf_order(), False
        try:
            return self.agent.decode_input(_payload(message))
        except InputError:
            if not message.json_order:
                raise
            message.data, message.json_order = message.in_protobuf_order(), False
            return self.agent.decode_input(_payload(message))

    @functools.cached_property
    def _order_free(self) -> bool:
        return _order_free(msgspec.inspect.type_info(self.agent.input_type), set())

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        # Handlers run to completion quickly; cancelling marks the task so clients stop waiting.
        if context.current_task is not None:
            updater = TaskUpdater(
                event_queue, context.current_task.id, context.current_task.context_id
            )
            await updater.cancel()


def _takes_tenant_slot_first(brain: Brain) -> bool:
    """Whether `brain` starts by asking a model (a tenant slot first), as a chain whose first
    entry is a model does; an agent's test override or rules do not."""
    while isinstance(brain, ChainBrain):
        brain = brain.brains[0]
    return isinstance(brain, ClaudeBrain)


# What a vote refused for its budget says: the artifact's `brain`, the start of its first reason
# (and of a failed task's status text, for agents that do not vote).
BUDGET_EXCEEDED = "budget_exceeded"


def _order_free(info: msgspec.inspect.Type, seen: set[type]) -> bool:
    """Whether a value of this type, decoded from a JSON object, is the same whatever the
    order of the object's members (objects become Structs, dataclasses… never dicts)."""
    mi = msgspec.inspect
    if isinstance(info, mi.StructType | mi.DataclassType):
        if info.cls in seen:
            return True
        seen.add(info.cls)
        return all(_order_free(f.type, seen) for f in info.fields)
    if isinstance(info, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
        return _order_free(info.item_type, seen)
    if isinstance(info, mi.NamedTupleType):
        return all(_order_free(f.type, seen) for f in info.fields)
    if isinstance(info, mi.TupleType):
        return all(_order_free(t, seen) for t in info.item_types)
    if isinstance(info, mi.UnionType):
        return all(_order_free(t, seen) for t in info.types)
    if isinstance(info, mi.DictType | mi.TypedDictType | mi.AnyType | mi.CustomType):
        return False
    return isinstance(info, _SCALARS)


_SCALARS = (
    msgspec.inspect.NoneType,
    msgspec.inspect.BoolType,
    msgspec.inspect.IntType,
    msgspec.inspect.FloatType,
    msgspec.inspect.StrType,
    msgspec.inspect.BytesType,
    msgspec.inspect.ByteArrayType,
    msgspec.inspect.EnumType,
    msgspec.inspect.LiteralType,
    msgspec.inspect.DateTimeType,
    msgspec.inspect.DateType,
    msgspec.inspect.TimeType,
    msgspec.inspect.TimeDeltaType,
    msgspec.inspect.UUIDType,
    msgspec.inspect.DecimalType,
)


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _payload(message: LeanMessage) -> Any:
    if message.data is not NO_DATA:
        return message.data
    text = message.text.strip()
    if not text:
        raise InputError("the message has no data part and no text")
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        raise InputError("the message text is not JSON; send a data part or JSON text") from None


def _data_part(data: Any) -> Part:
    """`a2a.helpers.new_data_part(data, media_type="application/json")` for a JSON value
    (what `msgspec.to_builtins` returns), built with `Struct.update`/`ListValue.extend` instead
    of json_format's parser: the same Value (tests/unit/test_lean_eligible.py checks it), in
    about half the CPU, on every vote of both paths."""
    value = struct_pb2.Value()
    if isinstance(data, dict):
        value.struct_value.SetInParent()  # `{}` is a Struct, not an unset Value
        value.struct_value.update(data)
    elif isinstance(data, list | tuple):
        value.list_value.SetInParent()
        value.list_value.extend(data)
    else:
        return new_data_part(data, media_type="application/json")
    return Part(data=value, media_type="application/json")


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", str(t))
