"""Serving on Ray Serve: the app of ``llmkit serve``, one engine per replica, over one machine or many.

``ray_app(model, replicas=2)`` returns a Ray Serve application; ``serve.run(...)`` deploys it, or
``run_on_ray(...)`` (what ``llmkit serve --ray`` calls) starts or joins Ray, deploys it and serves
until interrupted. Each replica is a Ray actor that loads the model once, in its constructor, so
that Serve routes nothing to it before the model is in memory; it then serves the very app that
``create_app`` builds for the single-process server (every route, the key, the queue bounds,
the page), reaching the engine through ``LLM`` as that app always does.

Routing is Ray Serve's default: of two replicas picked at random, the one with fewer requests in
flight. Ray's prefix-aware router (``PrefixCacheAffinityRouter``) is not used: it reads the prompt
from the arguments of a handle call, while an ingress deployment receives the raw HTTP request,
whose body the router never sees; and its public home, ``ray.serve.llm``, refuses to import
without vLLM or SGLang.

``/metrics`` through the proxy shows every replica's llmkit metrics, each sample labelled with its
``replica``: replicas push their metrics to a small ``LLMKitMetrics`` deployment every second, and
the replica that answers ``/metrics`` merges what it holds. Ray Serve's own metrics (requests,
latencies, replicas) are on Ray's Prometheus endpoint, as for any Serve application.

A replica that dies is replaced by Serve. The requests it held fail; ``ProxyErrors``, a middleware
of Serve's HTTP proxy, gives them llmkit's error shape (an OpenAI error body, or an error event
then ``[DONE]`` on a stream that had started) instead of a bare 500 or a cut connection. Serve
takes proxy middleware only from a function named in an environment variable of the processes
Ray starts (``PROXY_CALLBACK_VAR``): ``llmkit serve --ray`` sets it for the local Ray instance it
starts; on a cluster, set it where ``ray start`` runs (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

from ray import serve

from llmkit.server.config import ServerConfig

log = logging.getLogger("llmkit.server")

SERVER = "LLMKitServer"  # the deployment that runs the model
METRICS = "LLMKitMetrics"  # the deployment that gathers the replicas' metrics
PUSH_EVERY = 1.0  # seconds between a replica's metrics pushes
FORGET_AFTER = 10.0  # a replica not heard from for this long is gone (dead or scaled down)


def ray_app(model: str, *, replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None,
            threads_per_replica: int = 1, config: ServerConfig | None = None,
            target_ongoing_requests: float | None = None, **load_options: Any):
    """A Ray Serve application that serves ``model`` with llmkit's OpenAI-compatible app.

    ``replicas``: a fixed number of replicas; or ``min_replicas`` and ``max_replicas`` to let Serve
    scale between them on the requests in flight per replica (``target_ongoing_requests``, by
    default the engine's batch size: a replica whose batch is full asks for another).
    ``threads_per_replica``: the CPUs each replica reserves and the torch threads it runs.
    ``config``: the server's settings (key, queue bounds, limits), the same on every replica.
    ``load_options``: passed to ``llmkit.load`` (quantize, executor, dtype, prefix_cache, ...).

        from ray import serve
        from llmkit.server.ray_app import ray_app
        serve.run(ray_app("smollm2-135m-instruct", replicas=2), route_prefix="/")
    """
    from llmkit.errors import LLMKitError

    config = config or ServerConfig(model_name=str(model))
    if threads_per_replica < 1:
        raise LLMKitError("threads_per_replica must be at least 1")
    autoscaling = min_replicas is not None or max_replicas is not None
    if autoscaling:
        low = 1 if min_replicas is None else min_replicas
        high = max(low, 1) if max_replicas is None else max_replicas
        if low < 0 or high < max(low, 1):
            raise LLMKitError(f"replicas from {low} to {high}: give 0 <= min_replicas <= max_replicas, "
                              "max_replicas at least 1")
        scaling: dict[str, Any] = {"autoscaling_config": {
            "min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
            "target_ongoing_requests": target_ongoing_requests or config.max_batch}}
    else:
        if replicas < 1:
            raise LLMKitError("replicas must be at least 1 (or give min_replicas and max_replicas)")
        scaling = {"num_replicas": replicas}
    # what one replica admits at once: its batch plus its queue; beyond that the proxy holds them
    admits = config.max_batch + (config.max_queue if config.max_queue is not None else 1024)
    server = serve.deployment(
        LLMKitServer, name=SERVER, max_ongoing_requests=admits,
        ray_actor_options={"num_cpus": threads_per_replica,
                           "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads_per_replica)}}},
        # a replica that is stopped (scaled down, redeployed) lets its requests finish first
        graceful_shutdown_timeout_s=config.drain_timeout + 5,
        **scaling)
    hub = serve.deployment(MetricsHub, name=METRICS, num_replicas=1, ray_actor_options={"num_cpus": 0},
                           logging_config={"enable_access_log": False})  # a push a second per replica
    return server.bind(str(model), config, threads_per_replica, load_options, hub.bind())


@serve.ingress()
class LLMKitServer:
    """One replica: the model loaded once, then ``create_app``'s app over it."""

    async def __init__(self, model: str, config: ServerConfig, threads: int, load_options: dict, hub) -> None:
        import torch

        torch.set_num_threads(threads)
        self.config = config
        self.hub = hub
        self.replica = serve.get_replica_context().replica_tag
        options = {"max_batch": config.max_batch, "progress": False, **load_options}
        # a replica counts as started only when this returns: Serve sends it nothing before
        self.llm = await asyncio.get_running_loop().run_in_executor(None, _load, model, options)
        self.asgi = None
        self._pushing = asyncio.get_running_loop().create_task(self._push_metrics())
        log.info("replica %s: model %s loaded (%d threads)", self.replica, model, threads)

    def __serve_build_asgi_app__(self):
        from llmkit.server.app import create_app

        self.asgi = create_app(self.llm, config=self.config)
        _serve_merged_metrics(self.asgi, self)
        return self.asgi

    def check_health(self) -> None:
        """Serve calls this now and then; raising makes it replace the replica."""
        state = self.asgi.state.llmkit if self.asgi is not None else None
        if state is not None and state.llm is None:
            raise RuntimeError("the replica has no model")

    def own_metrics(self) -> str:
        return self.asgi.state.metrics.render().decode() if self.asgi is not None else ""

    async def _push_metrics(self) -> None:
        while True:
            try:
                await self.hub.push.remote(self.replica, self.own_metrics())
            except Exception as exc:  # noqa: BLE001 - the hub restarts; metrics must not kill serving
                log.debug("metrics push failed: %s", exc)
            await asyncio.sleep(PUSH_EVERY)


def _load(model: str, options: dict):
    import llmkit

    return llmkit.load(model, **options)


class MetricsHub:
    """The latest metrics text of every replica, by replica id."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[float, str]] = {}

    def push(self, replica: str, text: str) -> None:
        self.latest[replica] = (time.monotonic(), text)

    def collect(self) -> dict[str, str]:
        now = time.monotonic()
        self.latest = {r: (t, text) for r, (t, text) in self.latest.items() if now - t < FORGET_AFTER}
        return {r: text for r, (_, text) in self.latest.items()}


def _serve_merged_metrics(app, replica: LLMKitServer) -> None:
    """Answer /metrics with every replica's metrics, labelled by replica, ahead of the app's own
    per-process route (the app's middleware, the key among them, still applies)."""
    from fastapi import Response
    from fastapi.routing import APIRoute

    from llmkit.server.metrics import CONTENT_TYPE

    async def merged() -> Response:
        try:
            texts = await replica.hub.collect.remote()
        except Exception as exc:  # noqa: BLE001 - this replica's own figures still answer
            log.warning("could not gather the other replicas' metrics: %s", exc)
            texts = {}
        texts[replica.replica] = replica.own_metrics()
        return Response(merge_metrics(texts), media_type=CONTENT_TYPE)

    app.router.routes.insert(0, APIRoute("/metrics", merged, methods=["GET"], include_in_schema=False))


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Prometheus text of several processes as one, each sample labelled with its ``replica``."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                merged.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)

    class Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


class ProxyErrors:
    """ASGI middleware for Serve's HTTP proxy: failures the proxy answers itself (a replica that
    died holding the request, no replica available, back-pressure, a time limit) come out in
    llmkit's error shape, and a stream cut off by a dying replica ends with an error event and
    ``[DONE]``, as the single-process server ends a stream that fails."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        started: dict | None = None  # the response start, held back while the body may be rewritten
        state = {"sent_start": False, "sse": False, "ended": False, "rewrite": False, "body": b""}

        async def guarded(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
                kind = headers.get("content-type", "")
                state["sse"] = kind.startswith("text/event-stream")
                # the app answers errors as JSON and pages as HTML; a plain-text error is the proxy's
                state["rewrite"] = message["status"] >= 400 and not kind.startswith(("application/json", "text/html"))
                if state["rewrite"]:
                    started = message
                    return
                state["sent_start"] = True
                return await send(message)
            if message["type"] == "http.response.body":
                if state["rewrite"]:
                    state["body"] += message.get("body", b"")
                    if not message.get("more_body", False):
                        state["ended"] = True
                        await self._error(send, path, started["status"], state["body"].decode(errors="replace"),
                                          dict((k.decode(), v.decode()) for k, v in started.get("headers", [])))
                    return
                if not message.get("more_body", False):
                    state["ended"] = True
            return await send(message)

        failure = "the replica serving this request stopped before the answer was complete"
        try:
            await self.app(scope, receive, guarded)
        except Exception as exc:  # noqa: BLE001 - turned into an answer below
            failure = f"{failure} ({type(exc).__name__})"
        if state["ended"]:
            return
        if not state["sent_start"]:
            await self._error(send, path, 500, failure + "; retry the request.", {})
        elif state["sse"]:
            from llmkit.server.errors import APIError

            event = APIError(500, failure + "; retry the request.", code="replica_failed").body()
            await send({"type": "http.response.body", "body": b"data: " + json.dumps(event).encode() + b"\n\n"
                        + b"data: [DONE]\n\n", "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _error(send, path: str, status: int, message: str, headers: dict) -> None:
        from llmkit.server import errors

        message = message.strip() or "the request failed in the serving cluster"
        if hasattr(errors, "speaks_anthropic") and errors.speaks_anthropic(path):
            body = errors.anthropic_body(status, message)
        else:
            body = errors.APIError(status, message, code="replica_failed" if status == 500 else None).body()
        data = json.dumps(body).encode()
        keep = [(k.encode(), v.encode()) for k, v in headers.items() if k.lower() == "retry-after"]
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                *keep]})
        await send({"type": "http.response.body", "body": data, "more_body": False})


# Serve builds its proxy's middleware from a function named by this environment variable, read in
# the proxy's process: set it where Ray starts (``llmkit serve --ray`` does for a local instance).
PROXY_CALLBACK_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "llmkit.server.ray_app.proxy_middlewares"


def proxy_middlewares() -> list:
    """The middleware llmkit puts in Serve's HTTP proxy (see ``PROXY_CALLBACK``)."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrors)]


def run_on_ray(model: str, *, address: str | None = None, host: str = "127.0.0.1", port: int = 8000,
               app_name: str = "llmkit", **options: Any) -> int:
    """``llmkit serve --ray``: start a local Ray instance (``address=None``) or join a cluster
    (``"auto"``, ``"ray://head:10001"``, ``"head:6379"``), deploy ``ray_app(model, **options)``
    behind Serve's proxy on ``host:port``, and serve until Ctrl-C or SIGTERM. Then the app is
    deleted (its replicas drain); a local Ray instance is stopped, a cluster is left running."""
    import signal
    import threading

    import ray

    if address is None:  # the local instance's processes inherit this one's environment
        os.environ.setdefault(PROXY_CALLBACK_VAR, PROXY_CALLBACK)
    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(ray_app(model, **options), name=app_name, route_prefix="/")
        log.warning("llmkit: %s served by Ray Serve on http://%s:%d (Ctrl-C stops)", model, host, port)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            serve.delete(app_name)
        finally:
            if address is None:
                serve.shutdown()
                ray.shutdown()
    return 0
