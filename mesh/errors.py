"""One error root for the whole mesh.

Two branches, kept apart on purpose: `ConfigError` is a mistake the user can fix (bad card, bad
policy, missing binary) and is shown as a one-line message with what to do next; `MeshRuntimeError`
is something that went wrong at run time (timeouts, unreachable agents) and carries the data a
caller needs to decide whether to retry.
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error the mesh raises on purpose."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        if hint:
            self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  → {self.hint}" if self.hint else self.message


class ConfigError(MeshError):
    """A mistake in configuration or input that the user can fix."""


class CardError(ConfigError):
    """An Agent Card that is not a valid A2A 1.0 card."""

    def __init__(self, path: str, field: str, problem: str) -> None:
        super().__init__(
            f"invalid agent card {path}: field '{field}': {problem}",
            hint="fix the card JSON (see cards/*.json for valid examples)",
        )
        self.path = path
        self.field = field


class PolicyError(ConfigError):
    """A decision policy file that does not validate."""


class StreamConflictError(ConfigError):
    """A stream or bucket exists with settings that conflict with what the mesh needs."""


class NatsServerError(ConfigError):
    """The embedded nats-server could not be found or started."""


class NotConnectedError(ConfigError):
    """No NATS server to talk to."""


class NotFoundError(ConfigError):
    """What was asked for by name or id (a dead letter, a decision, an agent) does not exist."""


class NoAnswerError(ConfigError):
    """Connected, but nothing that should answer did (no coordinator, no live agent)."""


class ForbiddenError(ConfigError):
    """An authorization policy does not allow this identity to do this (mesh.authz): the
    message names the policy that decided."""


class InputError(ConfigError):
    """A message did not carry what the agent's handler takes (the caller can fix it)."""


class ModelRequestsBlockedError(ConfigError):
    """Model requests are switched off and the client points at a non-local host."""


class MeshRuntimeError(MeshError):
    """A failure at run time; `retryable` says whether trying again can help."""

    retryable: bool = False


class AgentCallError(MeshRuntimeError):
    """An A2A call to an agent failed."""

    def __init__(
        self,
        agent: str,
        message: str,
        *,
        retryable: bool = False,
        attempts: int = 1,
        code: int | None = None,
    ) -> None:
        super().__init__(f"{agent}: {message}")
        self.agent = agent
        self.retryable = retryable
        self.attempts = attempts
        self.code = code


class AgentTimeoutError(AgentCallError):
    """The agent did not answer within the per-call timeout."""

    def __init__(self, agent: str, timeout_s: float, *, attempts: int = 1) -> None:
        super().__init__(
            agent, f"no answer within {timeout_s:.2f}s", retryable=True, attempts=attempts
        )
        self.timeout_s = timeout_s


class AgentUnavailableError(AgentCallError):
    """Nobody is listening on the agent's subject (NATS 'no responders')."""

    def __init__(self, agent: str, *, attempts: int = 1) -> None:
        super().__init__(agent, "no live instance answered", retryable=True, attempts=attempts)


class AgentBusyError(AgentCallError):
    """The agent had no room for the call (JSON-RPC `BUSY`, HTTP 429) and did nothing with it:
    load, not a failure. Retryable after `retry_after_s`."""

    def __init__(
        self, agent: str, message: str, *, retry_after_s: float, code: int, attempts: int = 1
    ) -> None:
        super().__init__(agent, message, retryable=True, attempts=attempts, code=code)
        self.retry_after_s = retry_after_s


class ModelCallError(MeshRuntimeError):
    """The model API call failed (HTTP error status, connection failure or timeout)."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class ModelOutputError(MeshRuntimeError):
    """The model answered, but not with one valid call of the requested tool."""

    retryable = False


class BudgetExceededError(MeshRuntimeError):
    """A call would spend more than what is left of its budget (the event's, or its tenant's
    quota), so it was not made. `limit` names which: `cost`, `tokens`, `tool_calls`,
    `wall_clock`, `tenant_cost_per_day`, `tenant_concurrent_calls`."""

    retryable = False

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class HopLimitError(MeshRuntimeError):
    """A delegation would go past the hop limit (a loop, or a chain too long)."""

    retryable = False

    def __init__(self, message: str, *, hops: int) -> None:
        super().__init__(
            message,
            hint="an agent delegates to one that delegates back? see "
            "docs/models.md#delegation; MESH_MAX_HOPS raises the limit",
        )
        self.hops = hops


# -- coordinator
class AuditContentionError(MeshRuntimeError):
    """An audit append lost the race for its chain's tip more often than its retry policy
    allows (every lost race means another record landed, so this takes a storm of writers)."""

    retryable = True

    def __init__(self, tenant: str, attempts: int) -> None:
        super().__init__(f"audit chain of {tenant}: lost {attempts} races in a row")
        self.tenant = tenant
        self.attempts = attempts


def exit_code(error: MeshError) -> int:
    """The exit code a process ends with for `error`: the same for the `mesh` command and the
    long-running processes (`mesh run`, `mesh coordinator`, `mesh schedules run`), as
    docs/cli.md lists them — 4 not found, 5 unavailable, 3 configuration or input, 1 any other.
    (2 is click's usage error, 6 a failed verification, 130 an interrupt: never an error's.)"""
    if isinstance(error, NotFoundError):
        return 4
    if isinstance(
        error, NotConnectedError | NoAnswerError | AgentUnavailableError | AgentTimeoutError
    ):
        return 5
    if isinstance(error, ConfigError):
        return 3
    return 1


def settings_problem(error: Exception) -> str | None:
    """A `MESH_*` variable that does not parse (the pydantic ValidationError `Settings()`
    raises), as one line naming it and what it expects; None for any other error. What the
    `mesh` command prints, and what a process's `main` logs instead of pydantic's traceback."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError) or error.title != "Settings":
        return None
    from mesh.bus import redact

    parts = []
    for problem in error.errors():
        name = "MESH_" + "_".join(str(p) for p in problem["loc"]).upper()
        value = redact(str(problem.get("input", "")))
        value = value if len(value) <= 40 else value[:37] + "..."
        parts.append(f"{name}={value!r}: {problem['msg'][:1].lower()}{problem['msg'][1:]}")
    return "; ".join(parts)
