"""`pagoda serve`: uvicorn around the app, with a draining shutdown.

On SIGTERM/SIGINT the server stops taking work (503, ``/health`` says draining),
lets in-flight requests finish for up to ``shutdown_timeout`` seconds, then exits;
the app's lifespan stops and reaps the engine process. A second signal exits at once.
Exit codes: 0 after a normal shutdown, 1 when the server could not start or the engine
core kept dying (a supervisor should restart it), 2 when the model or settings are refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import uvicorn

from pagoda.config import EngineConfig
from pagoda.engine.frontend.core_client import EngineClient
from pagoda.engine.frontend.errors import EngineConfigError
from pagoda.server.app import create_app

logger = logging.getLogger("pagoda.serve")
DRAIN_POLL_S = 0.05


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine_config: EngineConfig, app: Any) -> None:
        super().__init__(config)
        self.engine_config = engine_config
        self.pagoda_app = app
        self._drain_started = False
        self.engine_gave_up = False
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            sc = self.engine_config.server_config
            host = self.config.host
            port = self.servers[0].sockets[0].getsockname()[1] if self.servers else sc.port
            self.pagoda_app.state.pagoda.client.on_gave_up = self._engine_gave_up
            print(f"Pagoda is serving {self.engine_config.model_config.model} at http://{host}:{port} "
                  f"(OpenAI API at http://{host}:{port}/v1, chat page at http://{host}:{port}/)", flush=True)

    def _engine_gave_up(self, reason: str) -> None:
        logger.error("exiting: %s", reason)
        self.engine_gave_up = True
        self.should_exit = True

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._drain_started or self.loop is None:
            self.force_exit = True
            self.should_exit = True
            return
        self._drain_started = True
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        state = self.pagoda_app.state.pagoda
        state.draining = True
        timeout = self.engine_config.server_config.shutdown_timeout
        deadline = time.monotonic() + timeout
        logger.info("draining: waiting up to %.0f s for %d sequences", timeout, state.client.num_unfinished)
        while state.client.num_unfinished > 0 and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if state.client.num_unfinished:
            logger.warning("shutdown timeout: %d sequences did not finish", state.client.num_unfinished)
        self.should_exit = True


def serve(config: EngineConfig, log_level: str = "info", client: EngineClient | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    client = client or EngineClient(config)
    app = create_app(config, client)
    sc = config.server_config
    uv_config = uvicorn.Config(app, host=sc.host, port=sc.port, log_level=log_level, lifespan="on",
                               timeout_graceful_shutdown=max(1, int(sc.shutdown_timeout)))
    server = DrainingServer(uv_config, config, app)
    try:
        server.run()
    except SystemExit:  # uvicorn's own exit when the app's startup failed; the codes are ours
        pass
    finally:
        client.kill()
    if not server.started and isinstance(client.start_error, EngineConfigError):
        raise client.start_error  # the CLI prints it and exits 2
    return 0 if server.started and not server.engine_gave_up else 1
