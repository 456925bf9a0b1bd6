"""Running the service as a process: build it, serve until a signal, drain,
and exit with a code that says how it went.

Exit codes: 0 after a clean stop; 1 when the workers could not load the
model; 2 when the configuration is unusable (a StartupError: one log line
naming the file, port or setting). The first SIGTERM or SIGINT drains (see
service.app); a second cuts the grace period short. Signal handlers only set
events.
"""

from __future__ import annotations

import asyncio
import signal

import structlog

import service
from service.app import StartupError, build
from service.pool import Launcher, WorkerLoadError
from service.settings import Settings, summary
from workers.logs import configure_logging

log = structlog.get_logger("server")


def run(settings: Settings, launcher: Launcher | None = None) -> int:
    """Serve until told to stop; returns the process's exit code."""
    configure_logging(settings.log_format, settings.log_level)
    try:
        return asyncio.run(_serve(settings, launcher))
    except StartupError as exc:
        log.error("startup_failed", error=str(exc))
        return 2


async def _serve(settings: Settings, launcher: Launcher | None) -> int:
    log.info("starting", version=service.__version__, settings=summary(settings))
    app = build(settings, launcher)
    stop, force = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: force.set() if stop.is_set() else stop.set())

    await app.start()
    exit_code = 0
    ready = asyncio.create_task(app.ready())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([ready, stopping], return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        try:
            ready.result()
            await stopping
        except WorkerLoadError as exc:
            log.error("startup_failed", error=str(exc))
            exit_code = 1
    else:
        ready.cancel()
    await app.shutdown(force)
    log.info("stopped", exit_code=exit_code)
    return exit_code
