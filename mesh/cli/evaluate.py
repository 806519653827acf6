"""`mesh eval`: run a labelled dataset against a live agent or a policy and report agreement, a
confusion table, latency and usage (`coordinator.evaluate`); `mesh eval-export`: past decisions
as a dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from mesh.cli._common import EXIT_FAILED, JsonOption, command, err, out, print_json
from mesh.errors import ConfigError

if TYPE_CHECKING:
    from coordinator.evaluate import Report


@command
async def evaluate(
    dataset: Annotated[Path, typer.Argument(help='JSONL: {"data": …, "expected": …} a line.')],
    *,
    agent: Annotated[str, typer.Option(help="Evaluate this live agent.")] = "",
    policy: Annotated[
        str, typer.Option(help="Evaluate the policy of this event type (all its voters).")
    ] = "",
    baseline: Annotated[
        str, typer.Option(help="Compare with this agent (or policy) on the same cases.")
    ] = "",
    skill: Annotated[str, typer.Option(help="The skill to ask (default: the card's first).")] = "",
    policies: Annotated[
        Path | None, typer.Option(help="Policies file (default: the coordinator's).")
    ] = None,
    min_agreement: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Exit 1 when agreement is below this (0..1)."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per call.")] = 10.0,
    concurrency: Annotated[int, typer.Option(min=1, max=64)] = 4,
    json_out: JsonOption = False,
) -> None:
    """Run a labelled dataset against an agent or a policy: agreement, confusion, latency, usage."""
    from coordinator import evaluate as ev
    from coordinator import policy as policy_mod
    from mesh.bus import Bus

    if bool(agent) == bool(policy):
        raise ConfigError("give one of --agent NAME or --policy EVENT_TYPE")
    cases = ev.load(dataset)
    async with (
        await Bus.connect(name="mesh-eval") as bus,
        ev.Evaluator(bus, timeout_s=timeout, concurrency=concurrency) as runner,
    ):
        if agent:
            reports = [await runner.agent(agent, cases, skill=skill)]
            if baseline:
                reports.append(await runner.agent(baseline, cases, skill=skill, labels=agent))
        else:
            loaded = policy_mod.load(policies)
            reports = []
            for name in filter(None, (policy, baseline)):
                found = loaded.get(name)
                if found is None:
                    raise ConfigError(
                        f"no policy for {name!r} in {loaded.source}",
                        hint=f"known: {', '.join(sorted(loaded.by_type)) or 'none'}",
                    )
                reports.append(await runner.policy(name, found, cases))
    main = reports[0]
    doc: dict[str, Any] = {"dataset": str(dataset), **main.to_json()}
    if len(reports) > 1:
        doc["baseline"] = reports[1].to_json()
        doc["comparison"] = ev.side_by_side(main, reports[1])
    if json_out:
        print_json(doc)
    else:
        for report in reports:
            _print(report)
        if len(reports) > 1:
            _print_differences(doc["comparison"], main.target, reports[1].target)
    agreement = main.agreement
    if min_agreement is not None and (agreement is None or agreement < min_agreement):
        shown = "n/a" if agreement is None else f"{agreement:.1%}"
        err.print(f"agreement {shown} is below --min-agreement {min_agreement:.1%}")
        raise typer.Exit(EXIT_FAILED)


def _print(report: Report) -> None:
    agreement = report.agreement
    shown = "n/a (no labels)" if agreement is None else f"{agreement:.1%}"
    out.print(
        f"[bold]{escape(report.target)}[/]: {len(report.results)} cases, "
        f"{len(report.labelled)} labelled, agreement {shown}"
    )
    confusion = report.confusion()
    gots = sorted({g for row in confusion.values() for g in row})
    table = Table("expected \\ got", *gots, title="confusion")
    for expected, row in confusion.items():
        table.add_row(expected, *(str(row.get(g, 0)) for g in gots))
    out.print(table)
    lat = report.latency()
    usage = report.usage()
    out.print(
        f"latency ms p50 {lat.get('p50', 0):.0f}, p95 {lat.get('p95', 0):.0f}, "
        f"max {lat.get('max', 0):.0f}; tokens in {usage['input_tokens'] or 0}, "
        f"out {usage['output_tokens'] or 0}; cost "
        + ("not reported" if usage["cost_usd"] is None else f"${usage['cost_usd']:.4f}")
    )
    wrong = [r for r in report.labelled if r.got != r.expected]
    if wrong:
        table = Table("case", "expected", "got", "error", title="disagreements")
        for r in wrong:
            table.add_row(escape(r.case), str(r.expected), r.got, escape(r.error[:80]))
        out.print(table)


def _print_differences(comparison: dict[str, Any], one: str, other: str) -> None:
    between = comparison["agreement_between"]
    shown = "n/a" if between is None else f"{between:.1%}"
    out.print(f"{escape(one)} vs {escape(other)}: same answer on {shown} of the cases")
    if comparison["differences"]:
        table = Table("case", "expected", one, other, title="where they differ")
        for d in comparison["differences"]:
            table.add_row(escape(d["case"]), str(d["expected"]), d[one], d[other])
        out.print(table)


@command
async def export(
    output: Annotated[Path, typer.Argument(help="Where to write the JSONL dataset.")],
    *,
    tenant: Annotated[str, typer.Option(help="Only this tenant's decisions.")] = "",
    limit: Annotated[int, typer.Option(min=1)] = 1000,
) -> None:
    """Write past decisions, with the events they decided, as a dataset for `mesh eval`."""
    from coordinator.evaluate import export_decisions
    from mesh.bus import Bus

    async with await Bus.connect(name="mesh-eval") as bus:
        lines = await export_decisions(bus, tenant=tenant or None, limit=limit)
    output.write_text("".join(json.dumps(line, default=str) + "\n" for line in lines))
    out.print(f"{len(lines)} decision(s) written to {output}")
