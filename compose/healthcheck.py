"""Container healthchecks for mesh processes (copied into the image as /app/healthcheck.py).

    python /app/healthcheck.py agent [NAME]   # the agent's A2A card answers on MESH_HTTP_PORT
    python /app/healthcheck.py coordinator    # NATS and JetStream answer, the durable exists
    python /app/healthcheck.py relay          # the same for the schedule relay's durable

Exit 0 when healthy, 1 otherwise, with one line saying why (`docker inspect` shows it).
Standard library plus nats-py (already in the image); configuration only from the environment,
like every mesh process.

The agent check is a real per-process check: the agent's own HTTP server must answer. The
coordinator serves no HTTP, so its check proves what this container needs (its NATS cluster is
reachable, JetStream answers, the shared `coordinator` durable consumer exists) — it is a
liveness check of the coordinator's dependencies, not proof that this very process is pulling.
The schedule relay (`mesh schedules run`) serves no HTTP either: its check is the same, for its
`schedule-relay` durable on MESH_SCHEDULES.
It connects as the container's own identity (MESH_IDENTITY: its nkey and its reply inboxes),
as the coordinator itself does; the servers admit nobody else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import urllib.error
import urllib.request

CARD_PATH = "/.well-known/agent-card.json"
# Same names as mesh.subjects (EVENTS_STREAM, COORDINATOR_DURABLE); kept literal so the check
# needs nothing of the mesh but nats-py, and tests/unit/test_compose.py pins them to mesh's.
EVENTS_STREAM = "MESH_EVENTS"
COORDINATOR_DURABLE = "coordinator"
SCHEDULES_STREAM = "MESH_SCHEDULES"
RELAY_DURABLE = "schedule-relay"
# What each NATS-only process needs to exist: (stream, durable consumer).
DURABLES = {
    "coordinator": (EVENTS_STREAM, COORDINATOR_DURABLE),
    "relay": (SCHEDULES_STREAM, RELAY_DURABLE),
}
INBOX_ROOT = "_INBOX"  # an identity's inboxes: _INBOX.<first 16 of its public nkey, lower>


def nats_identity(path: str | None) -> dict[str, str]:
    """nats-py options to connect as the identity file at `path` (none: anonymous, which the
    mesh's servers refuse)."""
    if not path:
        return {}
    import nkeys

    with open(path, "rb") as f:
        seed = str(json.load(f)["nats_seed"])
    public = nkeys.from_seed(seed.encode()).public_key.decode()
    return {"nkeys_seed_str": seed, "inbox_prefix": f"{INBOX_ROOT}.{public[:16].lower()}"}


def check_agent(port: int, name: str | None = None, *, timeout: float = 3.0) -> str | None:
    """None when the agent's card answers on 127.0.0.1:port (named `name`, if given)."""
    url = f"http://127.0.0.1:{port}{CARD_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        return f"{url} answered HTTP {e.code}"
    except (OSError, ValueError) as e:
        return f"{url} did not answer: {e}"
    try:
        card = json.loads(body)
    except ValueError:
        return f"{url} did not return JSON"
    if not isinstance(card, dict) or not card.get("name"):
        return f"{url} returned no agent card"
    if name and card["name"] != name:
        return f"{url} serves card {card['name']!r}, expected {name!r}"
    return None


async def check_coordinator(
    servers: list[str], *, timeout: float = 4.0, identity: str | None = None
) -> str | None:
    """None when NATS answers (to `identity`), JetStream is enabled and the coordinator
    durable exists."""
    return await check_durable(servers, "coordinator", timeout=timeout, identity=identity)


async def check_durable(
    servers: list[str], process: str, *, timeout: float = 4.0, identity: str | None = None
) -> str | None:
    """None when NATS answers (to `identity`), JetStream is enabled and the durable consumer
    `process` (a key of DURABLES) works through exists."""
    import nats
    from nats.js.errors import NotFoundError

    stream, durable = DURABLES[process]
    if not servers:
        return "MESH_NATS_URL is not set"
    errors: list[Exception] = []

    async def remember(e: Exception) -> None:  # instead of nats-py's traceback per attempt
        errors.append(e)

    try:
        auth = nats_identity(identity)
    except (OSError, ValueError, KeyError) as e:
        return f"cannot read the identity file {identity}: {e}"
    try:
        # nats-py keeps retrying a first connect that fails, so the overall timeout bounds it.
        nc = await asyncio.wait_for(
            nats.connect(
                servers=servers,
                name="healthcheck",
                connect_timeout=2,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                error_cb=remember,
                **auth,  # type: ignore[arg-type]
            ),
            timeout=timeout,
        )
    except Exception as e:
        cause = errors[-1] if errors else e
        why = str(cause) or type(cause).__name__
        return f"cannot connect to NATS at {','.join(servers)}: {why}"
    try:
        js = nc.jetstream(timeout=timeout)
        await js.account_info()
        await js.consumer_info(stream, durable)
    except NotFoundError:
        return f"no {durable!r} consumer on {stream} yet"
    except Exception as e:
        return f"JetStream did not answer: {e or type(e).__name__}"
    finally:
        # Closing a half-open connection must not turn a healthy answer into a sick one.
        with contextlib.suppress(Exception):
            await nc.close()
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("agent", *DURABLES):
        sys.stderr.write("usage: healthcheck.py agent [NAME] | coordinator | relay\n")
        return 2
    if args[0] == "agent":
        port = int(os.environ.get("MESH_HTTP_PORT") or "0")
        if port <= 0:
            problem: str | None = "MESH_HTTP_PORT must be a fixed port for the healthcheck"
        else:
            problem = check_agent(port, args[1] if len(args) > 1 else None)
    else:
        servers = [u.strip() for u in os.environ.get("MESH_NATS_URL", "").split(",") if u.strip()]
        identity = os.environ.get("MESH_IDENTITY") or None
        problem = asyncio.run(check_durable(servers, args[0], identity=identity))
    if problem:
        sys.stderr.write(f"unhealthy: {problem}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
