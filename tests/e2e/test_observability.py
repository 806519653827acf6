"""Observability of a running mesh: `mesh trace` prints a decision's tree, the coordinator's
/metrics counts decisions, `mesh audit verify` checks the chain, `mesh status` answers."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from mesh.server import free_port
from tests.e2e.procs import start_mesh_up
from tests.support.samples import sample_path
from tests.support.waits import wait_for

pytestmark = pytest.mark.e2e


def test_trace_metrics_audit_and_status_of_a_running_mesh(tmp_path: Path) -> None:
    port = free_port()
    up = start_mesh_up(tmp_path, MESH_TRACE_STREAM="1", MESH_METRICS_PORT=str(port))
    try:
        ids = []
        for kind in ("clean", "secret"):
            ran = up.mesh("publish", "release.proposed", f"@{sample_path(kind)}")
            assert ran.returncode == 0, ran
            ids.append(ran.stdout.strip())

        def decided() -> bool:
            ran = up.mesh("decisions", "--json")
            return ran.returncode == 0 and all(i in ran.stdout for i in ids)

        wait_for(decided, "both decisions", timeout=30)

        # The spans of all processes reach the stream within the exporters' batch delay.
        def traced() -> bool:
            ran = up.mesh("trace", ids[1])
            return ran.returncode == 0 and ran.stdout.count("invoke_agent") >= 6

        wait_for(traced, "a full trace", timeout=30)
        tree = up.mesh("trace", ids[1]).stdout
        print(tree)
        assert "rejected" in tree.splitlines()[0]
        assert "process mesh.evt.default.release.proposed" in tree
        for agent in ("security-review", "compliance-review", "quality-review"):
            assert f"invoke_agent {agent}" in tree
        assert "execute_tool review" in tree  # the rules brain's span, under each agent

        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        metrics = body.decode()
        assert "mesh_decisions_total" in metrics
        assert 'outcome="approved"' in metrics and 'outcome="rejected"' in metrics
        assert "mesh_agent_call_duration_seconds_bucket" in metrics

        verify = up.mesh("audit", "verify")
        assert verify.returncode == 0 and "verified" in verify.stdout, verify
        status = up.mesh("status")
        assert status.returncode == 0 and "event(s) in flight" in status.stdout, status
        listed = json.loads(up.mesh("audit", "ls", "--json").stdout)
        assert {r["kind"] for r in listed} >= {"decision", "policy_change"}
        # One record per decision, its votes inside (issue 14).
        assert all(r["data"]["votes"] for r in listed if r["kind"] == "decision"), listed
        up.assert_running()
    finally:
        up.stop()
