"""Masking before the model: declared fields and detectors, replaced by placeholders that the
model sees instead of the values, and put back into the model's answer.

    r = Redactor(fields=["$.author.email", "$.patients[*].name"], detectors=["email", "iban"])
    masked = r.mask(payload)          # what leaves the process: "[[EMAIL_1]]" etc.
    answer = masked.restore(answer)   # placeholders in the model's answer → the values again

A declared field (a JSON path: `$`, `.name`, `[n]`, `[*]`) is masked whole, whatever it holds.
Detectors scan every string of the payload: `email`, `phone`, `iban`, `card` (Luhn-checked),
`aws_key` (access key ids and secret keys). The same value gets the same placeholder within one
payload, so the model can still tell that two fields are the same person.

What was masked is counted (`mesh.redactions`, by agent and kind); the values are never logged
and never leave this object: a `Masked` keeps them in memory for one call only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mesh import telemetry
from mesh.errors import ConfigError


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = int(ch)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _iban_ok(text: str) -> bool:
    s = text.replace(" ", "").upper()
    moved = s[4:] + s[:4]
    try:
        return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1
    except ValueError:
        return False


@dataclass(frozen=True)
class Detector:
    kind: str
    pattern: re.Pattern[str]
    check: Callable[[str], bool] = lambda _: True


DETECTORS: tuple[Detector, ...] = (
    Detector("email", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")),
    # Card numbers before phones: a card's digit groups would also read as a phone number.
    Detector(
        "card",
        re.compile(r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)"),
        lambda s: _luhn(re.sub(r"\D", "", s)),
    ),
    Detector(
        "iban",
        re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
        _iban_ok,
    ),
    # International or grouped numbers of 8-15 digits; one plain long integer is left alone.
    Detector(
        "phone",
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?"
            r"\d{2,4}(?:[ .-]\d{2,4}){2,4}(?!\w)"
        ),
        lambda s: 8 <= sum(c.isdigit() for c in s) <= 15,
    ),
    Detector("aws_key", re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")),
    # A secret key is 40 base64-ish characters: only taken next to its usual name.
    Detector(
        "aws_key",
        re.compile(r"(?i)(?<=aws_secret_access_key)[\"' :=]{1,4}[A-Za-z0-9/+=]{40}"),
    ),
)
DETECTOR_KINDS = frozenset(d.kind for d in DETECTORS)

_PLACEHOLDER = re.compile(r"\[\[([A-Z_]+)_(\d+)\]\]")

_PATH_STEP = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\*|\d+)\]")


def parse_path(path: str) -> list[str | int | None]:
    """`$.a[*].b[0]` → ["a", None, "b", 0] (None: every element)."""
    if not path.startswith("$"):
        raise ConfigError(
            f"redaction field {path!r} is not a JSON path", hint="e.g. $.author.email"
        )
    steps: list[str | int | None] = []
    pos = 1
    while pos < len(path):
        m = _PATH_STEP.match(path, pos)
        if m is None:
            raise ConfigError(
                f"redaction field {path!r}: cannot read it from {path[pos:]!r}",
                hint="supported: $.name, [n], [*] (e.g. $.patients[*].name)",
            )
        name, index = m.groups()
        steps.append(name if name is not None else (None if index == "*" else int(index)))
        pos = m.end()
    return steps


@dataclass
class Masked:
    """One masked payload and the placeholders it holds (in memory, for one call)."""

    value: Any
    _values: dict[str, Any] = field(default_factory=dict, repr=False)
    counts: dict[str, int] = field(default_factory=dict)

    def restore(self, answer: Any) -> Any:
        """`answer` with every placeholder this payload made replaced by its value."""
        if not self._values:
            return answer
        if isinstance(answer, str):
            whole = self._values.get(answer)
            if whole is not None and not isinstance(whole, str):
                return whole
            return _PLACEHOLDER.sub(
                lambda m: _text(self._values.get(m.group(0), m.group(0))), answer
            )
        if isinstance(answer, dict):
            return {k: self.restore(v) for k, v in answer.items()}
        if isinstance(answer, list):
            return [self.restore(v) for v in answer]
        return answer

    def __repr__(self) -> str:  # never the values
        return f"Masked(counts={self.counts})"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


class Redactor:
    def __init__(self, *, fields: Iterable[str] = (), detectors: Iterable[str] = ()) -> None:
        self.fields = [(p, parse_path(p)) for p in fields]
        kinds = list(detectors)
        unknown = set(kinds) - DETECTOR_KINDS
        if unknown:
            raise ConfigError(
                f"unknown redaction detector(s) {', '.join(sorted(unknown))}",
                hint=f"detectors: {', '.join(sorted(DETECTOR_KINDS))}",
            )
        # In the table's order (cards before phones), whatever order the config gives.
        self.detectors = [d for d in DETECTORS if d.kind in kinds]

    def __bool__(self) -> bool:
        return bool(self.fields or self.detectors)

    def mask(self, payload: Any, *, agent: str = "") -> Masked:
        """A copy of `payload` (JSON builtins) with declared fields and detected values
        replaced by placeholders; counted by kind."""
        out = Masked(value=None)
        by_value: dict[tuple[str, str], str] = {}

        def placeholder(kind: str, value: Any) -> str:
            key = (kind, repr(value))
            if key not in by_value:
                out.counts[kind] = out.counts.get(kind, 0) + 1
                token = f"[[{kind.upper()}_{out.counts[kind]}]]"
                by_value[key] = token
                out._values[token] = value
            return by_value[key]

        value = payload
        for _, steps in self.fields:
            value = _replace_at(value, steps, lambda v: placeholder("field", v))
        if self.detectors:
            value = _scan(value, self.detectors, placeholder)
        out.value = value
        for kind, n in out.counts.items():
            telemetry.meters().redactions.add(n, {"agent": agent, "kind": kind})
        return out


def _replace_at(node: Any, steps: list[str | int | None], fn: Callable[[Any], Any]) -> Any:
    if not steps:
        return fn(node)
    step, rest = steps[0], steps[1:]
    if isinstance(step, str) and isinstance(node, dict) and step in node:
        return {**node, step: _replace_at(node[step], rest, fn)}
    if isinstance(node, list):
        if step is None:
            return [_replace_at(v, rest, fn) for v in node]
        if isinstance(step, int) and -len(node) <= step < len(node):
            copy = list(node)
            copy[step] = _replace_at(node[step], rest, fn)
            return copy
    return node


def _scan(node: Any, detectors: list[Detector], placeholder: Callable[[str, Any], str]) -> Any:
    if isinstance(node, str):
        if _PLACEHOLDER.fullmatch(node):
            return node
        for d in detectors:

            def sub(m: re.Match[str], d: Detector = d) -> str:
                text = m.group(0)
                return placeholder(d.kind, text) if d.check(text) else text

            node = d.pattern.sub(sub, node)
        return node
    if isinstance(node, dict):
        return {k: _scan(v, detectors, placeholder) for k, v in node.items()}
    if isinstance(node, list):
        return [_scan(v, detectors, placeholder) for v in node]
    return node
