"""Cedar policy files → one checked policy set, or an error naming the file and the line.

cedarpy reports a parse error as a bare message ("unexpected token `}`") and a validation error
by a positional policy id ("policy3"), without a position. So each file is cut into its
statements here (a small scanner that knows strings and `//` comments), each statement is
parsed and type-checked against the schema alone, and the line is found from there: the
statement's first line, or for a parse error the first line from which the statement's prefix
fails the same way. Every policy then gets an id that says where it is (`clinic.cedar:12`, or
`<@id> (clinic.cedar:12)`), which is what a decision names.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import cedarpy

from mesh.approvals import approver_role
from mesh.errors import ConfigError

SCHEMA_SUFFIX = ".cedarschema"
POLICY_SUFFIX = ".cedar"
ENTITIES_FILE = "entities.json"


class PolicyFileError(ConfigError):
    """A Cedar policy, schema or entities file that does not load: `where` is `file:line`."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(
            f"{where}: {problem}",
            hint="fix it and check it with `mesh authz check FILE`; a running mesh keeps the "
            "policies it had",
        )
        self.where = where
        self.problem = problem


@dataclass(frozen=True)
class Statement:
    text: str
    line: int  # 1-based line of its first character in its file


def statements(text: str) -> tuple[list[Statement], Statement | None]:
    """The `;`-terminated statements of a Cedar policy file, and what trails the last one
    unterminated (None when only blanks and comments do)."""
    found: list[Statement] = []
    depth = 0
    start = -1
    line = 1
    start_line = 1
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
        elif c == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif not c.isspace():
            if start < 0:
                start, start_line = i, line
            if c == '"':
                i += 1
                while i < n and text[i] != '"':
                    if text[i] == "\\":
                        i += 1
                    elif text[i] == "\n":
                        line += 1
                    i += 1
            elif c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif c == ";" and depth <= 0:
                found.append(Statement(text[start : i + 1], start_line))
                start, depth = -1, 0
        i += 1
    rest = Statement(text[start:], start_line) if start >= 0 else None
    return found, rest


def _parse_error(text: str) -> str | None:
    try:
        cedarpy.policies_to_json_str(text)
    except ValueError as e:
        return str(e) or "cannot be parsed"
    return None


def _error_line(stmt: Statement, error: str) -> int:
    """The line of `stmt` a parse error is on: the first line from which the statement, cut
    there and closed with `;`, fails with the same message (else the statement's first line)."""
    lines = stmt.text.split("\n")
    for k in range(len(lines)):
        if _parse_error("\n".join(lines[: k + 1]) + "\n;") == error:
            return stmt.line + k
    return stmt.line


def _named_line(stmt: Statement, error: str) -> int:
    """The line of `stmt` that holds the first `quoted` name in a validation error (an
    attribute, an entity type), else the statement's first line."""
    for name in re.findall(r"`([^`]+)`", error):
        if name.startswith("policy"):
            continue  # the positional id cedarpy made up, not in the text
        bare = name.rsplit("::", 1)[-1].strip('"')
        for k, text in enumerate(stmt.text.split("\n")):
            if re.search(rf"\b{re.escape(bare)}\b", text.split("//", 1)[0]):
                return stmt.line + k
    return stmt.line


@dataclass(frozen=True)
class Loaded:
    """A checked policy set and where it came from."""

    policies: cedarpy.PolicySet
    ids: tuple[str, ...]  # every policy's id, in file order: `<@id> (file:line)` or `file:line`
    entities: tuple[dict[str, object], ...]  # entities.json's (groups and memberships)
    sha256: str  # `digest` of the files
    files: tuple[str, ...]  # the schema, the policy files, entities.json


def load_schema(path: Path) -> cedarpy.Schema:
    text = _read(path)
    try:
        return cedarpy.Schema.from_str(text)
    except ValueError as e:
        problem = str(e)
        stmt = Statement(text, 1)
        line = _named_line(stmt, f"`{problem.rsplit(': ', 1)[-1]}`") if ": " in problem else 1
        if "parsing" in problem:
            # A syntax error: the first line from which the schema, cut there, fails the same.
            lines = text.split("\n")
            for k in range(len(lines)):
                try:
                    cedarpy.Schema.from_str("\n".join(lines[: k + 1]))
                except ValueError as cut:
                    if str(cut) == problem:
                        line = k + 1
                        break
        raise PolicyFileError(f"{path}:{line}", f"schema: {problem}") from None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyFileError(f"{path}:1", f"cannot read it: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise PolicyFileError(f"{path}:1", f"not UTF-8 text (byte {e.start})") from None


def check_file(path: Path, schema: cedarpy.Schema) -> list[tuple[str, dict[str, object]]]:
    """The policies of one `.cedar` file as (id, Cedar JSON policy), each parsed and
    type-checked against `schema`; PolicyFileError at the first one that is not right."""
    text = _read(path)
    found, rest = statements(text)
    if rest is not None:
        problem = _parse_error(rest.text) or "a policy must end with `;`"
        raise PolicyFileError(f"{path}:{_error_line(rest, problem)}", problem)
    out: list[tuple[str, dict[str, object]]] = []
    for stmt in found:
        error = _parse_error(stmt.text)
        if error is not None:
            raise PolicyFileError(f"{path}:{_error_line(stmt, error)}", error)
        _check_spelling(path, stmt)
        doc = json.loads(cedarpy.policies_to_json_str(stmt.text))
        if doc.get("templates"):
            raise PolicyFileError(
                f"{path}:{stmt.line}", "templates (?principal, ?resource) are not supported"
            )
        result = cedarpy.validate_policies(stmt.text, schema)
        if not result.validation_passed:
            problem = "; ".join(e.error for e in result.errors) or "does not validate"
            # cedarpy's positional id means nothing to the reader: the file and line do.
            problem = re.sub(r"for policy `policy\d+`, ", "", problem)
            raise PolicyFileError(f"{path}:{_named_line(stmt, problem)}", problem)
        for policy in doc.get("staticPolicies", {}).values():
            where = f"{path.name}:{stmt.line}"
            annotated = (policy.get("annotations") or {}).get("id")
            out.append((f"{annotated} ({where})" if annotated else where, policy))
    return out


# A group id, or the role an approval asks for, as a policy writes it.
_ROLE_LITERALS = re.compile(r'Group::"([^"\\]*)"|context\.role\s*==\s*"([^"\\]*)"')


def _check_spelling(path: Path, stmt: Statement) -> None:
    """Refuse a group or approval role spelled otherwise than the mesh spells roles
    (`mesh.approvals.approver_role`: `clinical-safety-officer`): every group id and role the
    mesh asks about is in that spelling, so such a policy could never match."""
    for m in _ROLE_LITERALS.finditer(stmt.text):
        written = m.group(1) if m.group(1) is not None else m.group(2)
        spelled = approver_role(written)
        if written != spelled:
            line = stmt.line + stmt.text.count("\n", 0, m.start())
            raise PolicyFileError(
                f"{path}:{line}",
                f"{written!r}: groups and approver roles are spelled {spelled!r} (lowercase, "
                "words joined by '-'), the one spelling the mesh asks about",
            )


def _spelled(entity: dict[str, object]) -> dict[str, object]:
    """An entities.json entry with its group ids (its own, its parents') in the one spelling."""

    def uid(ref: object) -> object:
        if isinstance(ref, dict) and str(ref.get("type", "")).endswith("::Group"):
            return {**ref, "id": approver_role(str(ref.get("id", "")))}
        return ref

    parents = entity.get("parents")
    return {
        **entity,
        "uid": uid(entity["uid"]),
        **({"parents": [uid(p) for p in parents]} if isinstance(parents, list) else {}),
    }


def load_entities(path: Path) -> tuple[dict[str, object], ...]:
    text = _read(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise PolicyFileError(f"{path}:{e.lineno}", f"not JSON: {e.msg}") from None
    if not isinstance(doc, list) or not all(isinstance(x, dict) and "uid" in x for x in doc):
        raise PolicyFileError(
            f"{path}:1", "must be a JSON list of Cedar entities, each with a `uid`"
        )
    try:
        cedarpy.Entities.from_json_str(text)
    except ValueError as e:
        raise PolicyFileError(f"{path}:1", f"Cedar entities: {e}") from None
    return tuple(_spelled(x) for x in doc)


def load(policy_files: list[Path], schema_path: Path, entities_path: Path | None = None) -> Loaded:
    """Every file checked, then one policy set; nothing of a set with one bad file."""
    schema = load_schema(schema_path)
    every = [schema_path, *policy_files, *([entities_path] if entities_path else [])]
    ids: list[str] = []
    static: dict[str, dict[str, object]] = {}
    for path in policy_files:
        for where, policy in check_file(path, schema):
            # The same @id at the same line of two files of one name: the path tells them apart.
            pid = f"{where} [{path}]" if where in static else where
            ids.append(pid)
            static[pid] = policy
    entities = load_entities(entities_path) if entities_path else ()
    est = {"staticPolicies": static, "templates": {}, "templateLinks": []}
    return Loaded(
        policies=cedarpy.PolicySet.from_json_str(json.dumps(est)),
        ids=tuple(ids),
        entities=entities,
        sha256=digest(every),
        files=tuple(str(p) for p in every),
    )


def digest(paths: list[Path]) -> str:
    """SHA-256 over each file's name and bytes, in order (the schema first, then the policies,
    then entities.json): what the audit trail records of a policy set, taken or refused."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        try:
            h.update(path.read_bytes())
        except OSError:
            h.update(b"\0missing")
    return h.hexdigest()
