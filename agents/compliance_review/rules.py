"""Deterministic compliance review of a release proposal.

Checks, each finding one reason:

1. Personal or health data fields handled (in a changed file's path or changed lines) without a
   privacy review, i.e. without BOTH a ticket of kind `privacy` and an approval by someone whose
   role is one of the rules file's `compliance.privacy_roles`. One reason per file, naming the
   fields.
2. Change control: a ticket of kind `change` must exist, and someone other than the author must
   have approved (no approvals, or only the author's own, is a finding).
3. Data residency: `region` and every entry of `data_destinations` must be in the allowed set
   (the rules file's `compliance.allowed_regions` unless the caller passes its own; see
   `agents/domain_rules.py`).

Every check works on metadata that is always present or on whatever text the release carries, so
this reviewer never abstains: no findings → approve, any finding → reject.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from agents.domain_rules import domain_rules
from agents.release import ChangedFile, ReleaseProposal
from mesh.verdict import Verdict

# Field names of special-category (health) and directly identifying personal data. Matched on
# text normalised to snake_case, so `dateOfBirth`, `DATE_OF_BIRTH` and `date_of_birth` all hit.
SENSITIVE_FIELDS: dict[str, str] = {
    "ssn": r"ssn|social_security(?:_number)?",
    "date_of_birth": r"date_of_birth|dob|birth_?date",
    "diagnosis": r"diagnos[ie]s",
    "medical_record": r"mrn|medical_record(?:_number|_no)?|health_record",
    "patient_name": r"patient_(?:full_)?name",
    "icd10": r"icd_?10(?:_code)?",
    "prescription": r"prescriptions?|medications?",
    "national_id": r"national_id|passport_(?:number|no)|nhs_number|tax_id",
}
_FIELD_RES = {
    name: re.compile(rf"(?<![a-z0-9])(?:{alts})(?![a-z0-9])")
    for name, alts in SENSITIVE_FIELDS.items()
}
# Contact data on its own is common; a record carrying both email and phone identifies a person.
_EMAIL = re.compile(r"(?<![a-z0-9])e_?mail(?:_address)?(?![a-z0-9])")
_PHONE = re.compile(r"(?<![a-z0-9])(?:phone|mobile|telephone)(?:_number|_no)?(?![a-z0-9])")

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _snake(text: str) -> str:
    return _CAMEL.sub("_", text).lower()


def sensitive_fields(changed: ChangedFile) -> list[str]:
    """Personal/health field names found in the file's path or changed lines."""
    text = _snake(changed.path) + "\n" + _snake(changed.changed_text())
    found = [name for name, regex in _FIELD_RES.items() if regex.search(text)]
    if _EMAIL.search(text) and _PHONE.search(text):
        found.append("email+phone")
    return found


def _privacy_review_gaps(release: ReleaseProposal, privacy_roles: frozenset[str]) -> list[str]:
    missing: list[str] = []
    if not release.has_ticket("privacy"):
        missing.append("a privacy ticket")
    if not any(a.role.strip().lower() in privacy_roles for a in release.approvals):
        missing.append("a privacy/DPO approval")
    return missing


def _residency_summary(release: ReleaseProposal, allowed_text: str) -> str:
    places = ([f"region {release.region}"] if release.region else []) + [
        f"destination {d}" for d in release.data_destinations
    ]
    if not places:
        return "no region or data destination declared"
    return f"{', '.join(places)} within the allowed regions ({allowed_text})"


def review(release: ReleaseProposal, *, allowed_regions: Iterable[str] | None = None) -> Verdict:
    rules = domain_rules().compliance
    allowed = frozenset(rules.allowed_regions if allowed_regions is None else allowed_regions)
    privacy_roles = frozenset(r.strip().lower() for r in rules.privacy_roles)
    findings: list[str] = []

    gaps = _privacy_review_gaps(release, privacy_roles)
    personal_files: list[str] = []
    for changed in release.changed_files:
        fields = sensitive_fields(changed)
        if not fields:
            continue
        personal_files.append(changed.path)
        if gaps:
            findings.append(
                f"{changed.path}: handles personal/health data ({', '.join(fields)}) "
                f"without {' and '.join(gaps)}"
            )

    if not release.has_ticket("change"):
        findings.append("no change ticket (a ticket of kind 'change' is required)")

    author = release.author.strip().lower()
    approvers = {a.by.strip().lower() for a in release.approvals if a.by.strip()}
    if not approvers:
        findings.append("no approval recorded")
    elif author and approvers == {author}:
        findings.append(f"only approval is by the author ({release.author}): self-approval")

    allowed_text = ", ".join(sorted(allowed))
    if release.region and release.region not in allowed:
        findings.append(
            f"region '{release.region}' is outside the allowed regions ({allowed_text})"
        )
    for dest in release.data_destinations:
        if dest not in allowed:
            findings.append(
                f"data destination '{dest}' is outside the allowed regions ({allowed_text})"
            )

    if findings:
        return Verdict.reject(*findings)

    return Verdict.approve(
        (
            f"personal/health data in {', '.join(personal_files)} covered by privacy review"
            if personal_files
            else f"no personal/health data fields in {len(release.changed_files)} changed file(s)"
        ),
        "change ticket present; approved by someone other than the author",
        _residency_summary(release, allowed_text),
    )
