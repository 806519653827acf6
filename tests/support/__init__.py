"""Shared support for the suites that run a mesh (e2e, faults, chaos) and for the benchmarks.

- `waits`     one bounded `eventually` (async) and `wait_for` (sync); `all_alive` checks.
- `samples`   release samples and events, cards, policy files, the test voting agent.
- `voter`     `python -m tests.support.voter`: that voting agent as an OS process.
- `launcher`  `ProcessMesh` (coordinator and agent processes on `mesh.dev.launcher.Topology`)
              and `Cluster` (a local 3-node NATS cluster to kill, pause and restart).
- `outcomes`  `Outcomes`: every decision and dead letter, read once each by stream sequence;
              `Publisher` (paced load), `settled`, the ledger checks.

`mesh.testing` is the user-facing kit (in-process); this package is for our own suites. Nothing
is imported here, so `python -m tests.support.voter` stays light.
"""
