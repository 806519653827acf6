"""What a reviewing agent answers: the vote and its reasons (the wire contract of a vote)."""

from __future__ import annotations

from typing import Literal

import msgspec

Choice = Literal["approve", "reject", "abstain"]


class Verdict(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """A reviewer's vote. Carried as the DataPart of the A2A task's `verdict` artifact."""

    vote: Choice
    reasons: list[str] = msgspec.field(default_factory=list)
    confidence: float = 1.0

    @classmethod
    def approve(cls, *reasons: str) -> Verdict:
        return cls("approve", list(reasons) or ["no findings"])

    @classmethod
    def reject(cls, *reasons: str) -> Verdict:
        return cls("reject", list(reasons))

    @classmethod
    def abstain(cls, *reasons: str) -> Verdict:
        return cls("abstain", list(reasons))
