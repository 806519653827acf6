"""Deterministic security review of a release proposal.

Three checks, each finding one reason:

1. Secrets in what the release ships: the added lines of each diff, or the whole `content` when a
   file has no diff. Removed lines are not scanned — deleting a leaked key is the fix, not the
   leak. Matches are redacted in the reasons so a verdict never re-publishes the secret.
2. Dependencies: unpinned or ranged versions, sources other than the rules file's
   `security.allowed_sources`, and names on its `security.known_bad_packages` denylist (see
   `agents/domain_rules.py`; agents/rules.toml holds the defaults).
3. Auth or crypto code touched (by path or by changed text) without a ticket of kind `security`.

Any finding → reject. No finding → approve with a summary of what was checked. Abstain only when
the release changes files but none of them carries content or a diff, so the secret scan cannot
run at all and nothing else was found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agents.domain_rules import domain_rules
from agents.release import ChangedFile, Dependency, ReleaseProposal
from mesh.verdict import Verdict


@dataclass(frozen=True)
class SecretPattern:
    kind: str
    regex: re.Pattern[str]
    group: int = 0  # the group holding the secret itself (for redaction and de-duplication)


SECRET_PATTERNS: tuple[SecretPattern, ...] = (
    SecretPattern(
        "AWS access key id", re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])")
    ),
    SecretPattern(
        "private key",
        re.compile(
            r"-----BEGIN (?:(?:RSA|EC|DSA|OPENSSH|ENCRYPTED|PGP) )?PRIVATE KEY(?: BLOCK)?-----"
        ),
    ),
    SecretPattern("GitHub token", re.compile(r"(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{36,}")),
    SecretPattern("GitHub token", re.compile(r"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{22,}")),
    SecretPattern("Anthropic API key", re.compile(r"(?<![A-Za-z0-9_])sk-ant-[A-Za-z0-9_\-]{20,}")),
    # `db_password = "…"`, `API_KEY: str = '…'`, `"token": "…"` with a literal of 8+ characters.
    # Values read from the environment (`os.environ[...]`) are not literals and do not match.
    SecretPattern(
        "hard-coded credential",
        re.compile(
            r"""(?ix)
            (?<![A-Za-z0-9])
            [A-Za-z0-9_]*(?:password|passwd|secret|api[_-]?key|access[_-]?key|token)[A-Za-z0-9_]*
            ["']?                                   # closing quote of a dict key
            (?:\s*:\s*[A-Za-z_][\w\[\]|. ]*?)?      # optional type annotation
            \s*(?:=|:|=>)\s*
            (["'])([^"'\s]{8,})\1
            """
        ),
        group=2,
    ),
)

# Literals that are obviously not real secrets: templates, placeholders, documentation values.
_PLACEHOLDER = re.compile(
    r"(?i)^(?:\$\{.*\}|\{\{.*\}\}|<.*>|%\(.*\)s|.*(?:example|changeme|change_me|placeholder|dummy"
    r"|redacted|your[_-]).*|(.)\1+)$"
)

# An exact version: `1.2.3`, `==1.2.3`, `=1.2.3`, `v1.2.3`, `2.9.0.post0`, `1.0.0-beta.1`,
# `1.2.3+local`. Ranges (`>=`, `~=`, `^`, `~`, `*`, `1.2.x`, `||`) and tags (`latest`) are not.
_PINNED = re.compile(
    r"^(?:===?|=)?\s*v?\d+(?:\.\d+)*"
    r"(?:[.-]?(?:a|b|c|rc|alpha|beta|pre|preview|post|dev)\.?\d*)*"
    r"(?:\+[A-Za-z0-9.]+)?$",
    re.IGNORECASE,
)

# Path segments that mark authentication, session or cryptography code.
AUTH_PATH_WORDS = frozenset(
    {
        "auth", "authn", "authz", "authentication", "authorization", "login", "logout", "signin",
        "session", "sessions", "crypto", "cryptography", "jwt", "jwks", "oauth", "oauth2", "oidc",
        "saml", "password", "passwords", "passwd", "cipher", "ciphers", "encryption", "decryption",
        "hmac", "rbac", "permissions", "credentials", "mfa", "totp",
    }
)  # fmt: skip

# Words in changed lines that mark auth/crypto code. Bounded by non-letters so `check_password`
# and `jwt.decode` match but `author` or `tokenizer` do not. Plain `session` is left out on
# purpose: database sessions are everywhere and are not auth code.
_AUTH_TEXT = re.compile(
    r"(?i)(?<![a-z])("
    r"authenticat\w*|authoriz\w*|login|logout|passw(?:or)?ds?|jwt|oauth2?|oidc|saml"
    r"|ciphers?|encrypt\w*|decrypt\w*|hmac|bcrypt|scrypt|argon2|hashlib|cryptography|fernet"
    r"|private_key|csrf|set_cookie|session_cookie"
    r")(?![a-z])"
)


def _redact(secret: str) -> str:
    if len(secret) <= 12:
        return secret[:2] + "…"
    return f"{secret[:4]}…{secret[-4:]}"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def find_secrets(changed: ChangedFile) -> list[str]:
    """One reason per distinct secret in the lines `changed` adds."""
    reasons: list[str] = []
    seen: set[str] = set()
    for line_no, text in changed.added_lines():
        for pattern in SECRET_PATTERNS:
            for match in pattern.regex.finditer(text):
                secret = match.group(pattern.group)
                if pattern.group and _PLACEHOLDER.match(secret):
                    continue
                # Patterns run most specific first, so `AWS_ACCESS_KEY_ID = "AKIA…"` is reported
                # once, as an AWS key, not again as a generic credential.
                if secret in seen:
                    continue
                seen.add(secret)
                shown = "" if pattern.kind == "private key" else f" ({_redact(secret)})"
                reasons.append(f"{changed.path}:{line_no}: {pattern.kind}{shown} in the change")
    return reasons


def dependency_findings(dep: Dependency) -> list[str]:
    reasons: list[str] = []
    rules = domain_rules().security
    label = f"dependency {dep.name}" + (f" {dep.version}" if dep.version else "")
    if _normalise(dep.name) in {_normalise(n) for n in rules.known_bad_packages}:
        reasons.append(f"{label}: known malicious or typosquat package name")
    version = dep.version.strip()
    if not version:
        reasons.append(f"{label}: no version pinned")
    elif not _PINNED.match(version):
        reasons.append(f"{label}: version '{version}' is a range or tag, not an exact pin")
    sources = {s.strip().lower() for s in rules.allowed_sources}
    if dep.source.strip().lower() not in sources:
        allowed = "/".join(sorted(sources))
        reasons.append(f"{label}: source '{dep.source}' is not an audited registry ({allowed})")
    return reasons


def auth_markers(changed: ChangedFile) -> list[str]:
    """Why `changed` counts as auth/crypto code (path words first, then words in the change)."""
    segments = [s for s in re.split(r"[^a-z0-9]+", changed.path.lower()) if s]
    markers = [s for s in segments if s in AUTH_PATH_WORDS]
    for match in _AUTH_TEXT.finditer(changed.changed_text()):
        word = match.group(1).lower()
        if word not in markers:
            markers.append(word)
    return markers


def review(release: ReleaseProposal) -> Verdict:
    findings: list[str] = []

    scanned = [f for f in release.changed_files if f.has_text()]
    for changed in scanned:
        findings.extend(find_secrets(changed))

    for dep in release.dependencies_added:
        findings.extend(dependency_findings(dep))

    auth_files: list[str] = []
    for changed in release.changed_files:
        markers = auth_markers(changed)
        if markers:
            auth_files.append(changed.path)
            if not release.has_ticket("security"):
                findings.append(
                    f"{changed.path}: auth/crypto code touched ({', '.join(markers[:4])}) "
                    "without a security ticket"
                )

    if findings:
        return Verdict.reject(*findings)

    unscanned = [f.path for f in release.changed_files if not f.has_text()]
    if release.changed_files and not scanned:
        # Paths alone cannot tell whether a key was committed; refusing to guess either way.
        return Verdict.abstain(
            "cannot scan for secrets: no changed file carries content or a diff "
            f"({', '.join(unscanned[:5])})"
        )

    summary = [
        f"no secrets in {len(scanned)} changed file(s) ({len(SECRET_PATTERNS)} patterns)",
        (
            f"{len(release.dependencies_added)} added dependency(ies) pinned, from audited "
            "sources, not on the denylist"
            if release.dependencies_added
            else "no dependencies added"
        ),
        (
            f"auth/crypto code in {', '.join(auth_files)} covered by a security ticket"
            if auth_files
            else "no auth/crypto code touched"
        ),
    ]
    if unscanned:
        summary.append(f"not scanned (no content or diff): {', '.join(unscanned)}")
    return Verdict.approve(*summary)
