"""Who may do what, as Cedar policies a compliance officer can read (docs/authorization.md).

    import mesh.authz as authz

    authorizer = authz.Authorizer.from_settings(settings)   # MESH_PROFILE, MESH_AUTHZ_DIR
    decision = authorizer.is_allowed(
        authz.identity("publisher", "billing", tenant="acme"),
        "publish",
        authz.event_type("acme", "payment.rule_changed"),
        {"verified": True},
    )
    decision.allowed, decision.policy_ids, decision.explain()

Policies are `.cedar` files checked against a Cedar schema (`mesh.cedarschema`, shipped here)
when they load and whenever they change; a file that does not check is refused with its file
and line, and the set in force stays. The `default` profile ships permits for everything the
mesh did before policies (NATS permissions still decide who may publish where); `regulated`
denies whatever no policy permits.
"""

from mesh.authz._engine import (
    ANONYMOUS,
    AUTHZ_KIND,
    DENY_KIND,
    SHIPPED_POLICIES,
    SHIPPED_SCHEMA,
    Action,
    Authorizer,
    Decision,
    Entity,
    PolicyChange,
    Profile,
    ToolGuard,
    audit_changes,
    audit_denial,
    audit_in_force,
    cedar_value,
    dead_letters,
    decision_type,
    event_type,
    identity,
    identity_of,
    policy_paths,
    publisher,
    tool,
    tool_guard,
)
from mesh.authz._source import PolicyFileError

__all__ = [
    "ANONYMOUS",
    "AUTHZ_KIND",
    "DENY_KIND",
    "SHIPPED_POLICIES",
    "SHIPPED_SCHEMA",
    "Action",
    "Authorizer",
    "Decision",
    "Entity",
    "PolicyChange",
    "PolicyFileError",
    "Profile",
    "ToolGuard",
    "audit_changes",
    "audit_denial",
    "audit_in_force",
    "cedar_value",
    "dead_letters",
    "decision_type",
    "event_type",
    "identity",
    "identity_of",
    "policy_paths",
    "publisher",
    "tool",
    "tool_guard",
]
