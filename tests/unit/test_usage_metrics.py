"""The model metrics: cost priced by `providers.price_of` (the prices budgets use), and what was
masked counted on the mesh's own instruments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh import telemetry
from mesh.providers import price_of
from mesh.redact import Redactor


class Recorder:
    """A Counter that remembers what was added."""

    def __init__(self) -> None:
        self.added: list[tuple[float, dict[str, Any]]] = []

    def add(self, amount: float, attributes: dict[str, Any] | None = None) -> None:
        self.added.append((amount, dict(attributes or {})))


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> telemetry.Meters:
    fake = telemetry.Meters(**{n: Recorder() for n in telemetry.Meters.__annotations__})  # type: ignore[arg-type]
    monkeypatch.setattr(telemetry, "_meters", fake)
    return fake


def test_cost_uses_the_models_file_price(
    recorded: telemetry.Meters, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[prices."house-model"]\ninput_per_mtok = 2.0\noutput_per_mtok = 10.0\n')
    monkeypatch.setenv("MESH_MODELS_FILE", str(path))
    telemetry.record_usage("house-model", 1_000_000, 100_000)
    cost = recorded.cost.added  # type: ignore[attr-defined]
    assert cost == [(pytest.approx(2.0 + 1.0), {"model": "house-model"})]


def test_cost_is_recorded_with_no_price_set_from_the_shipped_table(
    recorded: telemetry.Meters,
) -> None:
    # Before: with MESH_PRICE_* unset, no cost was recorded while budgets charged the table.
    telemetry.record_usage("claude-sonnet-5-5", 1000, 500)
    price_in, price_out = price_of("claude-sonnet-5-5")
    cost = recorded.cost.added  # type: ignore[attr-defined]
    assert cost == [
        (pytest.approx((1000 * price_in + 500 * price_out) / 1e6), {"model": "claude-sonnet-5-5"})
    ]
    assert cost[0][0] > 0


def test_redactions_are_counted_on_the_mesh_meters(recorded: telemetry.Meters) -> None:
    Redactor(fields=["$.name"], detectors=["email"]).mask(
        {"name": "Ada", "note": "write to ada@example.org"}, agent="triage"
    )
    added = sorted(recorded.redactions.added, key=lambda a: a[1]["kind"])  # type: ignore[attr-defined]
    assert added == [
        (1, {"agent": "triage", "kind": "email"}),
        (1, {"agent": "triage", "kind": "field"}),
    ]
