"""Running a coordinator process until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from coordinator import policy as policies
from coordinator.dlq import AdvisoryDeadLetters
from coordinator.service import Coordinator
from mesh import telemetry
from mesh._internal.loop import run as run_loop
from mesh.bus import Bus
from mesh.errors import MeshError, exit_code
from mesh.settings import get_settings

log = logging.getLogger(__name__)


async def serve(stop: asyncio.Event | None = None) -> None:
    settings = get_settings()
    stop = stop or asyncio.Event()
    loaded = policies.load(settings.policy_file)
    telemetry.setup("mesh-coordinator")
    if settings.metrics_port >= 0:
        port = telemetry.serve_metrics(settings.metrics_port, settings.metrics_host)
        log.info("metrics on http://%s:%s/metrics", settings.metrics_host, port)
    async with await Bus.connect(name="coordinator", settings=settings) as bus:
        await bus.ensure()
        await telemetry.keep_spans_in_jetstream(bus)
        # Every coordinator also turns JetStream's give-up advisories (max deliveries,
        # terminated) into dead letters; a queue group makes each advisory handled once.
        coordinator = Coordinator(bus, loaded)
        async with AdvisoryDeadLetters(bus, outlet=coordinator):
            await coordinator.run(stop)


def main() -> None:
    from mesh._internal.logs import configure_process

    configure_process()

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    try:
        # On uvloop unless MESH_UVLOOP=0: the loop was ~15 % of a decision's CPU (bench/README.md).
        run_loop(_main(), uvloop=get_settings().uvloop)
    except MeshError as e:
        log.error("%s", e)
        raise SystemExit(exit_code(e)) from None  # 5 with no NATS server, 3 for configuration
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were in place: no traceback
        raise SystemExit(130) from None
