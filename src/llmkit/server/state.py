"""What one app shares between its routes: the model (through ``LLM``, the one door into the
engine), readiness, metrics, the plugins' middleware, and the thread pools that keep CPU work
off the event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import Request

from llmkit.server.config import ServerConfig
from llmkit.server.errors import APIError
from llmkit.server.hooks import Middleware
from llmkit.server.metrics import Metrics
from llmkit.server.offload import Offload, lower_priority
from llmkit.server.responses_store import ResponseStore

log = logging.getLogger("llmkit.server")

# Workers that render chat templates, tokenize and parse large bodies. One: most of that work holds
# the interpreter's lock (JSON and pydantic parse a whole body in one go), so a second worker adds
# no speed, only a second thread the event loop must wait for; what it cannot take at once waits
# its turn off the loop.
PREP_WORKERS = 1


@dataclass
class ServerState:
    config: ServerConfig
    middleware: Middleware
    llm: Any = None
    load_error: str | None = None
    draining: bool = False
    started: float = field(default_factory=time.time)
    metrics: Metrics = field(init=False)
    offload: Offload = field(init=False)
    responses: ResponseStore = field(init=False)  # answers of POST /v1/responses kept for later turns
    runs: set = field(default_factory=set)  # this server's requests in the engine (see running.Run)
    inbox: Any = None  # running.Inbox: engine events on their way into this server's event loop
    _pool: ThreadPoolExecutor | None = None

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.llm.engine if self.llm is not None else None)
        self.offload = Offload(self.config.max_queue, self.metrics)
        self.responses = ResponseStore(self.config.max_stored_responses)

    @property
    def ready(self) -> bool:
        return self.llm is not None and not self.draining

    def attach(self, llm) -> None:
        """Serve this loaded model: its engine, with the server's batch and queue bounds."""
        llm.set_limits(max_batch=self.config.max_batch, max_queue=self.config.max_queue)
        if getattr(llm, "executor_name", "torch") == "llama.cpp":
            log.info("embeddings run llmkit's own torch model beside llama.cpp: it is read (in float32) on "
                     "the first such request")
        self.llm = llm

    def need_model(self):
        """The LLM, or a 503 that says why there is none yet."""
        if self.draining:
            raise APIError(503, "The server is shutting down and takes no new requests.",
                           code="shutting_down", headers={"Retry-After": "5"})
        if self.llm is None:
            if self.load_error:
                raise APIError(503, f"The model failed to load: {self.load_error}", code="model_load_failed")
            raise APIError(503, "The model is still loading; retry in a few seconds (GET /ready says when).",
                           code="model_loading", headers={"Retry-After": "5"})
        return self.llm

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base model), or a 404."""
        config = self.config
        if name in (None, "", config.model_name) or name in config.aliases:
            return None
        if self.llm is not None and name in self.llm.adapters:
            return name
        served = [config.model_name, *(self.llm.adapters if self.llm is not None else [])]
        raise APIError(404, f"The model {name!r} is not served here; this server runs {', '.join(map(repr, served))} "
                            "(GET /v1/models).", param="model", code="model_not_found")

    async def prep(self, fn: Callable, *args):
        """``fn(*args)`` on a preparation worker: template rendering, tokenizing, parsing."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(PREP_WORKERS, thread_name_prefix="llmkit-prep", initializer=lower_priority)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def drain(self, timeout: float) -> None:
        """On shutdown: let this server's requests in flight finish for up to ``timeout`` s, then
        cancel the rest. The engine itself belongs to the LLM and may serve others: it stays."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while any(not h.done for run in list(self.runs) for h in run.handles) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for run in list(self.runs):
            run.cancel()
        self.offload.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def state_of(request: Request) -> ServerState:
    return request.app.state.llmkit
