"""Builds agents/datasets/reviewers.jsonl: release proposals labelled as a human reviewer would.

Each case is one of the four shipped samples (agents/samples) with one deliberate change, and
its labels were written by hand from what the change is meant to be, reading the review rules
(agents/rules.toml, the checklists in each reviewer's prompt.md), never by running an agent:
`security`, `compliance`, `quality` are the three reviewers' expected votes and `decision` the
expected outcome of `release.proposed` (unanimous: `approved` only if all three approve,
else `rejected`).

    python -m agents.datasets.build_reviewers   # rewrites reviewers.jsonl
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

SAMPLES = Path(__file__).parent.parent / "samples"
OUT = Path(__file__).with_name("reviewers.jsonl")
AGENTS = {
    "security": "security-review",
    "compliance": "compliance-review",
    "quality": "quality-review",
}

Release = dict[str, Any]


def sample(name: str) -> Release:
    release: Release = json.loads((SAMPLES / f"release_{name}.json").read_text())
    return release


def add_file(path: str, diff: str = "", content: str = "") -> Callable[[Release], None]:
    def change(r: Release) -> None:
        f: dict[str, Any] = {"path": path}
        if diff:
            f["diff"] = diff
            f["lines_added"] = sum(1 for x in diff.splitlines() if x.startswith("+"))
            f["lines_removed"] = sum(1 for x in diff.splitlines() if x.startswith("-"))
        else:
            f["content"] = content
        r["changed_files"].append(f)

    return change


def setting(key: str, value: Any) -> Callable[[Release], None]:
    def change(r: Release) -> None:
        r[key] = value

    return change


def dep(name: str, version: str, source: str = "pypi") -> Callable[[Release], None]:
    def change(r: Release) -> None:
        r["dependencies_added"].append({"name": name, "version": version, "source": source})

    return change


def drop_files(*prefixes: str) -> Callable[[Release], None]:
    def change(r: Release) -> None:
        r["changed_files"] = [f for f in r["changed_files"] if not f["path"].startswith(prefixes)]

    return change


def ticket(kind: str, tid: str) -> Callable[[Release], None]:
    def change(r: Release) -> None:
        r["tickets"].append({"id": tid, "kind": kind})

    return change


def approval(by: str, role: str) -> Callable[[Release], None]:
    def change(r: Release) -> None:
        r["approvals"].append({"by": by, "role": role})

    return change


def py_diff(path: str, *added: str, removed: tuple[str, ...] = ()) -> str:
    lines = [f"--- a/{path}", f"+++ b/{path}", "@@ -1,3 +1,4 @@", " import os"]
    lines += [f"-{x}" for x in removed] + [f"+{x}" for x in added]
    return "\n".join(lines) + "\n"


A, R = "approve", "reject"
# (id, base sample, changes, security, compliance, quality, why)
CASES: list[tuple[str, str, list[Callable[[Release], None]], str, str, str, str]] = [
    ("clean", "clean", [], A, A, A, "the shipped clean release"),
    ("phi", "phi", [], A, R, A, "health data shown without a privacy review"),
    ("secret", "secret", [], R, A, A, "an AWS key committed in the export module"),
    ("untested", "untested", [], A, A, R, "code changed, no test changed, 2 tests failing"),
    ("dep-range", "clean", [dep("requests", ">=2.31")], R, A, A, "a ranged dependency"),
    ("dep-typosquat", "clean", [dep("reqeusts", "2.31.0")], R, A, A, "a known typosquat"),
    ("dep-git", "clean", [dep("fastjson", "1.2.0", "git")], R, A, A, "a source not allowed"),
    ("dep-npm-pinned", "clean", [dep("left-pad", "1.3.0", "npm")], A, A, A, "pinned, allowed"),
    (
        "auth-no-ticket",
        "clean",
        [add_file("src/auth/session.py", py_diff("src/auth/session.py", "SESSION_MINUTES = 30"))],
        R,
        A,
        A,
        "auth code touched without a security ticket",
    ),
    (
        "auth-with-ticket",
        "clean",
        [
            add_file("src/auth/session.py", py_diff("src/auth/session.py", "SESSION_MINUTES = 30")),
            ticket("security", "SEC-311"),
        ],
        A,
        A,
        A,
        "the same, with its security ticket",
    ),
    (
        "private-key",
        "clean",
        [
            add_file(
                "deploy/tls/server.pem",
                content="-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7Q\n"
                "-----END RSA PRIVATE KEY-----\n",
            )
        ],
        R,
        A,
        A,
        "a private key shipped",
    ),
    (
        "key-removed",
        "clean",
        [
            add_file(
                "src/billing/legacy.py",
                py_diff(
                    "src/billing/legacy.py",
                    'KEY = os.environ["AWS_ACCESS_KEY_ID"]',
                    removed=('KEY = "AKIA4HXQ7ZP2LMN3RT5W"',),
                ),
            )
        ],
        A,
        A,
        A,
        "removing a leaked key (read from the environment now) is the fix",
    ),
    (
        "env-secret",
        "clean",
        [
            add_file(
                "src/billing/db.py",
                py_diff("src/billing/db.py", 'db_password = os.environ["DB_PASSWORD"]'),
            )
        ],
        A,
        A,
        A,
        "a secret read from the environment, not written down",
    ),
    (
        "hardcoded-password",
        "clean",
        [
            add_file(
                "src/billing/db.py", py_diff("src/billing/db.py", 'db_password = "S3cr3tP4ss-2024"')
            )
        ],
        R,
        A,
        A,
        "a hard-coded database password",
    ),
    (
        "placeholder-password",
        "clean",
        [add_file("config/example.env", content='db_password = "changeme"\n')],
        A,
        A,
        A,
        "a documented placeholder, not a secret",
    ),
    (
        "github-token",
        "clean",
        [
            add_file(
                "tests/billing/fixtures.py",
                py_diff(
                    "tests/billing/fixtures.py",
                    'GH = "ghp_' + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8" + '"',
                ),
            )
        ],
        R,
        A,
        A,
        "a real-format GitHub token, even in a test fixture",
    ),
    (
        "self-approved",
        "clean",
        [setting("approvals", [{"by": "alice.moreau", "role": "engineer"}])],
        A,
        R,
        A,
        "approved only by its author",
    ),
    (
        "no-approval",
        "clean",
        [setting("approvals", [])],
        A,
        R,
        A,
        "nobody approved it",
    ),
    (
        "no-change-ticket",
        "clean",
        [setting("tickets", [{"id": "BUG-1290", "kind": "bug"}])],
        A,
        R,
        A,
        "no change ticket",
    ),
    ("us-region", "clean", [setting("region", "us-east-1")], A, R, A, "stored outside the EU"),
    (
        "us-destination",
        "clean",
        [setting("data_destinations", ["eu-west-1", "us-east-1"])],
        A,
        R,
        A,
        "data sent outside the EU",
    ),
    (
        "phi-reviewed",
        "phi",
        [ticket("privacy", "PRIV-77"), approval("grace.ito", "dpo")],
        A,
        A,
        A,
        "health data with a privacy ticket and a DPO approval",
    ),
    (
        "phi-ticket-only",
        "phi",
        [ticket("privacy", "PRIV-78")],
        A,
        R,
        A,
        "a privacy ticket but no privacy approver",
    ),
    (
        "no-tests-changed",
        "clean",
        [drop_files("tests/")],
        A,
        A,
        R,
        "code changed without its tests",
    ),
    (
        "tests-failing",
        "clean",
        [setting("tests", {"passed": False, "total": 412, "failed": 1, "suites": ["unit"]})],
        A,
        A,
        R,
        "a failing test",
    ),
    ("no-test-report", "clean", [setting("tests", None)], A, A, R, "no test report"),
    (
        "docs-only",
        "clean",
        [drop_files("src/", "tests/"), setting("dependencies_added", []), setting("tests", None)],
        A,
        A,
        A,
        "documentation only: no tests needed",
    ),
    (
        "too-large",
        "clean",
        [
            add_file(
                "src/billing/rewrite.py",
                py_diff("src/billing/rewrite.py", *(f"X{i} = {i}" for i in range(1200))),
            )
        ],
        A,
        A,
        R,
        "1,200 lines: too large to review",
    ),
    (
        "untested-fixed",
        "untested",
        [
            setting("tests", {"passed": True, "total": 390, "failed": 0, "suites": ["unit"]}),
            add_file(
                "tests/search/test_ranking.py",
                py_diff("tests/search/test_ranking.py", "def test_recent_first(): ..."),
            ),
        ],
        A,
        A,
        A,
        "the untested release with its tests added and passing",
    ),
    (
        "secret-and-range",
        "secret",
        [dep("urllib3", "*")],
        R,
        A,
        A,
        "a key and an unpinned dependency",
    ),
]


def build() -> list[dict[str, Any]]:
    rows = []
    for cid, base, changes, sec, comp, qual, why in CASES:
        release = copy.deepcopy(sample(base))
        for change in changes:
            change(release)
        release["id"] = f"rel-eval-{cid}"
        labels = {AGENTS["security"]: sec, AGENTS["compliance"]: comp, AGENTS["quality"]: qual}
        decision = "approved" if all(v == A for v in labels.values()) else "rejected"
        rows.append(
            {"id": cid, "data": release, "expected": {**labels, "decision": decision}, "why": why}
        )
    return rows


if __name__ == "__main__":
    OUT.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in build()))
    print(f"wrote {len(CASES)} cases to {OUT}")  # noqa: T201 (a script)
