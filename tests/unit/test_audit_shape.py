"""The audit record of a decision holds its votes (issue 14); records of the older shape (one
`vote` record per vote after the decision's) read and verify alike."""

from __future__ import annotations

import copy

from mesh.audit import GENESIS, AuditRecord, summary, verify, votes_of

VOTES = [
    {"skill": "security", "agent": "sec", "outcome": "voted", "verdict": {"vote": "approve"}},
    {"skill": "quality", "agent": "q", "outcome": "timeout"},
]


def chain(*records: AuditRecord) -> list[tuple[int, AuditRecord]]:
    out, prev = [], GENESIS
    for i, r in enumerate(records, 1):
        r.prev, r.index = prev, i
        r.hash = r.digest()
        prev = r.hash
        out.append((i, r))
    return out


def test_a_decision_record_holds_its_votes_and_says_them() -> None:
    r = AuditRecord("acme", "decision", "e1", "c", 1.0, {"outcome": "approved", "votes": VOTES}, "")
    assert votes_of(r) == VOTES
    assert summary(r) == "approved; votes: security=approve, quality=timeout"


def test_the_older_shape_reads_and_verifies_beside_the_new() -> None:
    old = [
        AuditRecord("acme", "decision", "e1", "c", 1.0, {"outcome": "rejected"}, ""),
        *(AuditRecord("acme", "vote", "e1", "c", 1.0, v, "") for v in VOTES),
    ]
    data = {"outcome": "approved", "votes": VOTES}
    new = AuditRecord("acme", "decision", "e2", "c", 2.0, data, "")
    records = chain(*old, new)
    assert verify(records).ok and verify(records).count == 4
    assert [summary(r) for _, r in records] == [
        "rejected",
        "vote security=approve",
        "vote quality=timeout",
        "approved; votes: security=approve, quality=timeout",
    ]


def test_a_vote_changed_inside_a_decision_record_is_caught() -> None:
    votes = copy.deepcopy(VOTES)
    r = AuditRecord("acme", "decision", "e1", "c", 1.0, {"outcome": "approved", "votes": votes}, "")
    records = chain(r)
    r.data["votes"][1]["outcome"] = "voted"  # the silent voter made to look as if it voted
    result = verify(records)
    assert not result.ok and "altered" in result.problem
