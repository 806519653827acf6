"""The authorizer: Cedar requests built from mesh identities, answered by the policy set in
force, which is reloaded (checked first) when its files change."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import cedarpy

from mesh.approvals import approver_role
from mesh.authz._source import (
    ENTITIES_FILE,
    POLICY_SUFFIX,
    SCHEMA_SUFFIX,
    Loaded,
    PolicyFileError,
    digest,
    load,
)
from mesh.errors import ConfigError

if TYPE_CHECKING:
    from mesh.audit import AuditLog
    from mesh.identity import Identity, Principal
    from mesh.settings import Settings

log = logging.getLogger(__name__)

NAMESPACE = "Mesh"
SHIPPED = Path(__file__).parent
SHIPPED_SCHEMA = SHIPPED / f"mesh{SCHEMA_SUFFIX}"
SHIPPED_POLICIES = SHIPPED / "policies"  # one folder per profile
Profile = Literal["default", "regulated"]
Action = Literal["publish", "approve", "replay", "purge", "export", "call_tool"]
ANONYMOUS = "anonymous"  # the principal of an event no trusted key signed
_LONG = (-(2**63), 2**63 - 1)
ANSWERS_KEPT = 4096  # answers remembered per policy set (Cedar's take ~0.1-0.3 ms each)


# -- entities --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entity:
    """One Cedar entity of the `Mesh` namespace: `Mesh::<type>::"<id>"`."""

    type: str
    id: str
    attrs: Mapping[str, Any] = field(default_factory=dict)
    parents: tuple[tuple[str, str], ...] = ()  # (type, id)

    def uid(self) -> dict[str, str]:
        return {"type": f"{NAMESPACE}::{self.type}", "id": self.id}

    def cedar(self) -> dict[str, Any]:
        return {
            "uid": self.uid(),
            "attrs": dict(self.attrs),
            "parents": [{"type": f"{NAMESPACE}::{t}", "id": i} for t, i in self.parents],
        }

    def __str__(self) -> str:
        return f'{NAMESPACE}::{self.type}::"{self.id}"'


def _tenant_parent(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("Tenant", tenant),) if tenant not in ("", "*") else ()


def identity(role: str, name: str, *, tenant: str = "*", groups: Iterable[str] = ()) -> Entity:
    """A mesh identity as a principal: `Mesh::Identity::"<role>:<name>"`. `tenant`: its one
    tenant, "*" for all, "" unknown. `groups`: groups it is in besides those entities.json
    gives it (only what a verified credential says, never what a request claims), in the one
    spelling of roles and groups (`mesh.approvals.approver_role`)."""
    return Entity(
        "Identity",
        f"{role}:{name}",
        {"role": role, "name": name, "tenant": tenant},
        _tenant_parent(tenant) + tuple(("Group", approver_role(g)) for g in groups),
    )


def identity_of(who: Identity | Principal, *, groups: Iterable[str] = ()) -> Entity:
    """The principal of a loaded identity file or of a verified A2A token."""
    return identity(who.role, who.name, tenant=who.tenant, groups=groups)


def publisher(principal: str, tenant: str) -> Entity:
    """The principal of an event as the coordinator verified it (`role:name` from
    `mesh.records.event_principal`, "" when no trusted key signed it). A publisher's tenant is
    the event's: the NATS server lets it publish on its own tenant's subjects only, and its
    signature covers the subject."""
    if not principal:
        return identity(ANONYMOUS, ANONYMOUS, tenant="")
    role, _, name = principal.partition(":")
    return identity(role, name, tenant=tenant if role == "publisher" else "*")


def event_type(tenant: str, type_: str) -> Entity:
    return Entity(
        "EventType", f"{tenant}/{type_}", {"tenant": tenant, "type": type_}, _tenant_parent(tenant)
    )


def decision_type(tenant: str, type_: str) -> Entity:
    """What an approval is about: a decision type of a tenant (`approve`)."""
    return Entity(
        "DecisionType",
        f"{tenant}/{type_}",
        {"tenant": tenant, "type": type_},
        _tenant_parent(tenant),
    )


def dead_letters(tenant: str = "*", reason: str = "*", event_type: str = "*") -> Entity:
    """Dead letters as narrowly as an act names them ("*": any)."""
    return Entity(
        "DeadLetter",
        f"{tenant}/{reason}/{event_type}",
        {"tenant": tenant, "reason": reason, "event_type": event_type},
        _tenant_parent(tenant),
    )


def tool(agent: str, name: str) -> Entity:
    return Entity("Tool", f"{agent}/{name}", {"agent": agent, "name": name})


def cedar_value(value: Any) -> Any:
    """A JSON value as Cedar takes it (for a tool call's arguments): integers in Cedar's range
    stay Longs, other numbers become strings, lists sets, objects records, nulls go."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if _LONG[0] <= value <= _LONG[1] else str(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() and _LONG[0] <= value <= _LONG[1] else str(value)
    if isinstance(value, Mapping):
        return {str(k): cedar_value(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [cedar_value(v) for v in value if v is not None]
    return str(value)


# -- decisions -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """Cedar's answer. `policy_ids`: the policies that decided (the permits that allowed, or
    the forbids that denied; none: nothing permitted it, deny by default). `reasons`: policies
    that could not be evaluated on this request (Cedar skips them)."""

    allowed: bool
    policy_ids: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()

    def explain(self) -> str:
        if self.allowed:
            text = f"permitted by {', '.join(self.policy_ids)}"
        elif self.policy_ids:
            text = f"forbidden by policy {', '.join(self.policy_ids)}"
        else:
            text = "no policy permits it (denied by default)"
        if self.reasons:
            text += f"; not evaluated: {'; '.join(self.reasons)}"
        return text

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True)
class PolicyChange:
    """A change of the policy files seen: taken (`accepted`) or refused with `error`, in which
    case the set in force stays as it was."""

    sha256: str
    files: tuple[str, ...]
    accepted: bool
    error: str = ""
    profile: str = "default"


# -- where the files are ---------------------------------------------------------------------------
def policy_paths(profile: Profile, folder: Path | None) -> tuple[list[Path], Path, Path | None]:
    """(policy files, schema, entities file) for a profile and MESH_AUTHZ_DIR.

    default: the shipped permits (what the mesh did before policies), plus the folder's
    policies if any (a `forbid` there takes something away). regulated: the folder's policies
    alone, or with no folder the shipped clinic set; nothing is allowed that none permits."""
    files: list[Path] = []
    if profile == "default":
        files += sorted((SHIPPED_POLICIES / "default").glob(f"*{POLICY_SUFFIX}"))
    schema, entities = SHIPPED_SCHEMA, None
    if folder is None:
        if profile == "regulated":
            files += sorted((SHIPPED_POLICIES / "regulated").glob(f"*{POLICY_SUFFIX}"))
        return files, schema, entities
    if not folder.is_dir():
        raise ConfigError(
            f"MESH_AUTHZ_DIR {folder} is not a folder",
            hint="point it at a folder of .cedar files (docs/authorization.md)",
        )
    files += sorted(folder.glob(f"*{POLICY_SUFFIX}"))
    schemas = sorted(folder.glob(f"*{SCHEMA_SUFFIX}"))
    if len(schemas) > 1:
        raise ConfigError(
            f"{folder} holds {len(schemas)} schema files ({', '.join(p.name for p in schemas)})",
            hint="keep one .cedarschema file there (or none: the shipped one)",
        )
    if schemas:
        schema = schemas[0]
    if (folder / ENTITIES_FILE).exists():
        entities = folder / ENTITIES_FILE
    return files, schema, entities


def _stamp(paths: Iterable[Path]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(p), -1, -1))
    return tuple(out)


# -- the authorizer --------------------------------------------------------------------------------
class Authorizer:
    """Answers `is_allowed(principal, action, resource, context)` from the policy set in force.

    The set is loaded and checked when the authorizer is made (a bad file: ConfigError naming
    file and line); afterwards the files are looked at again at most every `every_s` (their
    names, sizes and mtimes: a stat each) when a question comes, and a change is loaded and
    checked before it replaces the set. A change that does not load is refused and the set in
    force stays. Each change, taken or refused, is queued for the audit trail
    (`take_changes`, `audit_changes`).
    """

    def __init__(
        self,
        profile: Profile = "default",
        folder: Path | None = None,
        *,
        every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.profile: Profile = profile
        self.folder = folder
        self.every_s = every_s
        self._clock = clock
        self._lock = threading.Lock()  # a tool guard may be called from a worker thread
        self._changes: list[PolicyChange] = []
        self._answers: dict[str, Decision] = {}
        paths = policy_paths(profile, folder)
        self._stamp = _stamp(self._watched(paths))
        self._set: Loaded = load(*paths)
        self._looked = clock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Authorizer:
        return cls(settings.profile, settings.authz_dir)

    @staticmethod
    def _watched(paths: tuple[list[Path], Path, Path | None]) -> list[Path]:
        files, schema, entities = paths
        return [schema, *files, *([entities] if entities else [])]  # the order `digest` takes

    @property
    def sha256(self) -> str:
        return self._set.sha256

    @property
    def files(self) -> tuple[str, ...]:
        return self._set.files

    @property
    def policy_ids(self) -> tuple[str, ...]:
        return self._set.ids

    def refresh(self, *, force: bool = False) -> PolicyChange | None:
        """Look at the files (at most every `every_s` unless `force`); load a change. Returns
        the change seen, if any (also queued for `take_changes`)."""
        now = self._clock()
        if not force and now - self._looked < self.every_s:
            return None
        with self._lock:
            self._looked = now
            try:
                paths = policy_paths(self.profile, self.folder)
            except ConfigError as e:  # the folder went, or holds two schemas
                gone = ((f"!{e.message}", 0, 0),)
                return None if self._stamp == gone else self._refused(gone, e.message, ())
            stamp = _stamp(self._watched(paths))
            if stamp == self._stamp:
                return None
            files = tuple(str(p) for p in self._watched(paths))
            try:
                loaded = load(*paths)
            except PolicyFileError as e:
                return self._refused(stamp, e.message, files)
            self._stamp = stamp
            if loaded.sha256 == self._set.sha256:
                return None  # touched, not changed
            self._set = loaded
            self._answers = {}
            change = PolicyChange(loaded.sha256, loaded.files, True, profile=self.profile)
            log.warning("authorization policies changed: now %s (sha256 %s)", files, loaded.sha256)
            self._changes.append(change)
            return change

    def _refused(
        self, stamp: tuple[tuple[str, int, int], ...], error: str, files: tuple[str, ...]
    ) -> PolicyChange:
        # Remembered, so a broken file is reported once per change of it, not every second.
        self._stamp = stamp
        sha = digest([Path(f) for f in files])
        change = PolicyChange(sha, files, False, error, profile=self.profile)
        log.error(
            "authorization policies NOT changed: %s; the policies in force (sha256 %s) stay",
            error,
            self._set.sha256,
        )
        self._changes.append(change)
        return change

    def take_changes(self) -> list[PolicyChange]:
        with self._lock:
            changes, self._changes = self._changes, []
        return changes

    def is_allowed(
        self,
        principal: Entity,
        action: Action | str,
        resource: Entity,
        context: Mapping[str, Any] | None = None,
    ) -> Decision:
        self.refresh()
        policies = self._set  # one set for the whole question, whatever a reload does
        role = (context or {}).get("role")
        if isinstance(role, str) and context is not None:
            # The role an approval asks for, in the spelling policies are held to.
            context = {**context, "role": approver_role(role)}
        # Cedar's answer depends on nothing but the request and the set: the same question
        # (the coordinator asks one per event, mostly the same) is answered from memory.
        key = json.dumps(
            [policies.sha256, principal.cedar(), action, resource.cedar(), context or {}],
            sort_keys=True,
            default=str,
        )
        known = self._answers.get(key)
        if known is not None:
            return known
        decision = self._evaluate(policies, principal, action, resource, context)
        if len(self._answers) >= ANSWERS_KEPT:
            self._answers.clear()  # bounded; refilled by the questions still asked
        self._answers[key] = decision
        return decision

    def _evaluate(
        self,
        policies: Loaded,
        principal: Entity,
        action: str,
        resource: Entity,
        context: Mapping[str, Any] | None,
    ) -> Decision:
        mine = {json.dumps(e.uid(), sort_keys=True) for e in (principal, resource)}
        entities: list[dict[str, Any]] = []
        extra_parents: list[dict[str, str]] = []
        for declared in policies.entities:
            key = json.dumps(declared["uid"], sort_keys=True)
            if key in mine:
                # Memberships come from the file; attributes only from the verified identity.
                extra_parents += list(declared.get("parents") or [])  # type: ignore[call-overload]
                continue
            entities.append(dict(declared))
        for entity in (principal, resource):
            doc = entity.cedar()
            if entity is principal and extra_parents:
                doc["parents"] = doc["parents"] + [
                    p for p in extra_parents if p not in doc["parents"]
                ]
            entities.append(doc)
        request = {
            "principal": principal.uid(),
            "action": {"type": f"{NAMESPACE}::Action", "id": action},
            "resource": resource.uid(),
            "context": dict(context or {}),
        }
        result = cedarpy.is_authorized(request, policies.policies, entities)
        errors = tuple(str(e) for e in result.diagnostics.errors)
        if result.decision == cedarpy.Decision.NoDecision:  # an input Cedar refused
            return Decision(False, (), errors or ("the request could not be evaluated",))
        ids = tuple(result.diagnostics.reasons)
        return Decision(result.allowed, ids, errors)


# -- tool calls ------------------------------------------------------------------------------------
# (tool name, arguments, context) -> None to run it, or why not (the model gets it as an
# error). Synchronous: Cedar answers in well under a millisecond, and remembered answers in
# microseconds. The context is a mapping or an object; its `tenant`, if any, is the call's.
ToolGuard = Callable[[str, Mapping[str, Any], Any], "str | None"]


def _tenant_of(context: Any) -> str:
    if isinstance(context, Mapping):
        return str(context.get("tenant") or "")
    return str(getattr(context, "tenant", "") or "")


def tool_guard(
    authorizer: Authorizer,
    *,
    agent: str,
    tenant: str = "",
    on_deny: Callable[[str, Mapping[str, Any], Decision], None] | None = None,
) -> ToolGuard:
    """A guard for an agent's model's tool calls: asks `call_tool` of `Mesh::Tool::"<agent>/
    <tool>"` as `Mesh::Identity::"agent:<agent>"`, with the call's tenant (the context's
    `tenant`, else `tenant`) and its arguments (`context.args`). Returns None when allowed,
    else the reason, naming the policy. A deny is logged (agents cannot write the audit trail)
    and given to `on_deny`."""
    principal = identity("agent", agent)

    def guard(name: str, arguments: Mapping[str, Any], context: Any) -> str | None:
        call_tenant = _tenant_of(context) or tenant
        args = cedar_value(arguments) if isinstance(arguments, Mapping) else {}
        decision = authorizer.is_allowed(
            principal, "call_tool", tool(agent, name), {"tenant": call_tenant, "args": args}
        )
        if decision.allowed:
            return None
        log.warning(
            "tool call %s of agent %s (tenant %s) denied: %s",
            name,
            agent,
            call_tenant or "-",
            decision.explain(),
        )
        if on_deny is not None:
            on_deny(name, arguments, decision)
        return f"tool {name!r} may not be called by agent {agent!r}: {decision.explain()}"

    return guard


# -- the audit trail -------------------------------------------------------------------------------
AUTHZ_KIND: Final = "authz_policy"
DENY_KIND: Final = "forbidden"


async def audit_changes(audit: AuditLog, authorizer: Authorizer) -> None:
    """Append every policy change the authorizer saw (taken or refused) to the system chain."""
    from mesh.audit import SYSTEM_TENANT

    for change in authorizer.take_changes():
        await audit.append(
            SYSTEM_TENANT,
            AUTHZ_KIND,
            ",".join(Path(f).name for f in change.files) or "-",
            {
                "sha256": change.sha256,
                "files": list(change.files),
                "accepted": change.accepted,
                "profile": change.profile,
                **({"error": change.error} if change.error else {}),
                **({"in_force": authorizer.sha256} if not change.accepted else {}),
            },
        )


async def audit_in_force(audit: AuditLog, authorizer: Authorizer) -> None:
    """Record the set in force when it is not the last one recorded (a start with new files
    is a change too), then any change already seen."""
    from mesh.audit import SYSTEM_TENANT

    last = await audit.last(SYSTEM_TENANT, AUTHZ_KIND)
    if last is None or last.data.get("sha256") != authorizer.sha256:
        await audit.append(
            SYSTEM_TENANT,
            AUTHZ_KIND,
            ",".join(Path(f).name for f in authorizer.files),
            {
                "sha256": authorizer.sha256,
                "files": list(authorizer.files),
                "accepted": True,
                "profile": authorizer.profile,
                "policies": list(authorizer.policy_ids),
            },
        )
    await audit_changes(audit, authorizer)


async def audit_denial(
    audit: AuditLog,
    tenant: str,
    ref: str,
    *,
    principal: Entity,
    action: str,
    resource: Entity,
    decision: Decision,
    msg_id: str | None = None,
) -> None:
    """One deny in `tenant`'s chain, naming who, what and the policy that decided."""
    await audit.append(
        tenant,
        DENY_KIND,
        ref,
        {
            "principal": principal.id,
            "action": action,
            "resource": str(resource),
            "policies": list(decision.policy_ids),
            "explanation": decision.explain(),
        },
        msg_id=msg_id,
    )
