"""llmkit's HTTP server: an OpenAI-compatible API over the continuous-batching engine.

``create_app(llm, config=ServerConfig(...))`` gives the ASGI app; ``serve(...)`` runs it with uvicorn,
loading the model in the background (``/ready`` says when it is loaded) and draining requests in
flight on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import sys

from llmkit.server.app import create_app
from llmkit.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve", "serving_executor"]

# How long a thread running Python code keeps the interpreter's lock while another waits for it.
# Requests' CPU work in Python (parsing large bodies, chat templates) runs on worker threads; the
# event loop needs the lock back several times to answer even /health, and with a few such
# threads at the interpreter's default (5 ms) each of those waits can stretch to tens of ms.
SWITCH_INTERVAL_S = 0.001


def serving_executor(executor: str, dtype: str | None) -> tuple[str, str | None]:
    """What the server runs: the same default configuration as ``llmkit.load`` (GGUF files on
    llmkit's block kernels, other models in float32, or what ``--executor``/``--dtype`` ask for)."""
    return executor, dtype


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, quantize: str = "none",
          executor: str = "auto", dtype: str | None = None, config: ServerConfig | None = None,
          log_level: str = "info", prefix_cache: bool | int = True, speculative: bool = True,
          adapters: dict[str, str] | None = None) -> int:
    """Load ``model`` (in a background thread) and serve it until SIGTERM/SIGINT; return an exit code.

    On the signal the server stops accepting connections, answers /ready with 503, and gives the
    requests in flight ``config.drain_timeout`` seconds to finish before cancelling them.
    """
    import dataclasses
    import logging

    import uvicorn

    config = dataclasses.replace(config or ServerConfig(model_name=model), host=host)
    executor, dtype = serving_executor(executor, dtype)
    failed: list[BaseException] = []

    def load():
        import llmkit

        return llmkit.load(model, quantize=quantize, executor=executor, dtype=dtype, max_batch=config.max_batch,
                           prefix_cache=prefix_cache, speculative=speculative, adapters=adapters, progress=False)

    server: uvicorn.Server | None = None

    def load_failed(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(config=config, loader=load, on_load_error=load_failed)
    logging.getLogger("llmkit.server").setLevel(log_level.upper())
    if not logging.getLogger("llmkit.server").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logging.getLogger("llmkit.server").addHandler(handler)
    state = app.state.llmkit

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # first signal: drain (readiness 503 at once)
            state.draining = True
            super().handle_exit(sig, frame)

    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                               timeout_graceful_shutdown=max(1, int(config.drain_timeout)),
                               timeout_keep_alive=5,
                               # uvicorn counts the connection asking too: max_connections + 1 refuses the next
                               limit_concurrency=config.max_connections + 1)
    server = _Server(uv_config)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        server.run()
    finally:
        sys.setswitchinterval(switch)
    if failed:
        raise failed[0]
    return 0
