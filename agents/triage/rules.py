"""Deterministic triage of a support ticket: priority, owning team, labels, and why.

Each `Signal` is a set of words or phrases that implies a priority, a team, or both:

- p1 (critical): outage, "is down", data loss, breach or leak, PHI exposure;
- p2 (major): degraded service (latency, timeouts, 5xx), a security vulnerability (CVE),
  customers charged twice;
- p3 (normal): bugs, and any ticket with no signal at all;
- p4 (low): questions, feature requests, typos and docs, when nothing more urgent is said.

The priority is the most urgent one any signal implies; an enterprise customer's ticket is raised
one level (p1 stays p1). The team is taken by precedence, security > payments > platform, because
a security or money problem must reach its owners even when it also looks like an outage; with no
team word it is "support". The ticket's `service` field is matched for team words only (a service
named "billing-api" says who owns it, not how urgent the ticket is). Every reason quotes the words
that decided it, so a human can check the triage at a glance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agents.tickets import Priority, TicketCreated, TicketTriaged

PRIORITIES: tuple[Priority, ...] = ("p1", "p2", "p3", "p4")
DEFAULT_PRIORITY: Priority = "p3"
DEFAULT_TEAM = "support"
TEAM_PRECEDENCE = ("security", "payments", "platform")
ENTERPRISE = "enterprise"


@dataclass(frozen=True)
class Signal:
    label: str
    priority: Priority | None  # None: the words say who owns the ticket, not how urgent it is
    team: str | None
    pattern: re.Pattern[str]


def _words(pattern: str) -> re.Pattern[str]:
    # Bounded by non-letters so `down` does not match `download` nor `charge` match `recharged`.
    return re.compile(rf"(?<![A-Za-z])(?:{pattern})(?![A-Za-z])", re.IGNORECASE)


SIGNALS: tuple[Signal, ...] = (
    Signal(
        "outage",
        "p1",
        "platform",
        # Bare "down" is everywhere ("drop-down", "scroll down"), so only phrases that say
        # something is down count.
        _words(
            r"outages?|downtime|hard\s+down"
            r"|(?:is|are|was|were|went|goes|gone|been|completely|totally|still|seems)\s+down"
            r"|down\s+(?:since|for\s+(?:everyone|all|us|hours|\d+))"
        ),
    ),
    Signal(
        "data-loss",
        "p1",
        "platform",
        _words(
            r"data[\s-]loss|lost\s+(?:all\s+|our\s+|the\s+|customer\s+)?data|data\s+corruption"
            r"|corrupt(?:ed)?\s+data"
            r"|data\s+(?:was\s+|is\s+|got\s+|has\s+been\s+)?(?:deleted|wiped|corrupted|gone)"
        ),
    ),
    Signal(
        "breach",
        "p1",
        "security",
        # A memory or connection leak is a bug, not a security incident.
        _words(
            r"breach(?:ed|es)?|(?<!memory\s)(?<!connection\s)(?<!resource\s)(?<!handle\s)"
            r"leak(?:s|ed|ing|age)?|exfiltrat\w*|ransomware|compromised"
            r"|unauthori[sz]ed\s+access"
        ),
    ),
    Signal(
        "phi",
        "p1",
        "security",
        # The acronym only in capitals: "phi" in lower case is as likely the Greek letter.
        _words(
            r"(?-i:PHI|ePHI)|protected\s+health\s+information"
            r"|(?:patient|medical|health)\s+(?:data|records?|information)\s+"
            r"(?:was\s+|were\s+|is\s+|are\s+)?(?:exposed|visible|leaked|shared)"
        ),
    ),
    Signal(
        "vulnerability",
        "p2",
        "security",
        _words(
            r"CVE-\d{4}-\d{4,}|CVEs?|vulnerabilit(?:y|ies)|vulnerable|exploit(?:s|ed|able)?"
            r"|XSS|sql\s+injection|RCE|privilege\s+escalation"
        ),
    ),
    Signal(
        "double-charge",
        "p2",
        "payments",
        _words(
            r"(?:charged|billed)\s+(?:twice|two\s+times|double)"
            r"|double[\s-](?:charged|charges?|billed|billing)|duplicate\s+(?:charges?|payments?)"
        ),
    ),
    Signal(
        "billing",
        None,
        "payments",
        _words(
            r"billing|invoices?|invoiced|charges?|charged|refunds?|payments?|subscriptions?"
            r"|credit\s+card|checkout"
        ),
    ),
    Signal(
        "degraded",
        "p2",
        "platform",
        _words(
            r"latency|slow(?:ness|ly|er)?|timeouts?|timed\s+out|degraded|5xx|50[0-4]s?"
            r"|error\s+rate|unreachable|unavailable"
        ),
    ),
    Signal(
        "bug",
        "p3",
        None,
        _words(
            r"bugs?|broken|not\s+working|doesn'?t\s+work|crash(?:es|ed|ing)?"
            r"|fail(?:s|ed|ing|ure)?|(?:memory|connection|resource|handle)\s+leaks?"
        ),
    ),
    Signal(
        "question",
        "p4",
        None,
        _words(
            r"how\s+(?:do|can|should)\s+(?:i|we)|question|feature\s+request|would\s+be\s+nice"
            r"|please\s+add|typos?|documentation|docs|cosmetic"
        ),
    ),
)


@dataclass(frozen=True)
class Match:
    signal: Signal
    words: tuple[str, ...]  # as written in the ticket (spaces normalised)
    service_only: bool = False  # matched in the `service` field only: a team hint


def find(text: str, signal: Signal) -> tuple[str, ...]:
    """The distinct words of `signal` in `text` (first spelling kept), in order of appearance."""
    seen: dict[str, str] = {}
    for m in signal.pattern.finditer(text):
        word = " ".join(m.group(0).split())
        seen.setdefault(word.lower(), word)
    return tuple(seen.values())


def matches(ticket: TicketCreated) -> list[Match]:
    text = f"{ticket.title}\n{ticket.body}"
    out: list[Match] = []
    for signal in SIGNALS:
        words = find(text, signal)
        if words:
            out.append(Match(signal, words))
        elif signal.team and ticket.service and (hint := find(ticket.service, signal)):
            out.append(Match(signal, hint, service_only=True))
    return out


def _quoted(words: list[str]) -> str:
    return ", ".join(f"'{w}'" for w in dict.fromkeys(words))


def raise_one(priority: Priority) -> Priority:
    return PRIORITIES[max(0, PRIORITIES.index(priority) - 1)]


def triage(ticket: TicketCreated) -> TicketTriaged:
    found = matches(ticket)
    reasons: list[str] = []

    urgent = [m for m in found if m.signal.priority and not m.service_only]
    if urgent:
        priority = min(
            (m.signal.priority for m in urgent if m.signal.priority), key=PRIORITIES.index
        )
        deciding = [m for m in urgent if m.signal.priority == priority]
        reasons.append(
            f"{priority}: "
            + "; ".join(f"{m.signal.label} ({_quoted(list(m.words))})" for m in deciding)
        )
    else:
        priority = DEFAULT_PRIORITY
        reasons.append(f"{priority}: no urgency words (default)")

    if ticket.customer_tier.strip().lower() == ENTERPRISE:
        raised = raise_one(priority)
        if raised != priority:
            reasons.append(f"enterprise customer: raised from {priority} to {raised}")
        else:
            reasons.append(f"enterprise customer: already {priority}")
        priority = raised

    team = next(
        (t for t in TEAM_PRECEDENCE if any(m.signal.team == t for m in found)), DEFAULT_TEAM
    )
    if team == DEFAULT_TEAM:
        reasons.append(f"team {team}: no team words (default)")
    else:
        words = [
            w + (" (service)" if m.service_only else "")
            for m in found
            if m.signal.team == team
            for w in m.words
        ]
        reasons.append(f"team {team}: {_quoted(words)}")

    labels = [m.signal.label for m in found if not m.service_only]
    if ticket.customer_tier.strip().lower() == ENTERPRISE:
        labels.append(ENTERPRISE)
    return TicketTriaged(
        ticket_id=ticket.id, priority=priority, team=team, reasons=reasons, labels=labels
    )
