"""The three reviewers' deterministic rules, the release model, and the sample releases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

import mesh.models
from agents import release as rel
from agents.compliance_review import rules as compliance
from agents.quality_review import rules as quality
from agents.security_review import rules as security
from mesh.verdict import Verdict

SAMPLES = Path(__file__).resolve().parents[2] / "agents" / "samples"

AWS_KEY = "AKIA4HXQ7ZP2LMN3RT5W"


@pytest.fixture(autouse=True)
def _no_model_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mesh.models, "ALLOW_MODEL_REQUESTS", False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)


def make(**overrides: Any) -> rel.ReleaseProposal:
    """A release every reviewer approves, with `overrides` applied (plain JSON values)."""
    data: dict[str, Any] = {
        "id": "rel-1",
        "service": "billing-api",
        "author": "alice",
        "changed_files": [
            {"path": "src/billing/tax.py", "diff": "@@ -1,1 +1,2 @@\n RATE = 1\n+ROUND = 2\n"},
            {"path": "tests/test_tax.py", "content": "def test_round():\n    assert True\n"},
        ],
        "tickets": [{"id": "CHG-1", "kind": "change"}],
        "approvals": [{"by": "bob", "role": "engineer"}],
        "tests": {"passed": True, "total": 10, "failed": 0},
        "region": "eu-west-1",
        "data_destinations": ["eu-west-1"],
    }
    data.update(overrides)
    return rel.to_release(data)


def with_file(path: str, *, content: str = "", diff: str = "", **more: Any) -> rel.ReleaseProposal:
    """The clean release plus one extra changed file."""
    base = make()
    extra = rel.ChangedFile(path=path, content=content, diff=diff)
    return make(
        changed_files=[msgspec.to_builtins(f) for f in [*base.changed_files, extra]], **more
    )


def assert_votes(verdict: Verdict, vote: str, *needles: str) -> None:
    assert verdict.vote == vote, verdict.reasons
    text = "\n".join(verdict.reasons)
    for needle in needles:
        assert needle in text, f"{needle!r} not in reasons: {verdict.reasons}"


# -- release model ------------------------------------------------------------------------------


def test_partial_payload_decodes_with_defaults_and_ignores_unknown_fields() -> None:
    r = rel.decode_release(b'{"id": "r1", "changed_files": [{"path": "a.py"}], "extra": 1}')
    assert r.service == "" and r.tests is None and r.region is None
    assert r.changed_files[0].content == "" and r.changed_files[0].size() is None
    assert r.tickets == [] and r.dependencies_added == []


def test_ticket_kind_is_any_string_but_a_string() -> None:
    # Issue 13: a kind the reviewers do not know ("wish") must not make the release undecodable.
    r = rel.to_release({"id": "r1", "tickets": [{"id": "T-1", "kind": "wish"}]})
    assert r.tickets[0].kind == "wish" and not r.has_ticket("change")
    with pytest.raises(msgspec.ValidationError, match="kind"):
        rel.to_release({"id": "r1", "tickets": [{"id": "T-1", "kind": 7}]})


def test_changed_lines_follow_hunk_numbers_and_skip_headers() -> None:
    f = rel.ChangedFile(
        path="a.sql",
        diff="--- a/a.sql\n+++ b/a.sql\n@@ -10,3 +20,3 @@\n keep\n-old\n--- gone comment\n+new\n",
    )
    assert list(f.changed_lines()) == [
        (11, "-", "old"),
        (12, "-", "-- gone comment"),
        (21, "+", "new"),
    ]
    assert f.size() == 3


def test_size_prefers_producer_counts_then_diff_then_content() -> None:
    assert rel.ChangedFile("a.py", diff="+x\n+y\n", lines_added=5, lines_removed=1).size() == 6
    assert rel.ChangedFile("a.py", diff="+x\n-y\n z\n").size() == 2
    assert rel.ChangedFile("a.py", content="a\nb\nc\n").size() == 3


# -- security -----------------------------------------------------------------------------------


def test_security_approves_clean_release() -> None:
    assert_votes(security.review(make()), "approve", "no secrets", "no auth/crypto")


def test_aws_key_in_added_diff_line_rejects_and_is_redacted() -> None:
    diff = f'@@ -1,1 +1,2 @@\n import boto3\n+KEY_ID = "{AWS_KEY}"\n'
    verdict = security.review(with_file("src/export.py", diff=diff))
    assert_votes(verdict, "reject", "src/export.py:2", "AWS access key id", "AKIA…RT5W")
    assert all(AWS_KEY not in r for r in verdict.reasons), "the secret must not be echoed"
    assert len(verdict.reasons) == 1, "one secret, one reason (not again as a generic credential)"


def test_secret_only_in_removed_line_is_not_a_finding() -> None:
    diff = f'@@ -1,2 +1,1 @@\n import boto3\n-KEY_ID = "{AWS_KEY}"\n'
    assert security.review(with_file("src/export.py", diff=diff)).vote == "approve"


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("-----BEGIN RSA PRIVATE KEY-----", "private key"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "private key"),
        ("GH = 'ghp_" + "a1B2" * 9 + "'", "GitHub token"),
        ("GH = 'github_pat_11ABCDEFG0123456789_abcdefghijKLMNOP'", "GitHub token"),
        ("KEY = 'sk-ant-api03-" + "x7Y" * 10 + "'", "Anthropic API key"),
        ('db_password = "Tr0ub4dor&3"', "hard-coded credential"),
        ('API_KEY: str = "9f8e7d6c5b4a"', "hard-coded credential"),
        ('headers = {"token": "e3b0c44298fc1c14"}', "hard-coded credential"),
    ],
)
def test_secret_patterns_reject(line: str, kind: str) -> None:
    verdict = security.review(with_file("src/cfg.py", content=f"X = 1\n{line}\n"))
    assert_votes(verdict, "reject", f"src/cfg.py:2: {kind}")


@pytest.mark.parametrize(
    "line",
    [
        'api_key = os.environ["API_KEY"]',  # read from the environment, not a literal
        'api_key = "short"',  # under 8 characters
        'api_key = "changeme-please"',  # placeholder
        'api_key = "${API_KEY}"',  # template
        'api_key = "xxxxxxxxxxxx"',  # repeated filler
        'model_name = "AKIA-not-a-key"',
    ],
)
def test_non_secrets_do_not_reject(line: str) -> None:
    verdict = security.review(with_file("src/cfg.py", content=f"{line}\n"))
    assert verdict.vote == "approve", verdict.reasons


@pytest.mark.parametrize(
    ("dep", "needle"),
    [
        ({"name": "httpx", "version": ""}, "no version pinned"),
        ({"name": "httpx"}, "no version pinned"),
        ({"name": "httpx", "version": ">=0.27"}, "not an exact pin"),
        ({"name": "httpx", "version": "~=0.27.0"}, "not an exact pin"),
        ({"name": "left-pad", "version": "^1.3.0", "source": "npm"}, "not an exact pin"),
        ({"name": "left-pad", "version": "1.3.x", "source": "npm"}, "not an exact pin"),
        ({"name": "left-pad", "version": "*", "source": "npm"}, "not an exact pin"),
        ({"name": "httpx", "version": "latest"}, "not an exact pin"),
        ({"name": "internal", "version": "1.0.0", "source": "git"}, "source 'git'"),
        ({"name": "reqeusts", "version": "2.31.0"}, "typosquat"),
        ({"name": "Python3_Dateutil", "version": "2.8.2"}, "typosquat"),
        ({"name": "colourama", "version": "0.4.6"}, "typosquat"),
    ],
)
def test_risky_dependencies_reject(dep: dict[str, str], needle: str) -> None:
    verdict = security.review(make(dependencies_added=[dep]))
    assert_votes(verdict, "reject", f"dependency {dep['name']}", needle)


@pytest.mark.parametrize("version", ["2.31.0", "==2.31.0", "2.9.0.post0", "1.0.0-beta.1", "v3.2"])
def test_pinned_dependencies_pass(version: str) -> None:
    verdict = security.review(make(dependencies_added=[{"name": "requests", "version": version}]))
    assert verdict.vote == "approve", verdict.reasons


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("src/app/auth/views.py", "def index():\n    return 1\n"),
        ("src/app/session_store.py", "X = 1\n"),
        ("src/app/api.py", "claims = jwt.decode(raw, KEY, algorithms=['HS256'])\n"),
        ("src/app/users.py", "if not check_password(user, given):\n    raise Denied\n"),
        ("src/app/vault.py", "box = Fernet(key).encrypt(data)\n"),
    ],
)
def test_auth_or_crypto_change_needs_security_ticket(path: str, text: str) -> None:
    assert_votes(security.review(with_file(path, content=text)), "reject", path, "security ticket")
    tickets = [{"id": "CHG-1", "kind": "change"}, {"id": "SEC-9", "kind": "security"}]
    verdict = security.review(with_file(path, content=text, tickets=tickets))
    assert_votes(verdict, "approve", f"auth/crypto code in {path} covered")


def test_author_and_tokenizer_are_not_auth_code() -> None:
    verdict = security.review(
        with_file("src/docs/author_tokenizer.py", content="db.session.add(x)\n")
    )
    assert verdict.vote == "approve", verdict.reasons


def test_security_abstains_when_no_file_can_be_scanned() -> None:
    verdict = security.review(make(changed_files=[{"path": "src/a.py"}, {"path": "src/b.py"}]))
    assert_votes(verdict, "abstain", "cannot scan", "src/a.py")


def test_security_still_rejects_unscannable_release_with_other_findings() -> None:
    r = make(changed_files=[{"path": "src/login.py"}])
    assert_votes(security.review(r), "reject", "src/login.py", "security ticket")


def test_security_approves_empty_release() -> None:
    assert security.review(rel.to_release({"id": "r"})).vote == "approve"


# -- compliance ---------------------------------------------------------------------------------

PHI = "class Patient(msgspec.Struct):\n    mrn: str\n    dateOfBirth: date\n    diagnosis: str\n"


def test_compliance_approves_clean_release() -> None:
    assert_votes(compliance.review(make()), "approve", "no personal/health data", "change ticket")


def test_health_fields_without_privacy_review_reject_naming_fields() -> None:
    verdict = compliance.review(with_file("src/records.py", content=PHI))
    assert_votes(
        verdict,
        "reject",
        "src/records.py",
        "date_of_birth",
        "diagnosis",
        "medical_record",
        "a privacy ticket",
        "a privacy/DPO approval",
    )


def test_privacy_ticket_alone_is_not_enough() -> None:
    tickets = [{"id": "CHG-1", "kind": "change"}, {"id": "PRIV-2", "kind": "privacy"}]
    verdict = compliance.review(with_file("src/records.py", content=PHI, tickets=tickets))
    assert_votes(verdict, "reject", "a privacy/DPO approval")
    assert "a privacy ticket" not in "\n".join(verdict.reasons)


@pytest.mark.parametrize("role", ["privacy", "DPO"])
def test_privacy_ticket_and_privacy_approval_pass(role: str) -> None:
    verdict = compliance.review(
        with_file(
            "src/records.py",
            content=PHI,
            tickets=[{"id": "CHG-1", "kind": "change"}, {"id": "PRIV-2", "kind": "privacy"}],
            approvals=[{"by": "bob", "role": "engineer"}, {"by": "pia", "role": role}],
        )
    )
    assert_votes(verdict, "approve", "covered by privacy review")


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("ssn = row['SSN']", "ssn"),
        ("record.icd10_code", "icd10"),
        ("PATIENT_NAME = 'x'", "patient_name"),
        ("user.email, user.phone_number", "email+phone"),
        ("medicalRecordNumber", "medical_record"),
    ],
)
def test_sensitive_field_spellings(text: str, field: str) -> None:
    assert field in compliance.sensitive_fields(rel.ChangedFile("src/x.py", content=text))


@pytest.mark.parametrize(
    "text", ["user.email = 'x'", "adobe_dobby = 1", "diagnostics_enabled = True"]
)
def test_non_sensitive_text(text: str) -> None:
    assert compliance.sensitive_fields(rel.ChangedFile("src/x.py", content=text)) == []


def test_missing_change_ticket_rejects() -> None:
    verdict = compliance.review(make(tickets=[{"id": "BUG-1", "kind": "bug"}]))
    assert_votes(verdict, "reject", "no change ticket")


def test_no_approval_rejects() -> None:
    assert_votes(compliance.review(make(approvals=[])), "reject", "no approval")


def test_self_approval_rejects_but_author_plus_reviewer_passes() -> None:
    verdict = compliance.review(make(approvals=[{"by": "Alice", "role": "engineer"}]))
    assert_votes(verdict, "reject", "self-approval")
    both = [{"by": "alice"}, {"by": "bob"}]
    assert compliance.review(make(approvals=both)).vote == "approve"


def test_data_outside_allowed_regions_rejects() -> None:
    verdict = compliance.review(
        make(region="us-east-1", data_destinations=["eu-west-1", "ap-south-1"])
    )
    assert_votes(verdict, "reject", "region 'us-east-1'", "data destination 'ap-south-1'")
    assert "'eu-west-1'" not in "\n".join(verdict.reasons)


def test_allowed_regions_are_a_policy_input() -> None:
    r = make(region="us-east-1", data_destinations=[])
    assert compliance.review(r, allowed_regions={"us-east-1"}).vote == "approve"
    assert compliance.review(r).vote == "reject"  # the configured default: EU regions only


def test_a_ticket_kind_the_reviewers_do_not_know_is_carried() -> None:
    # A tracker with kinds of its own must not make the release undecodable for every reviewer.
    r = make(tickets=[{"id": "CHG-1", "kind": "change"}, {"id": "INC-9", "kind": "incident"}])
    assert [t.kind for t in r.tickets] == ["change", "incident"]
    for reviewer in (compliance, quality, security):
        assert reviewer.review(r).vote == "approve", reviewer


# -- quality ------------------------------------------------------------------------------------


def test_quality_approves_clean_release() -> None:
    assert_votes(quality.review(make()), "approve", "1 source file(s) changed with 1 test")


def test_source_change_without_test_change_rejects() -> None:
    r = make(changed_files=[{"path": "src/billing/tax.py", "diff": "+x = 1\n"}])
    assert_votes(quality.review(r), "reject", "without any test change: src/billing/tax.py")


@pytest.mark.parametrize(
    "test_path",
    ["tests/test_tax.py", "pkg/tax_test.go", "web/tax.test.ts", "web/Tax.spec.js", "TaxTest.java"],
)
def test_test_file_naming_conventions(test_path: str) -> None:
    assert quality.is_test(test_path)
    r = make(
        changed_files=[{"path": "src/tax.py", "diff": "+x\n"}, {"path": test_path, "diff": "+y\n"}]
    )
    assert quality.review(r).vote == "approve"


def test_docs_only_change_needs_neither_tests_nor_report() -> None:
    r = make(
        changed_files=[
            {"path": "README.md", "diff": "+typo\n"},
            {"path": "docs/a.rst", "diff": "+b\n"},
        ],
        tests=None,
    )
    assert_votes(quality.review(r), "approve", "docs-only")


def test_config_change_needs_no_test_file_but_a_report() -> None:
    r = make(changed_files=[{"path": "deploy/values.yaml", "diff": "+replicas: 3\n"}])
    assert quality.review(r).vote == "approve"
    assert_votes(
        quality.review(make(changed_files=r.changed_files, tests=None)), "reject", "no test report"
    )


def test_missing_test_report_rejects() -> None:
    assert_votes(quality.review(make(tests=None)), "reject", "no test report")


def test_failed_tests_reject() -> None:
    verdict = quality.review(make(tests={"passed": False, "total": 50, "failed": 3}))
    assert_votes(verdict, "reject", "3 of 50 tests failed")


def test_run_not_passing_rejects_even_with_zero_failures() -> None:
    verdict = quality.review(make(tests={"passed": False, "total": 50, "failed": 0}))
    assert_votes(verdict, "reject", "did not pass")


def test_size_limit_from_counts() -> None:
    files = [
        {"path": "src/big.py", "lines_added": 900, "lines_removed": 50},
        {"path": "tests/test_big.py", "lines_added": 51},
    ]
    assert_votes(
        quality.review(make(changed_files=files)),
        "reject",
        "1001 lines changed",
        "src/big.py (950)",
    )
    files[1]["lines_added"] = 50
    assert_votes(quality.review(make(changed_files=files)), "approve", "1000 lines changed")


def test_size_counted_from_diff_and_content_when_counts_are_zero() -> None:
    diff = "@@ -1,600 +1,600 @@\n" + "-old\n" * 600 + "+new\n" * 600
    files = [{"path": "src/big.py", "diff": diff}, {"path": "tests/test_big.py", "content": "x\n"}]
    assert_votes(quality.review(make(changed_files=files)), "reject", "1201 lines changed")


def test_quality_abstains_when_size_is_unknowable() -> None:
    files = [{"path": "src/a.py"}, {"path": "tests/test_a.py"}]
    assert_votes(quality.review(make(changed_files=files)), "abstain", "cannot check change size")


def test_unknown_sizes_next_to_known_ones_are_listed() -> None:
    files = [
        {"path": "src/a.py", "diff": "+x\n"},
        {"path": "tests/test_a.py"},
        {"path": "logo.png"},
    ]
    assert_votes(
        quality.review(make(changed_files=files)),
        "approve",
        "size unknown for: tests/test_a.py, logo.png",
    )


# -- samples ------------------------------------------------------------------------------------

EXPECTED = {
    "release_clean.json": ("approve", "approve", "approve"),
    "release_secret.json": ("reject", "approve", "approve"),
    "release_phi.json": ("approve", "reject", "approve"),
    "release_untested.json": ("approve", "approve", "reject"),
}


def test_every_sample_has_an_expectation() -> None:
    assert sorted(p.name for p in SAMPLES.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_verdicts(name: str) -> None:
    release = rel.decode_release((SAMPLES / name).read_bytes())
    votes = (
        security.review(release).vote,
        compliance.review(release).vote,
        quality.review(release).vote,
    )
    assert votes == EXPECTED[name]


def test_sample_rejections_name_the_problem() -> None:
    def load(name: str) -> rel.ReleaseProposal:
        return rel.decode_release((SAMPLES / name).read_bytes())

    assert_votes(
        security.review(load("release_secret.json")), "reject", "src/billing/export.py", "AWS"
    )
    assert_votes(
        compliance.review(load("release_phi.json")),
        "reject",
        "src/portal/records/summary.py",
        "date_of_birth",
        "diagnosis",
    )
    assert_votes(
        quality.review(load("release_untested.json")),
        "reject",
        "without any test change",
        "2 of 388 tests failed",
    )
