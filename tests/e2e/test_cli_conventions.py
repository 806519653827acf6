"""The conventions every `mesh` command keeps (docs/cli.md): `--version`, `-h`, completion,
`--json` on every command that lists or shows, full width when piped, a bad setting as one
line, CLI arguments that contradict a CloudEvent body refused, and the exit codes."""

from __future__ import annotations

import asyncio
import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from mesh.cli import app
from tests.e2e.procs import MESH, Ran, mesh_env, run_mesh

pytestmark = pytest.mark.e2e

OK, FAILED, USAGE, CONFIG, NOT_FOUND, UNAVAILABLE, VERIFY = 0, 1, 2, 3, 4, 5, 6

# Every command that lists or shows something, as `mesh` spells it: each takes --json, and
# docs/cli.md's --json table names it.
JSON_COMMANDS = [
    ("agents",),
    ("approvals", "ls"),
    ("approvals", "show"),
    ("audit", "ls"),
    ("audit", "verify"),
    ("authz", "ask"),
    ("authz", "check"),
    ("authz", "show"),
    ("budgets",),
    ("canary", "resume"),
    ("canary", "status"),
    ("canary", "stop"),
    ("canary", "version"),
    ("creds", "list"),
    ("decisions",),
    ("demo",),
    ("dlq",),
    ("dlq", "ls"),
    ("dlq", "show"),
    ("eval",),
    ("schedules", "add"),
    ("schedules", "ls"),
    ("schema",),
    ("status",),
    ("trace",),
]
# Every other command, and why it has no --json: a new command must be put in one of the two.
NOT_LISTINGS = {
    ("approvals", "approve"): "an action (its receipt is one line)",
    ("approvals", "deny"): "an action (its receipt is one line)",
    ("audit", "export"): "writes a file",
    ("call",): "always prints JSON (the task)",
    ("console",): "a server",
    ("console", "token"): "prints the token alone",
    ("coordinator",): "a long-running process",
    ("creds", "agent"): "issues an identity file",
    ("creds", "compose"): "writes a folder",
    ("creds", "conf"): "writes a file",
    ("creds", "coordinator"): "issues an identity file",
    ("creds", "human"): "issues an identity file",
    ("creds", "operator"): "issues an identity file",
    ("creds", "publisher"): "issues an identity file",
    ("creds", "reader"): "issues an identity file",
    ("creds", "revoke"): "an action",
    ("dlq", "purge"): "an action",
    ("dlq", "replay"): "prints the new message id alone",
    ("ensure",): "an action",
    ("eval-export",): "writes a dataset file",
    ("new", "agent"): "writes files (it lists what it wrote)",
    ("publish",): "prints the event id alone",
    ("run",): "a long-running process",
    ("schedules", "rm"): "an action",
    ("schedules", "run"): "a long-running process",
    ("up",): "a long-running process",
}
CLI_DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def _commands(cmd: Any = None, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and group path of the app (the root is `()`)."""
    cmd = cmd if cmd is not None else get_command(app)
    found = [path]
    for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
        found += _commands(sub, (*path, name))
    return found


def _one_line(ran: Ran, code: int) -> str:
    """The exit code, no traceback, nothing on stdout, and one `error:` line (and at most a
    hint line) on stderr; that line."""
    assert ran.returncode == code, str(ran)
    assert "Traceback" not in ran.stdout + ran.stderr, str(ran)
    assert ran.stdout.strip() == "", str(ran)
    lines = [ln for ln in ran.stderr.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error:"), str(ran)
    return lines[0]


# -- version, help, completion -------------------------------------------------------------------
def test_version(tmp_path: Path) -> None:
    for flag in ("--version", "-V"):
        ran = run_mesh([flag], cwd=tmp_path, env=mesh_env(tmp_path))
        assert ran.returncode == OK, str(ran)
        assert ran.stdout == f"mesh {version('quorum-mesh')}\n", str(ran)


def test_dash_h_is_help_everywhere(tmp_path: Path) -> None:
    paths = _commands()
    assert ("new", "agent") in paths and ("dlq", "show") in paths and len(paths) > 25
    runner = CliRunner()
    for path in paths:
        short = runner.invoke(app, [*path, "-h"], terminal_width=200)
        long = runner.invoke(app, [*path, "--help"], terminal_width=200)
        where = f"mesh {' '.join(path)} -h"
        assert short.exit_code == OK, f"{where}: {short.output}"
        assert "Usage:" in short.output and short.output == long.output, where
    ran = run_mesh(["-h"], cwd=tmp_path, env=mesh_env(tmp_path))  # the installed script too
    assert ran.returncode == OK and "Usage: mesh" in ran.stdout, str(ran)


def test_shell_completion_is_on() -> None:
    shown = CliRunner().invoke(app, ["--help"], terminal_width=200).output
    assert "--install-completion" in shown and "--show-completion" in shown, shown


def _leaves() -> list[tuple[str, ...]]:
    """Every runnable command: the leaves, and groups that run on their own (`mesh dlq`)."""
    root = get_command(app)
    found = []
    for path in _commands()[1:]:
        cmd: Any = root
        for name in path:
            cmd = cmd.commands[name]
        if not getattr(cmd, "commands", None) or getattr(cmd, "invoke_without_command", False):
            found.append(path)
    return found


def test_every_listing_takes_json() -> None:
    leaves = _leaves()
    unsorted = set(leaves) - set(JSON_COMMANDS) - set(NOT_LISTINGS)
    assert not unsorted, f"new commands: put each in JSON_COMMANDS or NOT_LISTINGS: {unsorted}"
    assert not (set(JSON_COMMANDS) | set(NOT_LISTINGS)) - set(leaves), "gone commands listed"
    root = get_command(app)
    doc = CLI_DOC.read_text()
    table = doc[doc.index("## `--json`") : doc.index("## Output to a pipe")]
    for path in JSON_COMMANDS:
        cmd: Any = root
        for name in path:
            cmd = cmd.commands[name]
        options = {o for p in cmd.params for o in p.opts}
        assert "--json" in options, f"mesh {' '.join(path)} has no --json"
        assert f"`mesh {' '.join(path)}" in table, f"docs/cli.md's --json table lacks {path}"


@pytest.mark.parametrize(
    "args",
    [
        ["schema", "--json"],
        ["schema", "release.proposed", "--json"],
        ["authz", "show", "--json"],
        ["authz", "check", str(CLI_DOC.parents[1] / "mesh/authz/policies/default"), "--json"],
        ["canary", "version", "agents.security_review", "--json"],
        ["creds", "list", "--json"],
    ],
    ids=lambda args: " ".join(a for a in args if "/" not in a),
)
def test_json_without_a_server_is_one_document(tmp_path: Path, args: list[str]) -> None:
    """The --json commands that need no server: one JSON document on stdout, nothing else."""
    ran = run_mesh(args, cwd=tmp_path, env=mesh_env(tmp_path))
    assert ran.returncode == OK, str(ran)
    assert isinstance(json.loads(ran.stdout), dict | list), ran.stdout


def test_every_command_prints_through_the_shared_consoles() -> None:
    """Full width when piped is decided once (mesh.cli._common.out/err): a command module
    with a rich Console of its own would cut its tables at 80 columns in a pipe again."""
    cli = Path(__file__).resolve().parents[2] / "mesh" / "cli"
    own = [
        p.name
        for p in sorted(cli.rglob("*.py"))
        if p.name != "_common.py" and "Console(" in p.read_text()
    ]
    assert not own, f"{own} make a rich Console of their own: use mesh.cli._common.out/err"


# -- settings, exit codes, conflicting arguments (no server needed) ------------------------------
@pytest.mark.parametrize(
    ("variable", "value", "expects"),
    [("MESH_HTTP_PORT", "abc", "integer"), ("MESH_HEARTBEAT_S", "-1", "greater than 0")],
)
def test_a_bad_setting_is_one_line_naming_it(
    tmp_path: Path, variable: str, value: str, expects: str
) -> None:
    env = mesh_env(tmp_path, **{variable: value})
    for args in (["agents"], ["creds", "list"], ["publish", "release.proposed", "{}"]):
        line = _one_line(run_mesh(args, cwd=tmp_path, env=env), CONFIG)
        assert variable in line and repr(value) in line and expects in line, line
        assert "pydantic" not in line and "validation error" not in line, line


# What each command is given in the sweep below: arguments that pass its own checks, so the
# first thing it meets is the bad setting. Absent: commands that read no setting at all.
SWEEP_ARGS: dict[tuple[str, ...], list[str]] = {
    ("approvals", "approve"): ["x", "--reason", "checked"],
    ("approvals", "deny"): ["x", "--reason", "checked"],
    ("approvals", "show"): ["x"],
    ("audit", "export"): ["audit.jsonl"],
    ("authz", "ask"): ["publisher:billing", "publish", 'EventType::"acme/t"'],
    ("call",): ["nobody", "{}"],
    ("canary", "resume"): ["a", "1"],
    ("canary", "stop"): ["a", "1"],
    ("canary", "version"): ["agents.security_review"],
    ("creds", "agent"): ["a"],
    ("creds", "conf"): ["--out", "auth.conf"],
    ("creds", "coordinator"): ["c"],
    ("creds", "human"): ["h", "--tenant", "acme", "--role", "cab"],
    ("creds", "publisher"): ["p", "--tenant", "acme"],
    ("creds", "reader"): ["r", "--tenant", "acme"],
    ("dlq", "purge"): ["--yes"],
    ("dlq", "replay"): ["1"],
    ("dlq", "show"): ["1"],
    ("eval",): ["cases.jsonl", "--agent", "a"],
    ("eval-export",): ["out.jsonl"],
    ("publish",): ["release.proposed", "{}"],
    ("run",): ["agents.security_review"],
    ("schedules", "add"): ["n", "a.b", "--every", "1h"],
    ("schedules", "rm"): ["n"],
    ("trace",): ["x"],
}
READS_NO_SETTING = {
    ("authz", "check"),  # policy files only
    ("new", "agent"),  # writes templates
    ("console", "token"),  # reads the identity file it is given
    ("creds", "revoke"),  # reads the identity file it is given first
}
# Processes (they would configure logging, or start servers, in this test's process if the
# setting were not refused first): run as `mesh` processes.
AS_PROCESS = {("up",), ("run",), ("coordinator",), ("console",), ("schedules", "run"), ("demo",)}


def test_a_bad_setting_is_one_line_on_every_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every command that reads settings says a bad one in one line naming it, exit code 3,
    before it does anything (nothing is written in the folder it runs in)."""
    (tmp_path / "cases.jsonl").write_text('{"data": {}, "expected": "approve"}\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    env = mesh_env(tmp_path, MESH_HTTP_PORT="abc")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for path in _leaves():
        if path in READS_NO_SETTING:
            continue
        args = [*path, *SWEEP_ARGS.get(path, [])]
        where = f"mesh {' '.join(args)}"
        if path in AS_PROCESS:
            ran = run_mesh(args, cwd=tmp_path, env=env)
            code, stdout, stderr = ran.returncode, ran.stdout, ran.stderr
        else:
            result = runner.invoke(app, args, env=env, terminal_width=200)
            assert result.exception is None or isinstance(result.exception, SystemExit), (
                f"{where}: {result.exception!r}"
            )
            code, stdout, stderr = result.exit_code, result.stdout, result.stderr
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert code == CONFIG and stdout.strip() == "", f"{where}: {code} {stdout}{stderr}"
        assert len(lines) == 1 and lines[0].startswith("error: MESH_HTTP_PORT='abc'"), (
            f"{where}: {stderr}"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a command wrote before failing"


def test_exit_codes_without_a_server(tmp_path: Path) -> None:
    env = mesh_env(tmp_path)

    def ran(*args: str) -> Ran:
        return run_mesh(list(args), cwd=tmp_path, env=env)

    usage = ran("agents", "--no-such-option")
    assert usage.returncode == USAGE and "Traceback" not in usage.stderr, str(usage)
    assert "no such option" in usage.stderr.lower(), str(usage)
    assert "is not an event type" in _one_line(ran("publish", "bad type!", "{}"), CONFIG)
    assert "no identity file" in _one_line(ran("creds", "revoke", "gone.json"), NOT_FOUND)
    assert "cannot import" in _one_line(ran("run", "agents.nope"), NOT_FOUND)
    assert "no NATS server" in _one_line(ran("agents", "--json"), UNAVAILABLE)
    assert "no NATS server" in _one_line(ran("status"), UNAVAILABLE)
    # The long-running processes log the error, and end with the same code.
    for process in (["coordinator"], ["schedules", "run"]):
        logged = ran(*process)
        assert logged.returncode == UNAVAILABLE, str(logged)
        assert "no NATS server" in logged.stderr and "Traceback" not in logged.stderr, str(logged)


@pytest.mark.parametrize(
    "module", ["agents.conformance", "agents.security_review", "coordinator", "mesh.schedules"]
)
def test_the_long_running_processes_keep_the_codes(tmp_path: Path, module: str) -> None:
    """`python -m …` of an agent (the TCK's conformance agent, a shipped reviewer), the
    coordinator and the schedule relay: a bad setting is one line and 3, no NATS server 5 —
    not a traceback, not usage's 2."""
    import subprocess
    import sys

    def launch(**extra: str) -> subprocess.CompletedProcess[str]:
        env = mesh_env(tmp_path, **{"MESH_HTTP_PORT": "0", "MESH_GRPC_PORT": "-1", **extra})
        return subprocess.run(
            [sys.executable, "-m", module],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    bad = launch(MESH_HTTP_PORT="abc")
    assert bad.returncode == CONFIG, bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: MESH_HTTP_PORT='abc': input should be a valid integer, unable to parse string as "
        "an integer"
    ], bad.stderr
    alone = launch()
    assert alone.returncode == UNAVAILABLE, alone.stderr
    assert "no NATS server" in alone.stderr and "Traceback" not in alone.stderr, alone.stderr


RELEASE = json.loads(
    (Path(__file__).resolve().parents[2] / "agents/samples/release_clean.json").read_text()
)
CLOUD_EVENT = {
    "specversion": "1.0",
    "id": "ce-1",
    "source": "billing",
    "type": "payment.requested",
    "tenant": "acme",
    "data": {"amount": 5},
}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["release.proposed"], "the CloudEvent's type is 'payment.requested' but TYPE says"),
        (
            ["payment.requested", "--tenant", "globex"],
            "the CloudEvent's tenant is 'acme' but --tenant says 'globex'",
        ),
        (["payment.requested", "--id", "other"], "the CloudEvent's id is 'ce-1' but --id says"),
    ],
    ids=["type", "tenant", "id"],
)
def test_publish_refuses_arguments_the_body_contradicts(
    tmp_path: Path, args: list[str], says: str
) -> None:
    (tmp_path / "ce.json").write_text(json.dumps(CLOUD_EVENT))
    event_type, *options = args
    ran = run_mesh(
        ["publish", event_type, "@ce.json", *options], cwd=tmp_path, env=mesh_env(tmp_path)
    )
    assert says in _one_line(ran, CONFIG)


# -- against a running mesh ----------------------------------------------------------------------
async def _mesh(args: list[str], env: dict[str, str], cwd: Path) -> Ran:
    """`mesh ARGS` as a process, without blocking the loop the mesh under test runs on."""
    proc = await asyncio.create_subprocess_exec(
        str(MESH),
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"`mesh {' '.join(args)}` did not finish") from None
    return Ran(args, proc.returncode or 0, out.decode(), err.decode())


async def test_json_width_and_codes_against_a_running_mesh(tmp_path: Path) -> None:
    from agents.security_review.agent import agent
    from mesh.identity import IdentityDir
    from mesh.testing import MeshHarness

    release = RELEASE
    policies = {
        "release.proposed": {"skills": ["release-security-review"], "rule": {"kind": "unanimous"}}
    }
    async with MeshHarness(agent, policies=policies, http=True) as mesh:
        event_id = await mesh.publish("release.proposed", release)
        await mesh.decision(event_id)
        env = mesh_env(
            tmp_path,
            MESH_NATS_URL=mesh.url,
            MESH_IDENTITY=os.environ["MESH_IDENTITY"],
            MESH_TRUST=os.environ["MESH_TRUST"],
        )

        async def ok_json(*args: str) -> Any:
            ran = await _mesh([*args, "--json"], env, tmp_path)
            assert ran.returncode == OK, str(ran)
            return ran.json()

        [live] = await ok_json("agents")
        url = next(i["url"] for i in live["interfaces"] if i["protocolBinding"] == "JSONRPC")
        assert live["agent"] == "security-review" and live["skills"], live
        assert live["version"].startswith("1.0.0+"), live  # mesh.versions: label+hash12
        [decision] = [d for d in await ok_json("decisions") if d["event_id"] == event_id]
        assert decision["valid"] and decision["outcome"] == "approved", decision
        assert await ok_json("dlq") == [] and await ok_json("dlq", "ls") == []
        assert isinstance(await ok_json("audit", "ls"), list)
        verified = await ok_json("audit", "verify")
        assert verified["ok"] and verified["problems"] == [], verified
        [coordinator] = await ok_json("status")
        assert coordinator["name"] == "harness-coordinator", coordinator
        assert any(i["role"] == "operator" for i in await ok_json("creds", "list"))
        # The listings added since: each one JSON document (nothing to list here, but listed).
        assert isinstance(await ok_json("budgets"), list)
        assert await ok_json("canary", "status") == []
        assert (await ok_json("schedules", "ls"))["schedules"] == []
        assert await ok_json("approvals", "ls", "--tenant", "default") == []

        # Piped, no COLUMNS: every row whole on its line (rich would cut at 80 columns).
        wide = {k: v for k, v in env.items() if k != "COLUMNS"}
        table = await _mesh(["agents"], wide, tmp_path)
        assert table.returncode == OK, str(table)
        [row] = [ln for ln in table.stdout.splitlines() if live["instance"] in ln]
        assert url in row and "security-review" in row and live["version"] in row, table.stdout

        # Not found, unavailable, verification failed: distinct codes, one line each.
        shown = await _mesh(["dlq", "show", "999", "--json"], env, tmp_path)
        assert "no dead letter with id 999" in _one_line(shown, NOT_FOUND)
        traced = await _mesh(["trace", "no-such-event", "--json"], env, tmp_path)
        assert "no decision state" in _one_line(traced, NOT_FOUND)
        called = await _mesh(["call", "nobody-here", "{}", "--timeout", "2"], env, tmp_path)
        assert called.returncode == UNAVAILABLE, str(called)
        stranger = IdentityDir.init(tmp_path / "stranger")  # a trust file that trusts no one here
        distrusted = await _mesh(
            ["audit", "verify", "--json", "--trust", str(stranger.trust_path)], env, tmp_path
        )
        assert distrusted.returncode == VERIFY, str(distrusted)
        assert distrusted.json()["ok"] is False and distrusted.json()["problems"], distrusted

        # A CloudEvent with no tenant of its own takes --tenant.
        event = {**CLOUD_EVENT, "type": "release.proposed", "id": "ce-tenant", "data": release}
        del event["tenant"]
        (tmp_path / "ce.json").write_text(json.dumps(event))
        published = await _mesh(
            ["publish", "release.proposed", "@ce.json", "--tenant", "acme"], env, tmp_path
        )
        assert published.returncode == OK and published.stdout.strip() == "ce-tenant", published
        seen = await mesh.event("release.proposed", where=lambda e: e.id == "ce-tenant")
        assert seen.tenant == "acme"
