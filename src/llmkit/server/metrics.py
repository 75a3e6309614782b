"""Prometheus metrics, with vLLM's names where they fit, under an ``llmkit:`` prefix.

Each app has its own registry (not prometheus_client's global one), so that several servers can
live in one process (the tests start a few) without their counters mixing.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "llmkit:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (vllm/engine/metrics.py), so that dashboards built for it read these the same way
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0, 1920.0, 7680.0)

# engine finish reasons -> vLLM's finished_reason label values
FINISHED_LABEL = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "abort"}


def _free_slots(engine) -> int:
    if engine is None:
        return 0
    return max(getattr(engine, "max_batch", 0) - getattr(engine, "num_running", 0), 0)


def _queue_limit(engine) -> float:
    if engine is None:
        return 0
    limit = getattr(engine, "max_queue", None)
    return float("inf") if limit is None else limit


class Metrics:
    def __init__(self, engine: Callable[[], object | None]):
        """``engine()`` returns the model's engine, or None while the model loads. The engine may
        serve other callers too (it belongs to the LLM): the gauges show all of its requests, the
        counters this server's own."""
        self.registry = r = CollectorRegistry()
        running = Gauge(PREFIX + "num_requests_running", "Requests in the running batch (prefilling or decoding).",
                        registry=r)
        running.set_function(lambda: getattr(engine(), "num_running", 0))
        waiting = Gauge(PREFIX + "num_requests_waiting", "Requests waiting for a slot in the batch.", registry=r)
        waiting.set_function(lambda: getattr(engine(), "num_waiting", 0))
        slots = Gauge(PREFIX + "num_slots", "Slots in the engine's batch: requests it decodes together.", registry=r)
        slots.set_function(lambda: getattr(engine(), "max_batch", 0))
        free = Gauge(PREFIX + "num_slots_free", "Slots free to take a request now (num_slots minus "
                     "num_requests_running).", registry=r)
        free.set_function(lambda: _free_slots(engine()))
        queue = Gauge(PREFIX + "max_requests_waiting", "Requests that may wait for a slot before more are refused "
                      "(429); +Inf when unbounded.", registry=r)
        queue.set_function(lambda: _queue_limit(engine()))
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed (prefilled).", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Time from the request's arrival to its first generated token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds",
                             "Time between two consecutive generated tokens of one request.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds",
                             "Time from the request's arrival to its last token.", buckets=_E2E_BUCKETS, registry=r)
        self.success = Counter(PREFIX + "request_success", "Finished generations, by finish reason "
                               "(stop, length, abort: cancelled by a disconnect, a time limit or shutdown).",
                               ["finished_reason"], registry=r)
        for label in ("stop", "length", "abort"):
            self.success.labels(label)
        self.abandoned = Counter(PREFIX + "offload_abandoned", "Embeddings stopped before "
                                 "their answer, by reason (client_gone, timeout).", ["reason"], registry=r)
        for label in ("client_gone", "timeout"):
            self.abandoned.labels(label)
        self.rejected = Counter(PREFIX + "request_rejected", "Requests refused before generating, by reason.",
                                ["reason"], registry=r)

        def cache(attr: str) -> Callable[[], float]:
            return lambda: getattr(getattr(engine(), "prefix_cache", None), attr, 0)

        for name, attr, doc in (("prefix_cache_queries", "queries", "Prompts looked up in the prefix cache."),
                                ("prefix_cache_hits", "hits", "Prompts that reused cached keys and values."),
                                ("prefix_cache_tokens_reused", "tokens_reused", "Prompt tokens taken from the prefix cache."),
                                ("prefix_cache_bytes", "bytes", "Memory the prefix cache holds.")):
            Gauge(PREFIX + name, doc + " (engine-wide)", registry=r).set_function(cache(attr))
        Gauge(PREFIX + "kv_cache_bytes", "Memory the running requests' key/value cache holds, sized to the "
              "longest batch met so far and kept while idle (engine-wide).", registry=r).set_function(
            lambda: getattr(getattr(engine(), "executor", None), "cache_bytes", 0))
        hit_rate = Gauge(PREFIX + "prefix_cache_hit_rate", "Share of looked-up prompt tokens found in the "
                         "prefix cache (engine-wide).", registry=r)
        hit_rate.set_function(lambda: cache("tokens_reused")() / max(cache("tokens_queried")(), 1))
        for name, attr, doc in (("spec_decode_num_draft_tokens", "spec_proposed", "Tokens proposed by prompt lookup."),
                                ("spec_decode_num_accepted_tokens", "spec_accepted", "Proposed tokens the model kept.")):
            Gauge(PREFIX + name, doc + " (engine-wide)", registry=r).set_function(
                lambda attr=attr: getattr(engine(), attr, 0))

    def finished(self, reason: str | None) -> None:
        self.success.labels(FINISHED_LABEL.get(reason or "", "abort")).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
