"""The four-eyes agent: a release needs an approval by someone other than its author."""

from __future__ import annotations

from pathlib import Path

import msgspec

from agents.release import ReleaseProposal
from mesh import Agent, EventContext, Verdict

agent = Agent("four-eyes", prompt=Path(__file__).with_name("prompt.md"))


def independent_approvers(release: ReleaseProposal) -> list[str]:
    """Who approved the release, other than its author (names compared case-insensitively)."""
    author = release.author.strip().lower()
    return sorted({a.by for a in release.approvals if a.by.strip().lower() != author})


@agent.rules
def review(release: ReleaseProposal) -> Verdict:
    approvers = independent_approvers(release)
    if approvers:
        return Verdict.approve(f"approved by {', '.join(approvers)}, not the author")
    if release.approvals:
        return Verdict.reject(f"only the author ({release.author}) approved it")
    return Verdict.reject("no approval recorded")


class ReviewRequested(msgspec.Struct):
    release_id: str
    author: str
    reason: str


@agent.on_event("release.proposed")
async def request_review(release: ReleaseProposal, ctx: EventContext) -> None:
    """Ask for a second pair of eyes as soon as a release without one is proposed."""
    if not independent_approvers(release):
        reason = "needs an approval by someone other than the author"
        await ctx.publish(
            "release.review_requested", ReviewRequested(release.id, release.author, reason)
        )
