"""People in the quorum, on the wire: approval requests and the signed answers to them.

A policy that names human voters (`coordinator.policy.HumanVoter`) makes the coordinator, once
the agents have voted, record the decision as waiting for people (the ledger's
`awaiting_human`) and publish one `ApprovalRequest` per human voter on
`mesh.approval.<tenant>.req.<id>` (signed by the coordinator, purpose "approval_request"): the
event, the agents' votes and reasons (the evidence), who may answer now, until when. A new
message on the same subject follows each escalation, and a closing one (`status = "closed"`)
when the voter's answer is in or its silence was counted: the last message on a request's
subject is its current state.

A person (identity role `human`, one tenant; the approver roles it holds are the `claims` of its
key in the trust file) answers with a `HumanVote` on `mesh.approval.<tenant>.vote.<id>`, signed
with its own key (purpose "approval") over the vote without `signature`. The vote names the
evidence it was shown by its SHA-256 (`evidence_digest`), so an answer given to other evidence
is refused. The coordinator answers each vote with an `ApprovalReceipt` on
`mesh.approval.<tenant>.receipt.<id>`: accepted, or refused and why (refusals are audited).

Through the web console (`via = "console"`): the console never holds a person's key, so it
signs the answer with its OWN key (a trusted `console` key, or the operator's) on behalf of
the signed-in person it names in `by`. Believed only if the signer is such a key and `by` is a
trusted, active `human` key of the vote's tenant (`person_of`): the console cannot invent
people, and which roles the person holds is the trust file's word, not the console's. The
desk then checks the person exactly as for a direct answer (role asked, Cedar's `approve`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from mesh import subjects
from mesh.identity import Role, Signer, Trust, TrustedKey, unb64, verify_with
from mesh.records import Vote
from mesh.votes import canonical

if TYPE_CHECKING:
    from mesh.bus import Bus

Answer = Literal["approve", "reject"]
VIA_CONSOLE = "console"
VIA_A2A = "a2a"  # the inbox served as an A2A agent by a coordinator (coordinator.approval_tasks)
# Who may sign an answer on a person's behalf: the console (and the operator, the root of
# trust, who may sign anything; a console run as the operator's identity).
ON_BEHALF_SIGNERS: tuple[Role, ...] = ("console", "operator")
# Which keys may sign for a person, by the way the answer came: the web console's, or a
# coordinator serving the inbox over A2A (the person proved by their bearer token there).
SIGNERS_VIA: dict[str, tuple[Role, ...]] = {
    VIA_CONSOLE: ON_BEHALF_SIGNERS,
    VIA_A2A: ("coordinator", "operator"),
}


def approver_role(role: str) -> str:
    """The one spelling of an approver role (and of the Cedar group that holds it): lowercase,
    words joined by '-' (`clinical_safety_officer`, ` Clinical-Safety-Officer` →
    `clinical-safety-officer`). Policies refuse another spelling (`coordinator.policy`),
    credentials are issued in it (`mesh creds human --role`), a person's roles are read in it
    (`person_of`, so an older trust file holding `_` still matches) and Cedar sees only it
    (`mesh.authz`: group ids, the `role` of an approval's context, entities.json; a policy that
    names a group or role with `_` is refused, file and line): the two spellings cannot
    disagree any more."""
    return role.strip().lower().replace("_", "-")


ROLE_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def role_problem(role: str) -> str | None:
    """Why `role` is not an approver role as written (None: it is)."""
    if ROLE_PATTERN.fullmatch(role):
        return None
    fixed = approver_role(role)
    if fixed != role and ROLE_PATTERN.fullmatch(fixed):
        return f"approver role {role!r} is spelled {fixed!r} (lowercase, words joined by '-')"
    return f"approver role {role!r}: use lowercase letters, digits and '-'"


class ApprovalRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    id: str  # `<event token>.<role first asked>`
    tenant: str
    event_id: str
    event_type: str
    decision_type: str
    voter: str  # the electorate's name for this person's vote: `human:<role>`
    roles: list[str]  # who may answer now (the first role, then each escalation's)
    round: int = 0  # 0 when first asked, +1 per escalation
    status: Literal["open", "closed"] = "open"
    asked_at: float
    expires_at: float  # wall clock: then silence counts as `silence`
    next_escalation_at: float = 0.0  # wall clock (0: none left)
    next_roles: list[str] = msgspec.field(default_factory=list)  # who is added then
    silence: str = "reject"
    event_data: Any = None
    evidence: list[Vote] = msgspec.field(default_factory=list)  # the agents' votes, as cast
    outcome: str = ""  # once closed: what came of it
    signer: str = ""
    signature: str = ""

    def evidence_digest(self) -> str:
        """What the person was shown, by hash: the event's data and the agents' votes."""
        return evidence_digest(self.event_data, self.evidence)


class HumanVote(msgspec.Struct, omit_defaults=True, kw_only=True):
    request_id: str
    tenant: str
    event_id: str
    voter: str  # `human:<role>` of the request answered
    round: int  # the request's round the person answered
    answer: Answer
    reason: str
    evidence_sha256: str  # `ApprovalRequest.evidence_digest()` of what they were shown
    by: str  # the person's name (its identity's)
    at: float
    via: str = ""  # "console": signed by the console for `by` (empty: by the person's own key)
    signer: str = ""  # key id of the person's key (via the console: the console's)
    signature: str = ""


class ApprovalReceipt(msgspec.Struct, omit_defaults=True, kw_only=True):
    request_id: str
    by: str  # as the answered vote claims (believed only if `accepted`)
    at: float  # the answered vote's `at`
    accepted: bool
    why: str = ""
    # `vote_digest` of the vote answered: what a waiting client matches on. `by` and `at` are
    # anyone's to claim; a forged vote naming them has another digest.
    vote_sha256: str = ""


def vote_digest(vote: HumanVote) -> str:
    """SHA-256 of the signed vote (canonical JSON, signature included): one answer's name,
    its message id on the stream and what its receipt names. Ed25519 signatures are
    deterministic, so re-sending the same answer gives the same digest (a duplicate, dropped);
    nobody can know it before the vote is signed, so no one can take its id first."""
    return hashlib.sha256(canonical(msgspec.to_builtins(vote))).hexdigest()


def evidence_digest(event_data: Any, evidence: list[Vote]) -> str:
    body = canonical({"data": event_data, "votes": msgspec.to_builtins(evidence)})
    return hashlib.sha256(body).hexdigest()


_enc = msgspec.json.Encoder()
request_decoder = msgspec.json.Decoder(ApprovalRequest)
vote_decoder = msgspec.json.Decoder(HumanVote)
receipt_decoder = msgspec.json.Decoder(ApprovalReceipt)


def _payload(record: ApprovalRequest | HumanVote) -> bytes:
    return canonical(msgspec.to_builtins(msgspec.structs.replace(record, signature="")))


def sign_request(signer: Signer, request: ApprovalRequest) -> ApprovalRequest:
    unsigned = msgspec.structs.replace(request, signer=signer.kid, signature="")
    return msgspec.structs.replace(
        unsigned, signature=signer.sign("approval_request", _payload(unsigned))
    )


def request_refusal(trust: Trust, request: ApprovalRequest) -> str | None:
    """Why this request is not a trusted coordinator's (None: it is)."""
    return trust.refusal(request.signer, "approval_request", _payload(request), request.signature)


def answer(
    signer: Signer,
    request: ApprovalRequest,
    *,
    by: str,
    answer: Answer,
    reason: str,
    at: float | None = None,
    via: str = "",
) -> HumanVote:
    """A person's signed answer to `request` (`via` "console": `signer` is the console's key,
    answering for the person `by`)."""
    vote = HumanVote(
        request_id=request.id,
        tenant=request.tenant,
        event_id=request.event_id,
        voter=request.voter,
        round=request.round,
        answer=answer,
        reason=reason,
        evidence_sha256=request.evidence_digest(),
        by=by,
        at=round(time.time() if at is None else at, 3),
        via=via,
        signer=signer.kid,
    )
    return msgspec.structs.replace(vote, signature=signer.sign("approval", _payload(vote)))


def vote_refusal(trust: Trust, vote: HumanVote) -> str | None:
    """Why this answer is not signed by a trusted person of its tenant, or by a trusted
    console for one (None: it is). Who may answer which request is the coordinator's check
    (`coordinator.humans`), on `person_of(trust, vote)`."""
    if vote.via:
        return _on_behalf_refusal(trust, vote)
    refusal = trust.refusal(vote.signer, "approval", _payload(vote), vote.signature, at=vote.at)
    if refusal is not None:
        return refusal
    entry = trust.keys[vote.signer]
    if entry.tenant != vote.tenant:
        return f"key {vote.signer} belongs to tenant {entry.tenant!r}, not {vote.tenant!r}"
    if entry.name != vote.by:
        return f"key {vote.signer} is {entry.name!r}'s, not {vote.by!r}'s"
    return None


def _on_behalf_refusal(trust: Trust, vote: HumanVote) -> str | None:
    signers = SIGNERS_VIA.get(vote.via)
    if signers is None:
        return f"answers come directly, via the console or via A2A, not via {vote.via!r}"
    if not vote.signature or not vote.signer:
        return "unsigned"
    if vote.signer in trust.revoked:
        return f"key {vote.signer} is revoked"
    entry = trust.keys.get(vote.signer)
    if entry is None or entry.role not in signers:
        who = "console" if vote.via == VIA_CONSOLE else "coordinator"
        return f"key {vote.signer} is not a trusted {who}'s: it may not answer for people"
    if entry.retired_at and vote.at > entry.retired_at:
        return f"key {vote.signer} was retired"
    # The same purpose as a person's own answer: the signed bytes differ by `via`, and
    # `trust.refusal` never lets a console key through without it (SIGNERS["approval"]).
    if not verify_with(unb64(entry.public), "approval", _payload(vote), vote.signature):
        return "signature does not verify"
    if person_of(trust, vote) is None:
        return f"{vote.by!r} is no trusted person of tenant {vote.tenant!r}"
    return None


def person_of(trust: Trust, vote: HumanVote) -> TrustedKey | None:
    """The trusted person who answers: the signer's key for a direct answer; via the console,
    the person it names, from the trust file (an active `human` key of the vote's tenant
    named `by`; with several, as after a rotation, the roles of all of them)."""
    if not vote.via:
        key = trust.keys.get(vote.signer)
        return None if key is None else _roles_spelled(key)
    return person(trust, vote.by, vote.tenant)


def _roles_spelled(key: TrustedKey) -> TrustedKey:
    claims = sorted({approver_role(c) for c in key.claims})
    return key if claims == list(key.claims) else msgspec.structs.replace(key, claims=claims)


def person(trust: Trust, name: str, tenant: str) -> TrustedKey | None:
    """The trusted person `name` of `tenant` (an active `human` key; with several, the roles
    of all of them), or None."""
    found = [
        k
        for kid, k in trust.keys.items()
        if k.role == "human"
        and k.name == name
        and k.tenant == tenant
        and kid not in trust.revoked
        and not k.retired_at
    ]
    if not found:
        return None
    claims = sorted({approver_role(c) for k in found for c in k.claims})
    return msgspec.structs.replace(found[0], claims=claims)


def encode(record: ApprovalRequest | HumanVote | ApprovalReceipt) -> bytes:
    return _enc.encode(record)


def request_subject(request: ApprovalRequest) -> str:
    return subjects.approval(request.tenant, "req", request.id)


# -- the inbox, as a person (or a script) uses it ----------------------------------------------
async def inbox(bus: Bus, tenant: str, trust: Trust | None) -> dict[str, ApprovalRequest]:
    """Every request of `tenant` as its last message says (open or closed), by id; with
    `trust`, requests a trusted coordinator did not sign are left out."""
    from mesh.bus import read_stream

    found: dict[str, ApprovalRequest] = {}
    filt = subjects.approvals_filter(tenant, "req")
    for m in await read_stream(bus, subjects.APPROVALS_STREAM, filter_subject=filt):
        try:
            request = request_decoder.decode(m.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if trust is not None and request_refusal(trust, request) is not None:
            continue
        found[request.id] = request
    return found


def vote_msg_id(vote: HumanVote) -> str:
    """A vote's `Nats-Msg-Id`: `approval:<tenant>.<request>:vote:<vote_digest>`."""
    return subjects.approval_msg_id(vote.tenant, vote.request_id, f"vote:{vote_digest(vote)}")


async def submit(bus: Bus, vote: HumanVote) -> bool:
    """Publish a signed answer; False when this very vote was submitted already (its message
    id is its digest, so a duplicate is the same signed answer, never another one that took
    its id: its receipt, given or coming, is this one's)."""
    ack = await bus.publish(
        subjects.approval(vote.tenant, "vote", vote.request_id),
        encode(vote),
        msg_id=vote_msg_id(vote),
    )
    return not ack.duplicate


async def receipt(bus: Bus, vote: HumanVote, *, wait_s: float) -> ApprovalReceipt | None:
    """The coordinator's receipt of `vote`, within `wait_s` (a bounded poll of the stream)."""
    from mesh.bus import read_stream

    until = time.monotonic() + wait_s
    filt = subjects.approval(vote.tenant, "receipt", vote.request_id)
    digest = vote_digest(vote)
    while True:
        for m in await read_stream(bus, subjects.APPROVALS_STREAM, filter_subject=filt):
            try:
                r = receipt_decoder.decode(m.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # people of the tenant may not publish receipts; nothing to trust
            if r.vote_sha256 == digest:
                return r
        if time.monotonic() >= until:
            return None
        await asyncio.sleep(0.2)
