"""Decision policies: which skills vote on an event type, by which rule, under which clocks."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from coordinator.canary import Rollout
from coordinator.quorum import QuorumRule, SilenceCount, Silent, tally
from mesh.approvals import role_problem
from mesh.errors import PolicyError
from mesh.verdict import Choice

DEFAULT_FILE = Path(__file__).with_name("policies.toml")


HUMAN_PREFIX = "human:"  # a human voter's name in the electorate: `human:<role>`
AskHumans = Literal["always", "on_disagreement", "on_low_confidence"]
BudgetCount = Literal["reject", "abstain", "no_quorum"]


class Escalation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Who else may answer once the request has waited `after_s` (from when it was asked)."""

    role: str
    after_s: float


class HumanVoter(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A person's sign-off as one voter (`human:<role>`), asked after the agents have voted.

    `role` is asked first; each `escalate` entry adds a role that may answer from `after_s`
    after the request (earlier roles still may); at `wait_s` the silence counts as `silence`.
    Silence never approves."""

    role: str
    wait_s: float = 4 * 3600.0
    escalate: list[Escalation] = []
    silence: Literal["reject", "no_quorum"] = "reject"
    # Each request (and escalation) is also POSTed here as JSON, through the SSRF guard of push
    # notifications (mesh.a2a.push): a chat bridge, a pager, a ticketing hook.
    notify: str = ""

    @property
    def voter(self) -> str:
        return HUMAN_PREFIX + self.role

    def roles(self) -> list[str]:
        """Every role that may answer, the first asked first."""
        return [self.role, *(e.role for e in self.escalate)]

    def check(self) -> None:
        for role in self.roles():
            problem = role_problem(role)  # one spelling, everywhere (mesh.approvals)
            if problem is not None:
                raise ValueError(f"human: {problem}")
        if len(set(self.roles())) != len(self.roles()):
            raise ValueError(f"human {self.role!r}: a role is named twice in its chain")
        if self.wait_s <= 0:
            raise ValueError(f"human {self.role!r}: wait_s must be positive")
        after = [e.after_s for e in self.escalate]
        if any(a <= 0 for a in after) or after != sorted(set(after)):
            raise ValueError(f"human {self.role!r}: escalate after_s must be positive, increasing")
        if after and after[-1] >= self.wait_s:
            raise ValueError(f"human {self.role!r}: every escalation must come before wait_s")


class Policy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    skills: list[str]
    rule: QuorumRule
    agent_timeout_s: float = 5.0  # per call; with progress, the longest silence allowed
    # A call to an agent that keeps reporting progress may run this long (default: no
    # extension). Always within deadline_s.
    agent_timeout_max_s: float | None = None
    deadline_s: float = 15.0
    retries: int = 1
    # What an unanswered voter (timeout, nobody listening, transport error) counts as.
    # "absent" leaves it out of the tally, so min_participation decides; "no_quorum" leaves it
    # out and turns an approval into no_quorum.
    timeout_counts_as: SilenceCount = "reject"
    # Required (and only then accepted) when the count above lets silence approve: "approve",
    # or the silence of a voter the rule cannot do without counting as anything that approves.
    silence_reason: str = ""
    # What a voter that refused to spend past the event's budget counts as (its signed
    # abstention saying `budget_exceeded`, mesh.budget). Never "approve": running out of money
    # must not approve; "abstain" is refused where it would let a voter the rule cannot do
    # without be skipped (docs/budgets.md).
    budget_exceeded: BudgetCount = "reject"
    decision_type: str = ""
    decide_early: bool = False  # publish as soon as the outcome cannot change
    # What to do when the votes make no quorum: publish a `no_quorum` decision (consumers
    # see it and can escalate), or dead-letter the event so an operator replays it.
    on_no_quorum: Literal["publish", "dead_letter"] = "publish"
    # People who vote too (coordinator.humans), after the agents; the rule counts each as the
    # voter `human:<role>`. When they are asked: `always` (whenever their answer could still
    # change the outcome), `on_disagreement` (the agents did not all vote alike), or
    # `on_low_confidence` (an agent's confidence is below `confidence_below`). Not asked:
    # they did not vote (like an abstention).
    humans: list[HumanVoter] = []
    ask_humans: AskHumans = "always"
    confidence_below: float = 0.0
    # A candidate version of one voter's agent (coordinator.canary, docs/versions.md): `canary`
    # answers a sticky share of the events instead of the stable version; `shadow` is asked as
    # well, its vote recorded and never counted. Either is stopped past its disagreement gate.
    canary: Rollout | None = None
    shadow: Rollout | None = None

    @property
    def voters(self) -> list[str]:
        """The electorate: the skills, then the human voters."""
        return [*self.skills, *(h.voter for h in self.humans)]

    def human(self, voter: str) -> HumanVoter | None:
        return next((h for h in self.humans if h.voter == voter), None)

    def check(self, event_type: str) -> None:
        if not self.skills:
            raise ValueError("skills must name at least one skill")
        if len(set(self.skills)) != len(self.skills):
            raise ValueError("skills must not repeat")
        if self.agent_timeout_s <= 0 or self.deadline_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.deadline_s < self.agent_timeout_s:
            raise ValueError("deadline_s must be at least agent_timeout_s")
        if self.agent_timeout_max_s is not None and self.agent_timeout_max_s < self.agent_timeout_s:
            raise ValueError("agent_timeout_max_s must be at least agent_timeout_s")
        if not 0 <= self.retries <= 10:
            raise ValueError("retries must be between 0 and 10")
        for h in self.humans:
            h.check()
        if len({h.voter for h in self.humans}) != len(self.humans):
            raise ValueError("humans must not repeat a role")
        if self.ask_humans == "on_low_confidence" and not 0 < self.confidence_below <= 1:
            raise ValueError('ask_humans = "on_low_confidence" needs confidence_below in (0, 1]')
        if self.confidence_below and self.ask_humans != "on_low_confidence":
            raise ValueError('confidence_below is only for ask_humans = "on_low_confidence"')
        self.rule.validate(len(self.voters))
        for name, rollout in (("canary", self.canary), ("shadow", self.shadow)):
            if rollout is not None:
                try:
                    rollout.check()
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
        unknown = sorted(set(self.rule.vetoes) - set(self.voters))
        if unknown:
            raise ValueError(f"veto holders {unknown} are not among the skills or humans")
        approving = self.silence_approves()
        if approving and not self.silence_reason.strip():
            raise ValueError(
                f"timeout_counts_as = {self.timeout_counts_as!r} lets silence approve: "
                f"{approving}; silence never approves unless the policy says why "
                '(timeout_counts_as = "reject" or "no_quorum", or a silence_reason)'
            )
        skipped = self._needed(self.budget_exceeded)
        if skipped:
            raise ValueError(
                f"budget_exceeded = {self.budget_exceeded!r} would approve without "
                f"{', '.join(skipped)} (the rule cannot do without it) once its budget runs out; "
                'use budget_exceeded = "reject" or "no_quorum"'
            )
        if self.silence_reason and not approving:
            raise ValueError(
                "silence_reason is only for a timeout_counts_as that lets silence approve"
            )

    def silence_approves(self) -> str:
        """Why `timeout_counts_as` lets silence approve ("" if it does not).

        A skill the rule cannot do without is one whose reject alone stops an approval even
        when every other voter approves (a veto holder; every voter of `unanimous`). Counting
        such a skill's silence as anything that then approves, or any silence as "approve",
        lets a hung, flooded or failing reviewer approve by saying nothing."""
        if self.timeout_counts_as == "approve":
            return "any unanswered voter counts as approve"
        needed = self._needed(self.timeout_counts_as)
        if not needed:
            return ""
        return f"the rule cannot do without {', '.join(needed)}, yet silence there approves"

    def _needed(self, counts_as: SilenceCount) -> list[str]:
        """The skills the rule cannot do without whose silence, counted as `counts_as`, still
        lets the others approve."""
        silence = Silent(what="no answer", counts_as=counts_as)
        needed = []
        voters = self.voters
        for skill in self.skills:
            others: dict[str, Choice] = {s: "approve" for s in voters if s != skill}
            alone = tally(self.rule, voters, {**others, skill: "reject"}, final=True)
            if alone.outcome == "approved":
                continue  # the rule can do without this skill
            quiet = tally(self.rule, voters, others, final=True, silent={skill: silence})
            if quiet.outcome == "approved":
                needed.append(skill)
        return needed


class TenantLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a coordinator admits of one tenant (`[tenants.<name>]`, `[tenants."*"]` for the
    rest): at most `events_at_once` of its events being decided by this coordinator at once;
    the next is dead-lettered `over_quota` at once, before any agent is asked (docs/budgets.md,
    "Per tenant")."""

    events_at_once: int | None = None

    def check(self) -> None:
        if self.events_at_once is not None and self.events_at_once < 1:
            raise ValueError("events_at_once must be at least 1")


class Policies:
    def __init__(
        self,
        by_type: dict[str, Policy],
        source: str,
        ignore: tuple[str, ...] = (),
        tenants: dict[str, TenantLimits] | None = None,
    ) -> None:
        self.by_type = by_type
        self.source = source
        self.ignore = ignore
        self.tenants = tenants or {}

    def get(self, event_type: str) -> Policy | None:
        return self.by_type.get(event_type)

    def limits(self, tenant: str) -> TenantLimits | None:
        """The tenant's own table, else `[tenants."*"]`, else None (no limit)."""
        return self.tenants.get(tenant) or self.tenants.get("*")

    def digest(self) -> str:
        """SHA-256 of the effective policies (not the file's bytes: comments do not count)."""
        doc: dict[str, object] = {"policies": self.by_type, "ignore": self.ignore}
        if self.tenants:  # absent, the digest is what it was before tenant limits existed
            doc["tenants"] = self.tenants
        return hashlib.sha256(msgspec.json.encode(doc, order="sorted")).hexdigest()

    def ignored(self, event_type: str) -> bool:
        """Types the coordinator does not decide (handled by event-driven agents)."""
        return any(_matches(p, event_type) for p in self.ignore)

    def decision_type(self, event_type: str) -> str:
        policy = self.by_type[event_type]
        base = event_type.rsplit(".", 1)[0] if "." in event_type else event_type
        return policy.decision_type or f"{base}.decided"


def load(path: Path | None = None) -> Policies:
    path = path or DEFAULT_FILE
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} not found", hint="set MESH_POLICY_FILE") from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"policy file {path}: {e}", hint="fix the TOML syntax") from None
    return parse(raw, source=str(path))


def _matches(pattern: str, event_type: str) -> bool:
    """NATS-style wildcards over the dotted type: `*` one token, `>` the rest."""
    p, t = pattern.split("."), event_type.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(t) > i
        if i >= len(t) or (tok != "*" and tok != t[i]):
            return False
    return len(p) == len(t)


def parse(raw: dict[str, object], *, source: str = "<policies>") -> Policies:
    raw = dict(raw)
    ignore = raw.pop("ignore", [])
    tenants = _tenants(raw.pop("tenants", {}), source)
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise PolicyError(
            f"{source}: 'ignore' must be a list of event types", hint='e.g. ignore = ["ticket.*"]'
        )
    by_type: dict[str, Policy] = {}
    for event_type, body in raw.items():
        try:
            policy = msgspec.convert(body, Policy)
            policy.check(event_type)
        except (msgspec.ValidationError, ValueError) as e:
            raise PolicyError(
                f"{source}: policy for {event_type!r}: {e}",
                hint="see docs/policies.md for the fields and rules",
            ) from None
        by_type[event_type] = policy
    overlap = [t for t in by_type if any(_matches(p, t) for p in ignore)]
    if overlap:
        raise PolicyError(
            f"{source}: {overlap} both have a policy and are ignored",
            hint="remove them from one of the two",
        )
    return Policies(by_type, source, tuple(ignore), tenants)


def _tenants(raw: object, source: str) -> dict[str, TenantLimits]:
    """The `[tenants.<name>]` tables (`tenants` is a reserved key, as `ignore` is)."""
    if not isinstance(raw, dict):
        raise PolicyError(
            f"{source}: 'tenants' must be a table of tenants",
            hint='e.g. [tenants.acme] events_at_once = 8 (or [tenants."*"] for every other)',
        )
    limits: dict[str, TenantLimits] = {}
    for tenant, body in raw.items():
        try:
            limits[tenant] = msgspec.convert(body, TenantLimits)
            limits[tenant].check()
        except (msgspec.ValidationError, ValueError) as e:
            raise PolicyError(
                f"{source}: [tenants.{tenant}]: {e}",
                hint='see docs/policies.md, "Tenants"',
            ) from None
    return limits
