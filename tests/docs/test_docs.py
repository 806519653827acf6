"""Every code block in docs/*.md and README.md is run or checked, so the docs cannot rot.

- ```python: run in a fresh interpreter (a block the reader saves as a file: in
  test_guide_mesh_up.py, as that file) (cwd: the repository; a fresh nats-server's URL in
  MESH_NATS_URL; no model key, model requests blocked). A block that defines `test_*` functions
  is run by pytest with the `mesh.testing.fixtures` plugin. ```python no-run is only compiled,
  and must say why in its first line (`# no-run: <reason>`).
- ```sh: every `mesh …` line names a real command (`mesh <cmd> --help` exits 0) and only its
  real options, `@file` arguments exist; `make X` names a Makefile target (never run);
  `python -m X` names an importable module.
- ```toml: parses; a policy (a table with `skills`, or `ignore`) passes `coordinator.policy.parse`
  (```toml invalid: must be refused). ```json: parses; a card passes `mesh.cards.parse_card`.
  ```conf: `nats-server -t` accepts it.
- A block after `<!-- file: PATH -->` is PATH's content, word for word.
- configuration.md lists every `Settings` field with its default, and every other MESH_*
  variable the code reads; policies.md lists every policy and rule field with its default.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from coordinator.policy import Policy, parse
from coordinator.quorum import QuorumRule
from mesh.cards import parse_card
from mesh.cli import app
from mesh.dev import topology
from mesh.errors import PolicyError
from mesh.server import EmbeddedServer, find_binary
from mesh.settings import Settings
from tests.docs.blocks import (
    CHECKED,
    DOCS,
    LANGUAGES,
    PAGES,
    REPO,
    Block,
    all_blocks,
    blocks,
    commands,
    table_rows,
)

EXAMPLE = REPO / "tests" / "docs" / "example_agent"
# The guide's paths (docs/write-an-agent.md) → where the example really lives in this repo.
ALIASES = {"agents.four_eyes": "tests.docs.example_agent"}
RUN_TIMEOUT_S = 120.0

_INSTALL_ALIASES = textwrap.dedent(
    f"""
    import importlib, sys
    import agents
    for _alias, _real in {ALIASES!r}.items():
        sys.modules[_alias] = importlib.import_module(_real)
        sys.modules[_alias + ".agent"] = importlib.import_module(_real + ".agent")
        setattr(agents, _alias.rsplit(".", 1)[1], sys.modules[_alias])
    """
)

# Runs one block in a fresh interpreter: a fresh namespace, `__file__` set to the page (or the
# file the block is), `__name__` "__main__".
_RUNNER = (
    "import sys\n"
    "from pathlib import Path\n"
    "code, file, name = Path(sys.argv[1]).read_text(), sys.argv[2], sys.argv[3]\n"
    "if 'agents.four_eyes' in code:\n"
    + textwrap.indent(_INSTALL_ALIASES, "    ")
    + "exec(compile(code, name, 'exec'), {'__name__': '__main__', '__file__': file})\n"
)


def _ids(items: list[Block]) -> list[str]:
    return [b.id for b in items]


def _run_env(tmp: Path, nats_url: str) -> dict[str, str]:
    """No MESH_*, model key or OTel settings from outside; cards of the repo and the example;
    the identity of a reader next to a `mesh up`: its operator (here the run's, whose folder
    the block's server admits)."""
    cards = tmp / "cards"
    cards.mkdir(exist_ok=True)
    for card in [*(REPO / "cards").glob("*.json"), EXAMPLE / "four-eyes.json"]:
        shutil.copy(card, cards / card.name)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MESH_", "ANTHROPIC_", "OTEL_", "PYTEST_"))
    }
    env.update(
        PYTHONPATH=str(REPO),
        MESH_HOME=str(tmp / ".mesh"),
        MESH_CARDS_DIR=str(cards),
        MESH_NATS_URL=nats_url,
        MESH_ALLOW_MODEL_REQUESTS="0",
        PYTHONUNBUFFERED="1",
        TMPDIR=str(tmp),
        MESH_IDENTITY=os.environ["MESH_IDENTITY"],
        MESH_TRUST=os.environ["MESH_TRUST"],
    )
    return env


def _run(args: list[str], env: dict[str, str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        ran = subprocess.run(
            args,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{what}: still running after {RUN_TIMEOUT_S:.0f}s") from e
    if ran.returncode != 0:
        raise AssertionError(
            f"{what} exited {ran.returncode}\n--- stdout ---\n{ran.stdout[-4000:]}"
            f"\n--- stderr ---\n{ran.stderr[-4000:]}"
        )
    return ran


# -- every block ---------------------------------------------------------------------------------
def test_there_are_docs_to_check() -> None:
    names = {p.name for p in PAGES}
    for page in ("index.md", "quickstart.md", "write-an-agent.md", "policies.md"):
        assert page in names, names
    assert {"operations.md", "configuration.md"} <= names, names
    assert len(all_blocks("python")) >= 10


@pytest.mark.parametrize("page", CHECKED, ids=lambda p: p.name)
def test_every_block_has_a_known_language(page: Path) -> None:
    for b in blocks(page):
        assert b.lang in LANGUAGES, f"{b.id}: unknown language {b.lang!r} (use {LANGUAGES})"
        assert b.info in ("", "no-run", "invalid"), f"{b.id}: unknown marker {b.info!r}"


FILE_BLOCKS = [b for b in all_blocks() if b.file is not None]


@pytest.mark.parametrize("block", FILE_BLOCKS, ids=_ids(FILE_BLOCKS))
def test_file_block_is_the_file(block: Block) -> None:
    assert block.file is not None and block.file.is_file(), f"{block.id}: no {block.file}"
    assert block.code == block.file.read_text(), (
        f"{block.id} differs from {block.file.relative_to(REPO)}: copy one into the other"
    )


# -- python ---------------------------------------------------------------------------------------
# A block the reader saves as a file (`<!-- file: ... as ... -->`) runs as that file, in a copy of
# the project with the others, in tests/docs/test_guide_mesh_up.py: its `__main__.py` starts an
# agent until stopped, which a block run here could not end.
PYTHON = [b for b in all_blocks("python") if b.save_as is None]


@pytest.mark.parametrize("block", PYTHON, ids=_ids(PYTHON))
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    if block.info == "no-run":
        reason = re.match(r"#\s*no-run:\s*(\S.*)", block.lines()[0] if block.code.strip() else "")
        assert reason, f"{block.id}: a no-run block says why in its first line: # no-run: <why>"
        compile(block.code, block.id, "exec")  # still valid Python
        pytest.skip(f"{block.id}: {reason[1]}")
    with EmbeddedServer() as server:
        env = _run_env(tmp_path, server.url)
        if re.search(r"^(async )?def test_", block.code, re.MULTILINE):
            _run_as_tests(block, tmp_path, env)
        else:
            source = tmp_path / "block.py"
            source.write_text(block.code)
            file = block.file or block.page
            _run([sys.executable, "-c", _RUNNER, str(source), str(file), block.id], env, block.id)


def _run_as_tests(block: Block, tmp: Path, env: dict[str, str]) -> None:
    suite = tmp / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(
        _INSTALL_ALIASES + '\npytest_plugins = ["mesh.testing.fixtures"]\n'
    )
    (suite / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n")
    (suite / "test_doc_block.py").write_text(block.code)
    ran = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(suite / "pytest.ini"),
            "--rootdir",
            str(suite),
            str(suite),
        ],
        env,
        f"pytest on {block.id}",
    )
    passed = re.search(r"(\d+) passed", ran.stdout)
    assert passed and "skipped" not in ran.stdout, ran.stdout[-3000:]


# -- sh -------------------------------------------------------------------------------------------
SH = all_blocks("sh")
_ROOT_COMMAND = get_command(app)
_MAKE_TARGETS = set(re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(), re.MULTILINE))


def _subcommands(cmd: Any) -> dict[str, Any] | None:
    """A group's commands by name; None for a plain command (typer vendors its own click)."""
    commands = getattr(cmd, "commands", None)
    return commands if isinstance(commands, dict) else None


def _options(cmd: Any) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


def _check_mesh(args: list[str], where: str) -> str:
    cmd: Any = _ROOT_COMMAND
    path: list[str] = []
    for tok in args:
        sub = _subcommands(cmd)
        if sub is not None and tok in sub:
            cmd = sub[tok]
            path.append(tok)
        else:
            break
    rest = args[len(path) :]
    assert path, f"{where}: `mesh {' '.join(args)}` names no mesh command"
    if _subcommands(cmd) is not None and rest and not rest[0].startswith("-"):
        raise AssertionError(f"{where}: `mesh {' '.join(path)}` has no command {rest[0]!r}")
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, f"{where}: mesh {' '.join(path)} --help: {result.output}"
    known = _options(cmd)
    for tok in rest:
        if tok.startswith("--"):
            name = tok.split("=", 1)[0]
            assert name in known, f"{where}: `mesh {' '.join(path)}` has no option {name}"
        elif tok.startswith("@"):
            assert (REPO / tok[1:]).is_file(), f"{where}: {tok[1:]} does not exist"
    return " ".join(path)


@pytest.mark.parametrize("block", SH, ids=_ids(SH))
def test_sh_block_names_real_commands(block: Block) -> None:
    for tokens in commands(block):
        prog = Path(tokens[0]).name
        if prog == "mesh":
            _check_mesh(tokens[1:], block.id)
        elif prog == "make":
            targets = [t for t in tokens[1:] if not t.startswith("-") and "=" not in t]
            for t in targets:
                assert t in _MAKE_TARGETS, f"{block.id}: the Makefile has no target {t!r}"
        elif prog.startswith("python") and tokens[1:2] == ["-m"]:
            module = tokens[2]
            if not module.startswith("agents.four_eyes"):  # the guide's agent (aliased)
                assert importlib.util.find_spec(module), f"{block.id}: no module {module}"


def test_mesh_console_script_runs() -> None:
    mesh = Path(sys.executable).parent / "mesh"
    ran = subprocess.run(
        [str(mesh), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert ran.returncode == 0, ran.stderr


def test_sh_checker_catches_mistakes() -> None:
    with pytest.raises(AssertionError, match="no option --no-such-flag"):
        _check_mesh(["publish", "release.proposed", "{}", "--no-such-flag"], "t")
    with pytest.raises(AssertionError, match="no command 'nope'"):
        _check_mesh(["dlq", "nope"], "t")
    with pytest.raises(AssertionError, match="names no mesh command"):
        _check_mesh(["frobnicate"], "t")
    with pytest.raises(AssertionError, match="does not exist"):
        _check_mesh(["call", "security-review", "@agents/samples/nope.json"], "t")


# -- toml, json, conf -----------------------------------------------------------------------------
TOML = all_blocks("toml")


def _policy_like(doc: dict[str, Any]) -> bool:
    return "ignore" in doc or any(isinstance(v, dict) and "skills" in v for v in doc.values())


def _topology_like(doc: dict[str, Any]) -> bool:
    return bool({"agents", "coordinators", "cluster"} & set(doc))


@pytest.mark.parametrize("block", TOML, ids=_ids(TOML))
def test_toml_block_parses(block: Block) -> None:
    doc = tomllib.loads(block.code)
    if block.info == "invalid":
        assert _policy_like(doc), f"{block.id}: only policies can be marked invalid"
        with pytest.raises(PolicyError):
            parse(doc, source=block.id)
    elif _policy_like(doc):
        parse(doc, source=block.id)
    elif _topology_like(doc):
        # A mesh.toml (or a table of one): it validates, and every module is a real one (or the
        # guide's agent, which lives here as tests/docs/example_agent).
        config = topology.parse(doc, source=Path(block.id), check_modules=False)
        for agent in config.spec.agents:
            module = ALIASES.get(agent.module, agent.module)
            assert topology.find_module(module, [str(REPO), *sys.path]), (
                f"{block.id}: no module {agent.module}"
            )


JSON = all_blocks("json")


@pytest.mark.parametrize("block", JSON, ids=_ids(JSON))
def test_json_block_parses(block: Block) -> None:
    doc = json.loads(block.code)
    if isinstance(doc, dict) and "skills" in doc and "name" in doc:
        parse_card(doc, source=block.id, require_interfaces=False)


CONF = all_blocks("conf")


@pytest.mark.parametrize("block", CONF, ids=_ids(CONF))
def test_conf_block_is_a_valid_nats_server_config(block: Block, tmp_path: Path) -> None:
    conf = tmp_path / "nats.conf"
    conf.write_text(block.code)
    ran = subprocess.run(
        [find_binary(), "-t", "-c", str(conf)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ran.returncode == 0, f"{block.id}: {ran.stdout}{ran.stderr}"


# -- configuration.md -----------------------------------------------------------------------------
def shown_setting(default: Any) -> str:
    """How configuration.md shows a setting's default."""
    if default is None:
        return "(unset)"
    if isinstance(default, bool):
        return str(default).lower()
    if default == "":
        return "(empty)"
    return str(default)


def settings_table() -> str:
    """The table configuration.md holds, generated (print it to update the page)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = shown_setting(field.default)
        cell = default if default.startswith("(") else f"`{default}`"
        rows.append(f"| `MESH_{name.upper()}` | {cell} | {field.description or ''} |")
    return "\n".join(rows)


def _section(text: str, marker: str) -> str:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    assert start in text and end in text, f"missing {start} … {end}"
    return text.split(start, 1)[1].split(end, 1)[0]


def test_configuration_lists_every_setting_with_its_default() -> None:
    rows = table_rows(_section((DOCS / "configuration.md").read_text(), "settings"))
    fields = Settings.model_fields
    expected = {f"MESH_{n.upper()}": shown_setting(f.default) for n, f in fields.items()}
    missing = sorted(set(expected) - set(rows))
    extra = sorted(set(rows) - set(expected))
    assert not missing and not extra, (
        f"configuration.md: missing {missing}, not settings {extra}; the generated table:\n"
        + settings_table()
    )
    for name, default in expected.items():
        assert rows[name][0] == default, (
            f"{name}: the page says {rows[name][0]!r}, code {default!r}"
        )
        assert rows[name][1].strip(), f"{name}: say what it means"


def _env_names_in_code() -> tuple[set[str], set[str]]:
    """(MESH_* variables read outside Settings, every MESH_* literal) in the product's code."""
    literals: set[str] = set()
    streams: set[str] = set()
    for root in ("mesh", "coordinator", "agents"):
        for path in (REPO / root).rglob("*.py"):
            text = path.read_text()
            literals |= set(re.findall(r"[\"'](MESH_[A-Z0-9_]+)[\"']", text))
            streams |= set(re.findall(r"\w*STREAM\w*\s*=\s*[\"'](MESH_[A-Z0-9_]+)[\"']", text))
    settings = {f"MESH_{n.upper()}" for n in Settings.model_fields}
    return literals - streams - settings, literals


def test_no_mesh_variable_is_read_outside_settings() -> None:
    """`Settings` is the one reader of MESH_* variables (mesh/settings.py's docstring)."""
    other, _ = _env_names_in_code()
    assert other == set(), f"read outside Settings: {sorted(other)}"
    text = (DOCS / "configuration.md").read_text()
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "OTEL_"):
        assert name in text, name


@pytest.mark.parametrize("page", CHECKED, ids=lambda p: p.name)
def test_every_mesh_variable_named_in_the_docs_exists(page: Path) -> None:
    _, literals = _env_names_in_code()
    known = literals | {f"MESH_{n.upper()}" for n in Settings.model_fields}
    named = set(re.findall(r"\bMESH_[A-Z0-9_]*[A-Z0-9]\b", page.read_text()))
    assert not named - known, f"{page.name} names variables the code never reads: {named - known}"


# -- policies.md ----------------------------------------------------------------------------------
def shown_policy_default(info: msgspec.structs.FieldInfo) -> str:
    """How policies.md shows a policy or rule field's default (as you would write it in TOML)."""
    if info.required:
        return "required"
    default = info.default if info.default is not msgspec.NODEFAULT else info.default_factory()
    if default is None:
        return "(none)"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, str):
        return f'"{default}"'
    if isinstance(default, list | dict):
        return json.dumps(default)
    return repr(default)


@pytest.mark.parametrize("struct", [Policy, QuorumRule], ids=lambda s: s.__name__)
def test_policies_lists_every_field_with_its_default(struct: type[msgspec.Struct]) -> None:
    rows = table_rows((DOCS / "policies.md").read_text())
    for info in msgspec.structs.fields(struct):
        assert info.name in rows, f"policies.md: no row for `{info.name}` ({struct.__name__})"
        want = shown_policy_default(info)
        assert rows[info.name][0] == want, (
            f"`{info.name}`: page {rows[info.name][0]!r}, code {want!r}"
        )
        assert rows[info.name][1].strip(), f"`{info.name}`: say what it does"


def test_policies_explains_every_rule_kind_and_ignore() -> None:
    text = (DOCS / "policies.md").read_text()
    kinds = msgspec.json.schema(QuorumRule)["$defs"]["QuorumRule"]["properties"]["kind"]["enum"]
    for kind in [*kinds, "ignore", "absent", "min_participation", "tie"]:
        assert re.search(rf'`"?{kind}"?`', text), f"policies.md: nothing on `{kind}`"


def test_policies_names_every_field_of_a_decision() -> None:
    from mesh.records import Decision, Vote

    text = (DOCS / "policies.md").read_text()
    for struct in (Decision, Vote):
        for info in msgspec.structs.fields(struct):
            assert f"`{info.name}`" in text, f"policies.md: {struct.__name__}.{info.name}?"


# -- operations.md --------------------------------------------------------------------------------
def test_operations_names_real_metrics_and_dead_letter_reasons() -> None:
    from coordinator.dlq import REASONS

    text = (DOCS / "operations.md").read_text()
    for reason in REASONS:
        assert f"`{reason}`" in text, f"operations.md: no runbook entry for {reason}"
    telemetry = (REPO / "mesh" / "telemetry.py").read_text()
    named = re.findall(r"^\|\s*`(mesh\.[a-z_.]+)`", text, re.MULTILINE)
    assert named, "operations.md: a table of metrics (| `mesh.…` | …)"
    for metric in named:
        assert f'"{metric}"' in telemetry, f"operations.md: {metric} is no metric of the mesh"


# -- links ----------------------------------------------------------------------------------------
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
LINKS = [
    (page, m["target"])
    for page in CHECKED
    for m in _LINK.finditer(page.read_text())
    if not re.match(r"^(https?:|mailto:|#)", m["target"])
]


@pytest.mark.parametrize(("page", "target"), LINKS, ids=[f"{p.name}->{t}" for p, t in LINKS])
def test_relative_links_resolve(page: Path, target: str) -> None:
    path = (page.parent / target.split("#", 1)[0]).resolve()
    if not path.exists() and path.name == "a2a-nats-binding.md":
        pytest.skip("docs/a2a-nats-binding.md is written separately and not here yet")
    assert path.exists(), f"{page.name}: broken link {target}"


def test_index_links_every_page() -> None:
    text = (DOCS / "index.md").read_text()
    for page in [*PAGES, DOCS / "a2a-nats-binding.md"]:
        if page.name != "index.md":
            assert f"]({page.name})" in text, f"index.md does not link {page.name}"
