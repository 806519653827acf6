"""The data of a `release.proposed` event: what the reviewing agents look at.

This is the wire contract between whoever proposes a release and the reviewers. Every struct
ignores unknown fields and gives every optional field a default, so a producer can send a partial
payload (say, only `id`, `service` and `changed_files[].path`) and it still decodes; the reviewers
then decide what they can and abstain only where a check is truly impossible.

Example (JSON)::

    {
      "id": "rel-2031", "service": "billing-api", "author": "alice",
      "changed_files": [{"path": "src/billing/tax.py", "diff": "@@ -1,2 +1,3 @@\\n..."}],
      "dependencies_added": [{"name": "python-dateutil", "version": "2.9.0.post0"}],
      "tickets": [{"id": "CHG-88", "kind": "change"}],
      "approvals": [{"by": "bob", "role": "engineer"}],
      "tests": {"passed": true, "total": 412, "failed": 0, "suites": ["unit"]},
      "region": "eu-west-1", "data_destinations": ["eu-west-1"]
    }
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Literal

import msgspec

# The ticket kinds the reviewers look for. `Ticket.kind` is any string: a tracker with kinds of
# its own ("incident", "dpia") must not make the whole release undecodable for every reviewer.
TicketKind = Literal["change", "security", "privacy", "bug", "feature"]

# Unified-diff hunk header: "@@ -old_start[,old_len] +new_start[,new_len] @@".
_HUNK = re.compile(r"^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@")


class ChangedFile(msgspec.Struct, forbid_unknown_fields=False):
    """One file touched by the release.

    `content` is the file's full new text (optional, may be empty for large or binary files);
    `diff` is a unified diff of the change (optional). `lines_added`/`lines_removed` are the
    producer's counts; when both are 0 the reviewers count from `diff`, else from `content`.
    """

    path: str
    content: str = ""
    diff: str = ""
    lines_added: int = 0
    lines_removed: int = 0

    def has_text(self) -> bool:
        """Whether there is anything to scan (content or diff)."""
        return bool(self.content or self.diff)

    def changed_lines(self) -> Iterator[tuple[int, str, str]]:
        """Yield `(line_no, sign, text)` for every changed line.

        From the diff when there is one: `+` lines carry their number in the new file, `-` lines
        their number in the old file.
        Without a diff the whole `content` counts as added (a new file, or a producer that only
        sends full text).
        """
        if self.diff:
            old_no = new_no = 1
            in_hunk = False
            for raw in self.diff.splitlines():
                hunk = _HUNK.match(raw)
                if hunk:
                    old_no, new_no = int(hunk.group(1)), int(hunk.group(2))
                    in_hunk = True
                    continue
                if raw.startswith("diff --git "):
                    in_hunk = False
                    continue
                if not in_hunk and raw.startswith(("+++ ", "--- ")):
                    # File headers; inside a hunk the same prefix is a real change ("-- sql").
                    continue
                if raw.startswith("+"):
                    yield new_no, "+", raw[1:]
                    new_no += 1
                elif raw.startswith("-"):
                    yield old_no, "-", raw[1:]
                    old_no += 1
                elif raw.startswith(" "):
                    old_no += 1
                    new_no += 1
            return
        for no, line in enumerate(self.content.splitlines(), start=1):
            yield no, "+", line

    def added_lines(self) -> Iterator[tuple[int, str]]:
        """`(line_no, text)` of lines the release adds (what ships)."""
        for no, sign, text in self.changed_lines():
            if sign == "+":
                yield no, text

    def changed_text(self) -> str:
        """Added and removed lines joined: the text a reviewer should read for this file."""
        return "\n".join(text for _, _, text in self.changed_lines())

    def size(self) -> int | None:
        """Lines added + removed; None when unknown (no counts, no diff, no content)."""
        if self.lines_added or self.lines_removed:
            return self.lines_added + self.lines_removed
        if not self.has_text():
            return None
        return sum(1 for _ in self.changed_lines())


class Dependency(msgspec.Struct, forbid_unknown_fields=False):
    """A dependency the release adds. `version` is the requirement as written (`2.31.0`,
    `==2.31.0`, `>=2`, `^1.4.0`, `latest`, or empty); `source` is the registry or origin
    (`pypi`, `npm`, `git`, `url`, ...)."""

    name: str
    version: str = ""
    source: str = "pypi"


class Ticket(msgspec.Struct, forbid_unknown_fields=False):
    """A tracker ticket linked to the release; `kind` says which review it stands for (the
    reviewers look for change, security and privacy; any other kind is carried and ignored)."""

    id: str
    kind: str = "change"


class Approval(msgspec.Struct, forbid_unknown_fields=False):
    """A sign-off by a person; `role` is free text such as `engineer`, `privacy`, `dpo`."""

    by: str
    role: str = "engineer"


class TestReport(msgspec.Struct, forbid_unknown_fields=False):
    """The CI test result for the release's build."""

    __test__ = False  # not a pytest test class, despite the name

    passed: bool
    total: int = 0
    failed: int = 0
    suites: list[str] = msgspec.field(default_factory=list)


class ReleaseProposal(msgspec.Struct, forbid_unknown_fields=False):
    """The `data` of a `release.proposed` event.

    `region` is where the service runs; `data_destinations` lists the regions (same naming, e.g.
    `eu-west-1`) the release sends data to. `tests` is None when no test report was attached.
    """

    id: str
    service: str = ""
    author: str = ""
    summary: str = ""
    changed_files: list[ChangedFile] = msgspec.field(default_factory=list)
    dependencies_added: list[Dependency] = msgspec.field(default_factory=list)
    tickets: list[Ticket] = msgspec.field(default_factory=list)
    approvals: list[Approval] = msgspec.field(default_factory=list)
    tests: TestReport | None = None
    region: str | None = None
    data_destinations: list[str] = msgspec.field(default_factory=list)

    def has_ticket(self, kind: str) -> bool:
        return any(t.kind == kind for t in self.tickets)


_decoder = msgspec.json.Decoder(ReleaseProposal)


def decode_release(data: bytes | str) -> ReleaseProposal:
    """Parse JSON; raises `msgspec.ValidationError` naming the bad field."""
    return _decoder.decode(data)


def to_release(data: Any) -> ReleaseProposal:
    """Convert already-parsed JSON (e.g. an event's `data`) into a `ReleaseProposal`."""
    if isinstance(data, ReleaseProposal):
        return data
    return msgspec.convert(data, ReleaseProposal)
