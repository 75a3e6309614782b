"""The ASGI app: ``create_app`` assembles the routers (``llmkit.server.routes``), the guard and
CORS in front of them, the error handlers, plugins' routes and the model's loading.

Every choice of every request goes into the engine through ``LLM`` (``llm.requests`` builds them,
``llm.submit`` queues them); the engine calls back on its own thread, and ``running.Run`` hands
the events to the event loop. The engine batches all running requests into one forward per step
(continuous batching), so concurrent clients share each step's cost.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI

from llmkit.server import errors, memory, openapi
from llmkit.server.auth import Guard
from llmkit.server.bodies import read_json
from llmkit.server.config import ServerConfig
from llmkit.server.hooks import Middleware, add_plugin_routes, plugged
from llmkit.server.routes import ROUTERS
from llmkit.server.state import ServerState

log = logging.getLogger("llmkit.server")

__all__ = ["ServerConfig", "ServerState", "create_app"]


def create_app(llm=None, *, config: ServerConfig | None = None, loader: Callable[[], Any] | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The ASGI app. Pass a loaded ``llm``, or a ``loader`` that returns one: it runs in a thread
    at startup, and until it returns ``/ready`` and the model routes answer 503."""
    config = config or ServerConfig()
    state = ServerState(config, Middleware(plugged("middleware")))
    if llm is not None:
        state.attach(llm)

    def load() -> None:
        try:
            # the OpenAPI document is built at startup: its first build walks every route's
            # models, long enough to stall the event loop if a client asked for it first
            app.openapi()
            state.attach(loader())
            memory.freeze_startup()
            log.info("model %s loaded; ready", config.model_name)
        except BaseException as exc:  # noqa: BLE001 - reported through /ready and the callback
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.error("could not load the model: %s", state.load_error)
            if on_load_error is not None:
                on_load_error(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tuned = memory.tune_allocator()  # before the model's tensors and the server's threads
        if tuned:
            log.debug("allocator settings: %s", tuned)
        trim = asyncio.create_task(memory.IdleTrim(lambda: state.llm.engine if state.llm is not None else None).run())
        if state.llm is None and loader is not None:
            threading.Thread(target=load, name="llmkit-load", daemon=True).start()
        elif state.llm is not None:
            app.openapi()
            memory.freeze_startup()
        try:
            yield
        finally:
            trim.cancel()
            memory.thaw()
        await state.drain(config.drain_timeout)

    app = FastAPI(title="llmkit", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API over llmkit's continuous-batching engine.")
    app.state.llmkit = state
    app.state.metrics = state.metrics
    errors.install(app)
    # the guard first, CORS after it: the last added is the outermost, so that every answer,
    # the guard's refusals included, carries CORS headers for an allowed origin
    app.add_middleware(Guard, config=config)
    if config.allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.allow_origins), allow_methods=["*"],
                           allow_headers=["*"])
    for router in ROUTERS:
        app.include_router(router)
    add_plugin_routes(app, plugged("routes"), read_json)
    app.openapi = lambda: openapi.document(app)
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("llmkit")
    except Exception:  # pragma: no cover
        return "0"
