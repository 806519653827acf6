"""Fenced code blocks of the docs, as the docs tests see them.

A block may be preceded by `<!-- file: PATH -->` (PATH relative to the repository): the block is
then that file's content, word for word, and its code runs as that file would. A guide that
has the reader create a file adds where: `<!-- file: PATH as SAVE_AS -->` (the block is PATH in
this repository, and the reader saves it as SAVE_AS in their project). Info strings:
```python, ```python no-run (the first line must be `# no-run: <why>`), ```sh, ```toml,
```toml invalid (must be refused by the policy parser), ```json, ```conf (a nats-server
configuration), ```text (output; not run).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
CHECKED = [*PAGES, REPO / "README.md"]
LANGUAGES = {"python", "sh", "toml", "json", "conf", "text", ""}

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)(?P<info>[^`]*)$")
_FILE = re.compile(r"^<!--\s*file:\s*(?P<path>\S+)(\s+as\s+(?P<save_as>\S+))?\s*-->$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    info: str  # what follows the language on the fence line (e.g. "no-run")
    code: str
    file: Path | None  # the repository file this block is, from `<!-- file: ... -->`
    save_as: str | None = None  # where the reader saves it, from `<!-- file: ... as ... -->`

    @property
    def id(self) -> str:
        return f"{self.page.name}:{self.line}"

    def lines(self) -> list[str]:
        return self.code.splitlines()


def blocks(page: Path) -> list[Block]:
    found: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.name}:{start + 1}: unclosed code block")
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        file_match = _FILE.match(prev)
        found.append(
            Block(
                page=page,
                line=start + 1,
                lang=m["lang"],
                info=m["info"].strip(),
                code="\n".join(body) + "\n",
                file=REPO / file_match["path"] if file_match else None,
                save_as=file_match["save_as"] if file_match else None,
            )
        )
        i += 1
    return found


def all_blocks(lang: str | None = None) -> list[Block]:
    return [b for page in CHECKED for b in blocks(page) if lang is None or b.lang == lang]


def page_blocks(name: str, lang: str | None = None) -> list[Block]:
    return [b for b in blocks(DOCS / name) if lang is None or b.lang == lang]


def commands(block: Block) -> list[list[str]]:
    """A shell block's command lines as tokens: continuations joined, comments and leading
    VAR=value dropped."""
    text = block.code.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        tokens = shlex.split(line, comments=True)
        while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
            tokens.pop(0)
        if tokens:
            out.append(tokens)
    return out


_ROW = re.compile(
    r"^\|\s*`(?P<name>[^`]+)`\s*\|\s*(?P<default>[^|]*?)\s*\|\s*(?P<meaning>.*?)\s*\|$"
)


def table_rows(text: str) -> dict[str, tuple[str, str]]:
    """A markdown table's rows `| `name` | default | meaning |` as {name: (default, meaning)}."""
    rows = {}
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if m:
            assert m["name"] not in rows, f"{m['name']} is listed twice"
            rows[m["name"]] = (m["default"].replace("`", "").strip(), m["meaning"])
    return rows
