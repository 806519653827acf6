"""Who may do what on the bus: the NATS permissions of each role, and the server configuration
that makes the server enforce them.

Every process connects with its own nkey (`mesh.identity.Identity`); the server knows each
public nkey as a user with the permissions `permissions(user)` gives its role. The table
(ARCHITECTURE.md, "Trust model") as subjects — `T` is a publisher's or reader's tenant, `A` an
agent's name, `<inbox>` the identity's own reply inboxes (`Identity.inbox_prefix`):

- operator: everything (stream, bucket and consumer admin).
- coordinator: publishes `mesh.decision.>`, `mesh.dlq.>`, `mesh.audit.>`, `mesh.checkpoint.>`,
  `mesh.trace.>`, the ledger `$KV.mesh_decisions.>`, large dead-lettered bodies
  `$O.mesh_dlq_bodies.>` and A2A requests `mesh.a2a.>`; consumes MESH_EVENTS through its
  durable `coordinator` (reads an event by sequence to dead-letter it, and lists the stream's
  consumers to see whether an ignored type has a handler); reads the decisions, dead-letter,
  audit, checkpoint and trace streams and the cards, ledger and dead-letter-body buckets;
  subscribes `mesh.status.coordinator` and MESH_EVENTS' give-up advisories; serves the
  approval inbox as an A2A agent (subscribes `mesh.a2a.approvals`, publishes the answers it
  signs for people `mesh.approval.*.vote.>`).
- agent A: subscribes `mesh.a2a.A` and `mesh.a2a.A.*` and answers on the reply subjects of
  the requests it got (`allow_responses`); writes `$KV.mesh_cards.A.>` and `$KV.mesh_tasks.A.>`
  and reads only its own task keys (direct gets and watches, the key in the API subject);
  subscribes callers' stream cancels (`_INBOX.*.*.cancel`); publishes output events
  `mesh.evt.>` and `mesh.trace.>`; binds its event handlers' durables on MESH_EVENTS; reads and
  writes the budgets bucket `$KV.mesh_budgets.>` (model spend and call slots of every tenant);
  reads the cards bucket and sends A2A requests `mesh.a2a.>` (delegation: the callee checks its
  token).
- agent A also declares schedules `mesh.sched.def.>`, reads them back and relays their
  firings through the durable `schedule-relay` (`mesh.schedules`).
- publisher of T: publishes `mesh.evt.T.>` (acks come to its inbox).
- reader of T: creates consumers only with T's filter, pinned in the API subject
  (`$JS.API.CONSUMER.CREATE.<stream>.*.mesh.decision.T.>`, and `mesh.dlq.T.>`,
  `mesh.audit.T.>`, `mesh.checkpoint.T`, `mesh.approval.T.>`), delivering to its own inbox;
  no reads by sequence.
- human of T (a person who answers approval requests): publishes `mesh.approval.T.vote.>`
  and reads `mesh.approval.T.>` as a reader does; the coordinator publishes requests and
  receipts (`mesh.approval.*.req.>`, `….receipt.>`) and consumes requests and answers through
  its durable `coordinator-approvals`.
  `mesh.audit.T.>`, `mesh.checkpoint.T`), delivering to its own inbox; no reads by sequence.
- console (the web console, mesh/console): reads the decisions, dead-letter, audit,
  checkpoint and trace streams and the cards, ledger and dead-letter-body buckets of every
  tenant (it scopes each signed-in user to their tenant itself); subscribes `mesh.evt.>`,
  `mesh.decision.>` and `mesh.dlq.>` for live pages; asks `mesh.status.coordinator`; and
  publishes what its operator users' replays need: the event to `mesh.evt.>`, the replay's
  audit record to `mesh.audit.>` and its checkpoint to `mesh.checkpoint.>`. Purging is stream
  admin: the operator's (`mesh dlq purge`). Approvals: reads MESH_APPROVALS and subscribes
  `mesh.approval.>` (the inbox), publishes answers `mesh.approval.*.vote.>` that it signs on
  behalf of its signed-in people (the desk checks the person, mesh.approvals); never the
  coordinators' durable.

Every role may also publish to its own inbox (a caller cancels a stream there), `$JS.API.INFO`
and `$JS.API.STREAM.NAMES` (stream names only: how a process checks that the mesh's streams
exist). Nobody but the operator may create, update, delete or purge a stream or a bucket
(`$JS.API.STREAM.*`), delete a message, or touch the meta leader: those are denied explicitly,
so no allow ever widens them.

What the server cannot pin (subjects are matched token by token, never by prefix): an agent's
event-handler durables are named `agent-A-<handler>`, one token, so any agent may bind any
handler durable on MESH_EVENTS except the coordinator's (denied by name). Agents read every
event anyway (their handlers choose types, not tenants).

Replies: agents answer A2A requests on the caller's reply subject, and a stream sends many
frames there, so agents get `allow_responses` with room for them (`RESPONSES`): a reply subject
is writable only after a request carrying it arrived, and only for a while.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mesh import subjects
from mesh.errors import ConfigError
from mesh.identity import (
    ALL_TENANTS,
    IdentityDir,
    NatsUser,
    Role,
    identity_dir,
    inbox_token,
    load_identity,
    new_nats_seed,
    write_secret,
)
from mesh.settings import Settings

INBOX_ROOT = "_INBOX"
JS = subjects.JS_API
# A streamed A2A answer: frames, keep-alives and the end on one reply subject, for up to an hour.
RESPONSES = {"max": 1_000_000, "expires": "1h"}
AUTH_FILE = "nats-auth.conf"  # the authorization block, included by each server's config

# The mesh's streams a reader may read, with the subject a tenant's messages have in each.
_TENANT_SUBJECTS = {
    subjects.DECISIONS_STREAM: f"{subjects.DECISIONS_ROOT}.{{t}}.>",
    subjects.DLQ_STREAM: f"{subjects.DLQ_ROOT}.{{t}}.>",
    subjects.AUDIT_STREAM: f"{subjects.AUDIT_ROOT}.{{t}}.>",
    subjects.CHECKPOINTS_STREAM: f"{subjects.CHECKPOINT_ROOT}.{{t}}",
    subjects.APPROVALS_STREAM: f"{subjects.APPROVALS_ROOT}.{{t}}.>",
}
_CARDS = subjects.kv_stream(subjects.CARDS_BUCKET)
_TASKS = subjects.kv_stream(subjects.TASKS_BUCKET)
_LEDGER = subjects.kv_stream(subjects.DECISIONS_BUCKET)
_DLQ_BODIES = subjects.obj_stream(subjects.DLQ_BODIES_BUCKET)
_BUDGETS = subjects.kv_stream(subjects.BUDGETS_BUCKET)
_CANARIES = subjects.kv_stream(subjects.CANARIES_BUCKET)

# Admin of streams, buckets and the cluster: the operator's alone, denied to every other role.
ADMIN = [
    f"{JS}.STREAM.CREATE.>",
    f"{JS}.STREAM.UPDATE.>",
    f"{JS}.STREAM.DELETE.>",
    f"{JS}.STREAM.PURGE.>",
    f"{JS}.STREAM.MSG.DELETE.>",
    f"{JS}.STREAM.SNAPSHOT.>",
    f"{JS}.STREAM.RESTORE.>",
    f"{JS}.STREAM.LEADER.>",
    f"{JS}.STREAM.PEER.>",
    f"{JS}.CONSUMER.LEADER.>",
    f"{JS}.META.>",
    f"{JS}.SERVER.>",
    f"{JS}.ACCOUNT.>",
]


# The coordinators' durable on MESH_APPROVALS (their timers): nobody who may create consumers
# there with a tenant's filter may create, read or ack it under that name.
_APPROVALS_DURABLE_DENIED = [
    f"{JS}.CONSUMER.*.{subjects.APPROVALS_STREAM}.{subjects.APPROVALS_DURABLE}",
    f"{JS}.CONSUMER.*.{subjects.APPROVALS_STREAM}.{subjects.APPROVALS_DURABLE}.>",
    f"{JS}.CONSUMER.MSG.NEXT.{subjects.APPROVALS_STREAM}.{subjects.APPROVALS_DURABLE}",
    f"$JS.ACK.{subjects.APPROVALS_STREAM}.{subjects.APPROVALS_DURABLE}.>",
]


def tenant_filter(stream: str, tenant: str) -> str | None:
    """The subject filter of `tenant`'s messages in `stream` (None: not a per-tenant stream)."""
    template = _TENANT_SUBJECTS.get(stream)
    return template.format(t=tenant) if template else None


def inbox_prefix(nkey: str) -> str:
    """The reply inboxes of the user with public nkey `nkey` (as `Identity.inbox_prefix`)."""
    return f"{INBOX_ROOT}.{inbox_token(nkey)}"


def _consumer(stream: str, consumer: str) -> list[str]:
    """Everything one named consumer needs: create (with any filter), info, fetch, ack."""
    return [
        f"{JS}.CONSUMER.CREATE.{stream}.{consumer}",
        f"{JS}.CONSUMER.CREATE.{stream}.{consumer}.>",
        f"{JS}.CONSUMER.INFO.{stream}.{consumer}",
        f"{JS}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"$JS.ACK.{stream}.{consumer}.>",
    ]


def _reads(stream: str) -> list[str]:
    """Reading a whole stream: by sequence, directly, and through consumers of any filter
    (never deleting one: its own go when idle, `inactive_threshold`)."""
    return [
        f"{JS}.STREAM.INFO.{stream}",
        f"{JS}.STREAM.MSG.GET.{stream}",
        f"{JS}.DIRECT.GET.{stream}",
        f"{JS}.DIRECT.GET.{stream}.>",
        f"{JS}.CONSUMER.CREATE.{stream}",
        f"{JS}.CONSUMER.CREATE.{stream}.>",
        f"{JS}.CONSUMER.INFO.{stream}.*",
        f"{JS}.CONSUMER.MSG.NEXT.{stream}.*",
    ]


def _kv_key_reads(bucket: str, keys: str) -> list[str]:
    """Reading the keys `keys` of a bucket, pinned: direct gets name the key in the subject
    (the bucket must allow direct gets), and watches are consumers whose filter is the keys.
    Not STREAM.INFO: its `subjects_filter` lists every key of the bucket, whatever the
    permissions pin (`Bus.kv` binds such a bucket without it)."""
    stream = subjects.kv_stream(bucket)
    return [
        f"{JS}.DIRECT.GET.{stream}.$KV.{bucket}.{keys}",
        f"{JS}.CONSUMER.CREATE.{stream}.*.$KV.{bucket}.{keys}",
        f"{JS}.CONSUMER.INFO.{stream}.*",
    ]


def permissions(user: NatsUser) -> dict[str, Any]:
    """The NATS permissions of `user` (its role's, with its tenant or agent name filled in);
    empty for the operator, who may do everything."""
    if user.role == "operator":
        return {}
    inbox = f"{inbox_prefix(user.nkey)}.>"
    pub = [inbox, f"{JS}.INFO", f"{JS}.STREAM.NAMES"]
    sub = [inbox]
    deny_pub = list(ADMIN)
    deny_sub: list[str] = []
    responses: dict[str, Any] | None = None
    role: Role = user.role
    if role == "coordinator":
        pub += [
            f"{subjects.DECISIONS_ROOT}.>",
            f"{subjects.DLQ_ROOT}.>",
            f"{subjects.AUDIT_ROOT}.>",
            f"{subjects.CHECKPOINT_ROOT}.>",
            f"{subjects.TRACE_ROOT}.>",
            f"$KV.{subjects.DECISIONS_BUCKET}.>",
            # Canary gate (coordinator.canary): counts and stops, shared by all coordinators;
            # and the alert a stop raises.
            f"$KV.{subjects.CANARIES_BUCKET}.>",
            f"{subjects.ALERT_ROOT}.>",
            # Dead-lettered bodies too large for their record, kept by reference.
            subjects.obj_subjects(subjects.DLQ_BODIES_BUCKET),
            f"{subjects.A2A_ROOT}.>",
            # Approval requests and receipts (people answer on `…vote…`: coordinator.inbox).
            subjects.approvals_filter(kind="req"),
            subjects.approvals_filter(kind="receipt"),
            # Answers it signs for people who answer over A2A (coordinator.approval_tasks).
            subjects.approvals_filter(kind="vote"),
            *_consumer(subjects.APPROVALS_STREAM, subjects.APPROVALS_DURABLE),
            # Events: read by sequence (dead letters copy the original) and through its durable.
            f"{JS}.STREAM.INFO.{subjects.EVENTS_STREAM}",
            f"{JS}.STREAM.MSG.GET.{subjects.EVENTS_STREAM}",
            *_consumer(subjects.EVENTS_STREAM, subjects.COORDINATOR_DURABLE),
            # Which durables handle an ignored event type (none bound: dead letter no_handler).
            f"{JS}.CONSUMER.LIST.{subjects.EVENTS_STREAM}",
        ]
        for stream in (
            subjects.DECISIONS_STREAM,
            subjects.DLQ_STREAM,
            subjects.AUDIT_STREAM,
            subjects.CHECKPOINTS_STREAM,
            subjects.TRACE_STREAM,
            subjects.APPROVALS_STREAM,
            _CARDS,
            _LEDGER,
            _DLQ_BODIES,
            _CANARIES,
        ):
            pub += _reads(stream)
        sub += [
            subjects.COORDINATOR_STATUS,
            # The approval inbox served as an A2A agent (coordinator.approval_tasks).
            subjects.a2a(subjects.APPROVALS_AGENT),
            subjects.a2a_instance(subjects.APPROVALS_AGENT, "*"),
            subjects.max_deliveries_advisory(subjects.EVENTS_STREAM, "*"),
            subjects.terminated_advisory(subjects.EVENTS_STREAM, "*"),
        ]
        responses = {"max": 1, "expires": "10m"}  # status answers, flow control of watches
    elif role == "agent":
        a = user.name
        events = subjects.EVENTS_STREAM
        pub += [
            f"$KV.{subjects.CARDS_BUCKET}.{a}.>",
            f"$KV.{subjects.TASKS_BUCKET}.{a}.>",
            f"{subjects.EVENTS_ROOT}.>",
            f"{subjects.TRACE_ROOT}.>",
            f"{JS}.STREAM.INFO.{_CARDS}",
            f"{JS}.STREAM.INFO.{subjects.TRACE_STREAM}",
            *_kv_key_reads(subjects.TASKS_BUCKET, f"{a}.>"),
            # Budgets (mesh.budget): every agent reserves and settles model spend of any
            # tenant's events and days, and takes its call slots, so it reads and writes the
            # whole bucket. Not pinned per agent: the counters are shared by every voter of an
            # event and need one compare-and-set key (docs/budgets.md, "Who may write").
            f"$KV.{subjects.BUDGETS_BUCKET}.>",
            *_reads(_BUDGETS),
            # Delegation (mesh.delegate): finds agents by skill in the registry and calls them
            # (the callee still checks the caller's token).
            f"{subjects.A2A_ROOT}.>",
            *_reads(_CARDS),
            # Its event handlers' durables: filtered on events, never the coordinator's. Not
            # STREAM.INFO: with a subjects filter it lists every tenant's event subjects.
            f"{JS}.CONSUMER.CREATE.{events}.*.{subjects.EVENTS_ROOT}.>",
            f"{JS}.CONSUMER.INFO.{events}.*",
            f"{JS}.CONSUMER.MSG.NEXT.{events}.*",
            f"$JS.ACK.{events}.*.>",
        ]
        # Schedules (mesh.schedules): declare and remove definitions (any tenant, as it may
        # publish any tenant's events), read them back, and relay firings through the shared
        # durable. Never the firing subjects: only the server puts firings there.
        sched = subjects.SCHEDULES_STREAM
        pub += [
            f"{subjects.SCHEDULE_DEF_ROOT}.>",
            f"{JS}.STREAM.INFO.{sched}",
            f"{JS}.STREAM.MSG.GET.{sched}",
            f"{JS}.CONSUMER.CREATE.{sched}.*.{subjects.SCHEDULE_DEF_ROOT}.>",
            f"{JS}.CONSUMER.INFO.{sched}.*",
            *_consumer(sched, subjects.SCHEDULE_RELAY_DURABLE),
        ]
        coordinator = subjects.COORDINATOR_DURABLE
        deny_pub += [
            f"{JS}.CONSUMER.*.{events}.{coordinator}",
            f"{JS}.CONSUMER.*.{events}.{coordinator}.>",
            f"{JS}.CONSUMER.MSG.NEXT.{events}.{coordinator}",
            f"$JS.ACK.{events}.{coordinator}.>",
        ]
        sub += [
            subjects.a2a(a),
            f"{subjects.a2a(a)}.*",
            # A caller that stops a streamed answer early says so on `<its reply inbox>.cancel`.
            f"{INBOX_ROOT}.*.*.{subjects.STREAM_CANCEL}",
        ]
        responses = RESPONSES
    elif role == "publisher":
        pub += [f"{subjects.EVENTS_ROOT}.{user.tenant}.>"]
    elif role == "human":
        # Answers to T's approval requests (signed; who may answer what, the coordinator
        # checks); reads T's requests and receipts through consumers pinned to T's filter.
        stream = subjects.APPROVALS_STREAM
        pub += [
            subjects.approvals_filter(user.tenant, "vote"),
            f"{JS}.CONSUMER.CREATE.{stream}.*.{tenant_filter(stream, user.tenant)}",
        ]
        deny_pub += [
            f"{JS}.CONSUMER.CREATE.{stream}",
            f"{JS}.CONSUMER.DURABLE.CREATE.{stream}.>",
            f"{JS}.STREAM.MSG.GET.{stream}",
            f"{JS}.DIRECT.GET.{stream}",
            f"{JS}.DIRECT.GET.{stream}.>",
            *_APPROVALS_DURABLE_DENIED,
        ]
    elif role == "reader":
        for stream in _TENANT_SUBJECTS:
            filt = tenant_filter(stream, user.tenant)
            pub.append(f"{JS}.CONSUMER.CREATE.{stream}.*.{filt}")
            deny_pub += [
                f"{JS}.CONSUMER.CREATE.{stream}",
                f"{JS}.CONSUMER.DURABLE.CREATE.{stream}.>",
                f"{JS}.STREAM.MSG.GET.{stream}",
                f"{JS}.DIRECT.GET.{stream}",
                f"{JS}.DIRECT.GET.{stream}.>",
            ]
        deny_pub += _APPROVALS_DURABLE_DENIED
    elif role == "console":
        pub += [
            f"{subjects.EVENTS_ROOT}.>",  # a dead letter replayed to its subject
            f"{subjects.AUDIT_ROOT}.>",  # and the replay's audit record,
            f"{subjects.CHECKPOINT_ROOT}.>",  # and the checkpoint that anchors it
            subjects.COORDINATOR_STATUS,  # breaker states (answers come to its inbox)
        ]
        for stream in (
            subjects.DECISIONS_STREAM,
            subjects.DLQ_STREAM,
            subjects.AUDIT_STREAM,
            subjects.CHECKPOINTS_STREAM,
            subjects.TRACE_STREAM,
            _CARDS,
            _LEDGER,
            _DLQ_BODIES,
            subjects.APPROVALS_STREAM,  # the approvals inbox (requests, receipts)
        ):
            pub += _reads(stream)
        # Its signed-in people's answers, which it signs on their behalf (mesh.approvals).
        pub.append(subjects.approvals_filter(kind="vote"))
        deny_pub += _APPROVALS_DURABLE_DENIED  # never the coordinators' timers and answers
        # The audit and dead-letter scans delete their consumer when done (else each page
        # waits for a refusal); nobody keeps a lasting consumer on these streams.
        for stream in (subjects.AUDIT_STREAM, subjects.CHECKPOINTS_STREAM, subjects.DLQ_STREAM):
            pub.append(f"{JS}.CONSUMER.DELETE.{stream}.*")
        sub += [
            f"{subjects.EVENTS_ROOT}.>",
            f"{subjects.DECISIONS_ROOT}.>",
            f"{subjects.DLQ_ROOT}.>",
            subjects.approvals_filter(),
        ]
    else:  # pragma: no cover - Role is a closed set
        raise ConfigError(f"no NATS permissions for role {role!r}")
    perms: dict[str, Any] = {
        "publish": {"allow": pub, "deny": deny_pub},
        "subscribe": {"allow": sub, **({"deny": deny_sub} if deny_sub else {})},
    }
    if responses is not None:
        perms["allow_responses"] = responses
    return perms


def server_authorization(users: Iterable[NatsUser]) -> str:
    """The nats-server config block that admits exactly `users`, each with its role's
    permissions. An empty list admits nobody (never anonymous access)."""
    entries = []
    for u in users:
        entry: dict[str, Any] = {"nkey": u.nkey}
        perms = permissions(u)
        if perms:
            entry["permissions"] = perms
        # One line per user, JSON (nats-server's config format is a superset of it); quoted
        # subjects keep `$JS` from reading as a variable.
        tenant = "" if u.tenant == ALL_TENANTS else f" ({u.tenant})"
        entries.append(f"    # {u.role}:{u.name}{tenant}")
        entries.append(f"    {json.dumps(entry)}")
    if not entries:
        # No users would mean no authorization at all: one nkey whose seed is thrown away keeps
        # the door closed instead.
        entries.append(f'    {{"nkey": "{_nobody()}"}}')
    return "authorization {\n  users: [\n" + "\n".join(entries) + "\n  ]\n}\n"


def _nobody() -> str:
    """A valid public user nkey whose seed nobody keeps."""
    import nkeys

    return str(nkeys.from_seed(new_nats_seed().encode()).public_key.decode())


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path`, mode 0600 from the first byte (server configs hold passwords)."""
    return write_secret(path, text.encode())


def write_authorization(path: Path, users: Sequence[NatsUser]) -> Path:
    """The authorization block for `users`, as a file a server config includes (0600)."""
    header = "# Written by Quorum Mesh (mesh.natsauth): who may connect, and what each may do.\n"
    return write_private(path, header + server_authorization(users))


# -- identity folders -------------------------------------------------------------------------
def resolve_identity_dir(settings: Settings) -> IdentityDir | None:
    """The identity folder in effect: the one MESH_IDENTITY's file is in (when it holds the
    NATS users), else `<home>/identity`; None when there is none."""
    candidates = []
    if settings.identity is not None:
        candidates.append(settings.identity.parent)
    candidates.append(identity_dir(settings.home))
    for folder in candidates:
        if (folder / IdentityDir.USERS).is_file() and (folder / IdentityDir.OPERATOR).is_file():
            return IdentityDir(folder)
    return None


def ensure_identity(ids: IdentityDir, role: Role, name: str, *, tenant: str = ALL_TENANTS) -> Path:
    """The identity file of (role, name, tenant) in `ids`, issued on first use and reused
    after (as long as the server still knows its nkey), so restarts do not pile up keys."""
    path = ids.path / IdentityDir.file_name(role, name, tenant)
    if path.is_file():
        nkey = load_identity(path).nats_public_key()
        if any(u.nkey == nkey for u in ids.users()):
            return path
    return ids.issue(role, name, tenant=tenant, path=path)
