"""Deterministic quality review of a release proposal.

Checks, each finding one reason:

1. Tests change with the code: if any source file (by extension, see `SOURCE_EXTENSIONS`)
   changes, at least one test file must change too. Docs and config files alone need no tests.
2. A passing test report: no report → finding, `passed` false or `failed` > 0 → finding. A
   docs-only release (every changed file is documentation, no dependency added) needs no report.
3. Change size: lines added + removed over all files must not exceed the rules file's
   `quality.max_changed_lines` (agents/rules.toml: 1000 by default; see `agents/domain_rules.py`),
   counted from the diff or content when the producer sent no counts.

No findings → approve. Abstain only when the size check is impossible because no changed file
carries counts, a diff or content (and nothing else was found); files of unknown size among
others of known size are listed in the approval instead.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from agents.domain_rules import domain_rules
from agents.release import ReleaseProposal
from mesh.verdict import Verdict

SOURCE_EXTENSIONS = frozenset(
    {
        ".py", ".pyx", ".js", ".jsx", ".mjs", ".ts", ".tsx", ".go", ".java", ".kt", ".scala",
        ".rb", ".rs", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".php", ".swift", ".sql", ".sh",
    }
)  # fmt: skip
DOC_EXTENSIONS = frozenset({".md", ".rst", ".txt", ".adoc"})
_DOC_NAMES = re.compile(r"^(?:readme|changelog|changes|license|licence|notice|authors)(?:\..*)?$")

# Test files by directory (`tests/`, `test/`, `__tests__/`, `spec/`) or by name (`test_x.py`,
# `x_test.go`, `x.test.ts`, `x.spec.js`, `XTest.java`, `conftest.py`).
_TEST_DIR = re.compile(r"(?:^|/)(?:tests?|__tests__|spec|specs)/")
_TEST_NAME = re.compile(
    r"(?:^test_.*|.*_test\.\w+|.*\.(?:test|spec)\.\w+|.*Tests?\.(?:java|kt|cs|scala)|conftest\.py)$"
)


def is_test(path: str) -> bool:
    return bool(_TEST_DIR.search(path) or _TEST_NAME.match(PurePosixPath(path).name))


def is_doc(path: str) -> bool:
    p = PurePosixPath(path)
    return (
        p.suffix.lower() in DOC_EXTENSIONS
        or path.startswith("docs/")
        or "/docs/" in path
        or bool(_DOC_NAMES.match(p.name.lower()))
    )


def is_source(path: str) -> bool:
    return PurePosixPath(path).suffix.lower() in SOURCE_EXTENSIONS and not is_test(path)


def review(release: ReleaseProposal) -> Verdict:
    max_lines = domain_rules().quality.max_changed_lines
    findings: list[str] = []
    paths = [f.path for f in release.changed_files]

    sources = [p for p in paths if is_source(p) and not is_doc(p)]
    tests_changed = [p for p in paths if is_test(p)]
    if sources and not tests_changed:
        findings.append(
            f"source changed without any test change: {', '.join(sources[:5])}"
            + (f" (+{len(sources) - 5} more)" if len(sources) > 5 else "")
        )

    docs_only = bool(paths) and all(is_doc(p) for p in paths) and not release.dependencies_added
    report = release.tests
    if report is None:
        if not docs_only:
            findings.append("no test report attached to the release")
    elif report.failed > 0:
        total = f" of {report.total}" if report.total else ""
        findings.append(f"{report.failed}{total} tests failed")
    elif not report.passed:
        findings.append("test report says the run did not pass")

    sizes = {f.path: f.size() for f in release.changed_files}
    known = {p: n for p, n in sizes.items() if n is not None}
    unknown = [p for p, n in sizes.items() if n is None]
    total_lines = sum(known.values())
    if total_lines > max_lines:
        largest = sorted(known.items(), key=lambda kv: kv[1], reverse=True)[:3]
        findings.append(
            f"change too large: {total_lines} lines changed (limit {max_lines}); "
            f"largest: {', '.join(f'{p} ({n})' for p, n in largest)}"
        )

    if findings:
        return Verdict.reject(*findings)

    if paths and not known:
        return Verdict.abstain(
            "cannot check change size: no changed file has line counts, a diff or content"
        )

    summary = [
        (
            "docs-only change"
            if docs_only
            else f"{len(sources)} source file(s) changed with {len(tests_changed)} test file(s)"
        ),
        (
            f"tests passed ({report.total} run)"
            if report is not None
            else "no test report needed for docs"
        ),
        f"{total_lines} lines changed (limit {max_lines})",
    ]
    if unknown:
        summary.append(f"size unknown for: {', '.join(unknown)}")
    return Verdict.approve(*summary)
