"""The HTTP app: OpenAI's chat and text completion routes over llmkit's engine, plus models,
tokenize/detokenize, health, readiness, metrics and the chat page.

The server adapts the Python API and never reaches into the model: every choice of every request
is one ``engine.submit``; the engine calls back on its own thread, and ``_Run`` hands the events to
the event loop with ``call_soon_threadsafe``. The engine batches all running requests into one
forward per step (continuous batching), so concurrent clients share each step's cost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from llmkit.errors import LLMKitError
from llmkit.server import errors, schemas, tools
from llmkit.server.auth import Guard
from llmkit.server.errors import APIError, bad_request
from llmkit.server.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("llmkit.server")

STATIC = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    """How the server behaves; ``llmkit serve`` flags map onto these fields."""

    model_name: str = "llmkit"  # the id clients pass as "model" (GET /v1/models)
    aliases: tuple[str, ...] = ()  # other ids accepted for the same model
    api_key: str | None = None
    max_batch: int = 16  # requests decoded together
    max_queue: int | None = 256  # requests waiting for a slot; more get 429
    # When a request gives no max_tokens (and the context allows it). The engine sizes its KV cache
    # for prompt + max_tokens and never shrinks it, and a longer cache slows every decode step.
    default_max_tokens: int = 512
    request_timeout: float = 600.0  # seconds from arrival to the last token
    max_body_bytes: int = 8 * 1024 * 1024
    drain_timeout: float = 30.0  # on shutdown: how long requests in flight may take to finish
    allow_origins: tuple[str, ...] = ()  # CORS origins for browser clients on other origins


@dataclass
class ServerState:
    config: ServerConfig
    llm: Any = None
    engine: Any = None
    load_error: str | None = None
    draining: bool = False
    started: float = field(default_factory=time.time)
    echo_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def attach(self, llm) -> None:
        """Serve this loaded model: a fresh engine over it, with the server's batch and queue bounds."""
        from llmkit.engine import Engine

        if llm.executor_name == "torch":  # a torch model can take any batch size
            runner, batch = llm.model, self.config.max_batch
        else:  # another executor (llama.cpp) was sized for its sequences when the model loaded
            runner = llm.engine.executor
            batch = min(self.config.max_batch, runner.max_batch)
        self.engine = Engine(runner, llm.tokenizer, llm.context_length, max_batch=batch,
                             max_queue=self.config.max_queue)
        self.llm = llm


def _plugged(kind: str) -> list:
    """What plugins registered through ``register_<kind>`` (middleware, routes), in order."""
    from llmkit import plugins

    if not hasattr(plugins.Specs, f"register_{kind}"):
        return []
    return list(plugins.registry(kind).values())


def _refused(exc: LLMKitError) -> APIError:
    return APIError(400, str(exc), code="rejected")


def _add_plugin_routes(app: FastAPI, routes: list) -> None:
    """Routes from the ``register_routes`` hook: ``handler(body: dict) -> dict``, run in a worker
    thread (a plugin may block). Added after the built-in routes, which therefore win."""
    taken = {(m, r.path) for r in app.routes for m in getattr(r, "methods", ()) or ()}
    for route in routes:
        method, path = str(route.method).upper(), str(route.path)
        if (method, path) in taken:
            log.warning("plugin route %s %s ignored: a built-in route has that method and path", method, path)
            continue
        taken.add((method, path))

        async def endpoint(request: Request, _handler=route.handler, _method=method):
            body: Any = {}
            if _method not in ("GET", "HEAD", "DELETE"):
                raw = await request.body()
                try:
                    body = json.loads(raw) if raw.strip() else {}
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise bad_request(f"The body is not valid JSON: {exc}", code="invalid_json") from None
                if not isinstance(body, dict):
                    raise bad_request("The body must be a JSON object.", code="invalid_json")
            try:
                out = await asyncio.to_thread(_handler, body)
            except LLMKitError as exc:
                raise _refused(exc) from None
            return JSONResponse(out)

        app.add_api_route(path, endpoint, methods=[method], summary=f"(plugin) {method} {path}",
                          name=f"plugin:{path}")


def create_app(llm=None, *, config: ServerConfig | None = None, loader: Callable[[], Any] | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The ASGI app. Pass a loaded ``llm``, or a ``loader`` that returns one: it runs in a thread
    at startup, and until it returns ``/ready`` and the model routes answer 503."""
    config = config or ServerConfig()
    state = ServerState(config)
    if llm is not None:
        state.attach(llm)
    metrics = Metrics(lambda: state.engine)
    middlewares = _plugged("middleware")

    def load() -> None:
        try:
            state.attach(loader())
            log.info("model %s loaded; ready", config.model_name)
        except BaseException as exc:  # noqa: BLE001 - reported through /ready and the callback
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.error("could not load the model: %s", state.load_error)
            if on_load_error is not None:
                on_load_error(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None and loader is not None:
            threading.Thread(target=load, name="llmkit-load", daemon=True).start()
        yield
        state.draining = True
        if state.engine is not None:
            await asyncio.to_thread(state.engine.shutdown, config.drain_timeout)

    app = FastAPI(title="llmkit", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API over llmkit's continuous-batching engine.")
    app.state.llmkit = state
    app.state.metrics = metrics
    errors.install(app)
    if config.allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.allow_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)

    # ------------------------------------------------------------------ helpers bound to this app

    def need_model() -> tuple[Any, Any]:
        if state.draining:
            raise APIError(503, "The server is shutting down and takes no new requests.",
                           code="shutting_down", headers={"Retry-After": "5"})
        if state.engine is None:
            if state.load_error:
                raise APIError(503, f"The model failed to load: {state.load_error}", code="model_load_failed")
            raise APIError(503, "The model is still loading; retry in a few seconds (GET /ready says when).",
                           code="model_loading", headers={"Retry-After": "5"})
        return state.llm, state.engine

    def check_model(name: str | None) -> None:
        if name in (None, "", config.model_name) or name in config.aliases:
            return
        raise APIError(404, f"The model {name!r} is not served here; this server runs {config.model_name!r} "
                            "(GET /v1/models).", param="model", code="model_not_found")

    async def parse(request: Request, model: type[BaseModel], generation: bool = False):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"The body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise bad_request("The body must be a JSON object.", code="invalid_json")
        if generation:  # plugins' middleware sees the body before the model does
            for m in middlewares:
                if hasattr(m, "on_request"):
                    try:
                        data = m.on_request(data)
                    except LLMKitError as exc:
                        raise _refused(exc) from None
                    if not isinstance(data, dict):
                        raise APIError(500, f"middleware {type(m).__name__}.on_request returned "
                                            f"{type(data).__name__}, not a dict", code="internal_error")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise errors.validation_error(exc.errors(include_url=False)) from None

    def answer(body: dict) -> JSONResponse:
        try:
            body = _on_response(middlewares, body)
        except LLMKitError as exc:
            raise _refused(exc) from None
        return JSONResponse(body)

    # ------------------------------------------------------------------ routes

    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(_chat_page())

    @app.get("/health", summary="Liveness: 200 while the process serves HTTP.")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: 200 once the model is loaded, 503 before and while shutting down.",
             responses={503: {"model": schemas.ErrorResponse}})
    async def ready():
        if state.ready:
            return {"status": "ready", "model": config.model_name}
        if state.draining:
            return APIError(503, "shutting down", code="shutting_down").response()
        if state.load_error:
            return APIError(503, f"the model failed to load: {state.load_error}", code="model_load_failed").response()
        return APIError(503, "the model is loading", code="model_loading", headers={"Retry-After": "5"}).response()

    @app.get("/metrics", summary="Prometheus metrics (llmkit: prefix, vLLM's names).")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=schemas.ModelList, summary="The model this server runs.")
    async def models():
        context = state.llm.context_length if state.llm is not None else None
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": int(state.started),
                                            "owned_by": "llmkit", "max_model_len": context}]}

    @app.post("/tokenize", response_model=schemas.TokenizeResponse, openapi_extra=_body(schemas.TokenizeRequest),
              summary="Token ids of a prompt, or of a conversation rendered with the chat template.")
    async def tokenize(request: Request):
        req = await parse(request, schemas.TokenizeRequest)
        llm, _ = need_model()
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("Give either prompt or messages.", param="prompt")
        if req.messages is not None:
            plan = tools.ToolPlan([t.model_dump(exclude_none=True) for t in req.tools], "auto") if req.tools else None
            ids = _chat_ids(llm.tokenizer, req.messages, req.add_generation_prompt, False, plan)
        else:
            ids = llm.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.context_length}

    @app.post("/detokenize", response_model=schemas.DetokenizeResponse,
              openapi_extra=_body(schemas.DetokenizeRequest), summary="Text of token ids.")
    async def detokenize(request: Request):
        req = await parse(request, schemas.DetokenizeRequest)
        llm, _ = need_model()
        check_model(req.model)
        _check_ids(req.tokens, llm.config.vocab_size, "tokens")
        return {"prompt": llm.tokenizer.decode(req.tokens)}

    @app.post("/v1/embeddings", response_model=schemas.EmbeddingList, openapi_extra=_body(schemas.EmbeddingRequest),
              summary="Embeddings of texts: the model's hidden states, mean-pooled and L2-normalised.")
    async def embeddings(request: Request):
        from llmkit.tasks import embed

        req = await parse(request, schemas.EmbeddingRequest)
        llm, _ = need_model()
        check_model(req.model)
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or any(not t for t in texts):
            raise bad_request("input must be a non-empty string or a list of non-empty strings.", param="input")
        counts = [len(llm.tokenizer.encode(t, add_special_tokens=True)) for t in texts]
        if max(counts) > llm.context_length:
            raise bad_request(f"An input has {max(counts)} tokens, more than the context size of "
                              f"{llm.context_length}.", param="input", code="context_length_exceeded")

        def run():
            with state.echo_lock:  # one forward of the full model at a time, beside the engine
                return embed(llm, texts)

        vectors = await asyncio.to_thread(run)
        if req.encoding_format == "base64":  # what the official client asks for by default
            import base64

            encoded = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            encoded = [v.tolist() for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
        return {"object": "list", "data": data, "model": config.model_name,
                "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}}

    @app.post("/v1/chat/completions", openapi_extra=_body(schemas.ChatCompletionRequest),
              summary="Chat completion (stream: server-sent ChatCompletionChunk events).",
              responses={200: {"model": schemas.ChatCompletion,
                               "content": {"text/event-stream": {"schema": _ref(schemas.ChatCompletionChunk)}}},
                         400: {"model": schemas.ErrorResponse}, 401: {"model": schemas.ErrorResponse},
                         404: {"model": schemas.ErrorResponse}, 429: {"model": schemas.ErrorResponse},
                         503: {"model": schemas.ErrorResponse}})
    async def chat_completions(request: Request):
        arrival = time.perf_counter()
        req = await parse(request, schemas.ChatCompletionRequest, generation=True)
        llm, engine = need_model()
        check_model(req.model)
        plan = tools.plan_for(req)
        tool_schema = plan.schema() if plan is not None else None
        if tool_schema is not None and req.response_format and req.response_format.type != "text":
            raise bad_request("response_format cannot be combined with a tool_choice that forces a call.",
                              param="response_format")
        ids = _chat_ids(llm.tokenizer, req.messages, req.add_generation_prompt, req.continue_final_message, plan)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens == 0:
            raise bad_request("max_tokens must be at least 1.", param="max_tokens", code="invalid_value")
        k = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true.", param="top_logprobs")
        jobs = await _jobs(state, req, [ids], max_tokens, k, tool_schema)
        run = _Run(state, metrics, jobs, arrival, request, poll_disconnect=not req.stream)
        gen = _Generation("chatcmpl", config.model_name, [len(ids)], req.n, llm.tokenizer,
                          plan if plan is not None and plan.offered else None)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return _sse(gen.chat_chunks(run, include_usage, k is not None), middlewares)
        await gen.collect(run)
        return answer(gen.chat_body(k is not None))

    @app.post("/v1/completions", openapi_extra=_body(schemas.CompletionRequest),
              summary="Text completion (stream: server-sent Completion events).",
              responses={200: {"model": schemas.Completion}, 400: {"model": schemas.ErrorResponse},
                         401: {"model": schemas.ErrorResponse}, 404: {"model": schemas.ErrorResponse},
                         429: {"model": schemas.ErrorResponse}, 503: {"model": schemas.ErrorResponse}})
    async def completions(request: Request):
        arrival = time.perf_counter()
        req = await parse(request, schemas.CompletionRequest, generation=True)
        llm, engine = need_model()
        check_model(req.model)
        if req.suffix:
            raise bad_request("suffix (fill-in-the-middle) is not supported.", param="suffix")
        prompts = _completion_prompts(llm, req.prompt)
        if req.max_tokens == 0 and not req.echo:
            raise bad_request("max_tokens must be at least 1 (0 only with echo, to score the prompt).",
                              param="max_tokens", code="invalid_value")
        for ids in prompts:
            if len(ids) > llm.context_length:  # before scoring an echoed prompt; _jobs checks the rest
                engine.check(_probe(ids, 1))
        gen = _Generation("cmpl", config.model_name, [len(p) for p in prompts], req.n, llm.tokenizer)
        k = req.logprobs
        if req.echo:
            gen.echo = [(llm.tokenizer.decode(ids), await _prompt_logprobs(state, ids, k)) for ids in prompts]
        if req.max_tokens == 0:
            run = None
        else:
            jobs = await _jobs(state, req, prompts, req.max_tokens, k)
            run = _Run(state, metrics, jobs, arrival, request, poll_disconnect=not req.stream)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return _sse(gen.completion_chunks(run, include_usage, k is not None), middlewares)
        if run is not None:
            await gen.collect(run)
        return answer(gen.completion_body(k is not None))

    _add_plugin_routes(app, _plugged("routes"))
    app.openapi = lambda: _openapi(app)
    return app


# ---------------------------------------------------------------------------------------------- prompts


def _text_content(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type not in ("text", "input_text"):
            raise bad_request(f"{where}: content of type {part.type!r} is not supported; this server reads text only.",
                              param="messages")
        texts.append(part.text or "")
    return "\n".join(texts)


def _chat_ids(tokenizer, messages, add_generation_prompt: bool, continue_final: bool,
              plan: tools.ToolPlan | None = None) -> list[int]:
    chat = []
    for i, m in enumerate(messages):
        extra = {k: v for k, v in (m.model_extra or {}).items() if v is not None}
        d = {**extra, "role": {"developer": "system", "function": "tool"}.get(m.role, m.role),
             "content": _text_content(m.content, f"messages[{i}]")}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        calls = m.tool_calls or ([schemas.ToolCall(function=m.function_call)] if m.function_call else [])
        if calls:
            d["tool_calls"] = [tools.template_call(c, f"call_{i}_{j}") for j, c in enumerate(calls)]
        chat.append(d)
    offered = plan.tools if plan is not None and plan.offered else None
    chat, offered = tools.prepare(chat, plan, tools.template_knows_tools(tokenizer._pick_template(None, offered)))
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt and not continue_final,
                                         continue_final_message=continue_final, tools=offered)
    return tokenizer.encode(text)


def _check_ids(ids: list[int], vocab: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"{param} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}", param=param)


def _completion_prompts(llm, prompt) -> list[list[int]]:
    vocab = llm.config.vocab_size
    if isinstance(prompt, str):
        return [llm.tokenizer.encode(prompt, add_special_tokens=True)]
    if not prompt:
        raise bad_request("prompt is empty.", param="prompt")
    if isinstance(prompt[0], int):
        _check_ids(prompt, vocab, "prompt")
        return [list(prompt)]
    if isinstance(prompt[0], str):
        return [llm.tokenizer.encode(p, add_special_tokens=True) for p in prompt]
    for p in prompt:
        _check_ids(p, vocab, "prompt")
    return [list(p) for p in prompt]


def _probe(ids, max_tokens):
    from llmkit.engine import Request
    from llmkit.sampling import SamplingParams

    return Request(ids, SamplingParams(max_tokens=max_tokens))


async def _jobs(state: ServerState, req, prompts: list[list[int]], max_tokens: int | None, k: int | None,
                tool_schema: dict | None = None) -> list:
    """One engine Request per choice: n per prompt, choice index = prompt * n + j. tool_schema: a
    tool call to enforce while decoding (tools.ToolPlan.schema)."""
    from llmkit.engine import Request
    from llmkit.sampling import SamplingParams

    llm = state.llm
    context = llm.context_length
    if req.logit_bias:
        for key, value in req.logit_bias.items():
            if not (isinstance(value, (int, float)) and -100 <= value <= 100):
                raise bad_request(f"logit_bias[{key!r}]={value!r}: biases must be in [-100, 100].", param="logit_bias")
    common: dict[str, Any] = {}
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "seed", "stop", "stop_token_ids", "logit_bias"):
        value = getattr(req, name)
        if value is not None:
            common[name] = value
    if req.top_k is not None:
        common["top_k"] = max(req.top_k, 0)
    common["ignore_eos"] = req.ignore_eos
    rf = req.response_format.model_dump(by_alias=True, exclude_none=True) if req.response_format else None
    if rf and rf.get("type") == "json_schema" and not (rf.get("json_schema") or {}).get("schema"):
        raise bad_request("response_format json_schema needs json_schema.schema.", param="response_format")

    constrained = tool_schema is not None or (rf and rf.get("type") != "text")

    def processors():
        param = "tools" if tool_schema is not None else "response_format"
        try:
            from llmkit.constrain import UnsupportedSchemaError, json_schema_processor, processor_for_response_format
        except ImportError:
            raise APIError(400, f"{param} needs llmkit.constrain, which this installation lacks.",
                           param=param) from None
        count = len(prompts) * req.n
        if tool_schema is None:
            return [processor_for_response_format(llm.tokenizer, llm.config.vocab_size, rf) for _ in range(count)]
        try:
            return [json_schema_processor(llm.tokenizer, llm.config.vocab_size, tool_schema, tools.WRAP)
                    for _ in range(count)]
        except UnsupportedSchemaError as exc:
            raise APIError(400, f"A tool's parameters cannot be enforced while decoding: {exc}", param="tools",
                           code="unsupported_schema") from None

    bases = []
    for ids in prompts:
        m = max_tokens if max_tokens is not None else max(1, min(state.config.default_max_tokens, context - len(ids)))
        bases.append(SamplingParams(max_tokens=m, **common))
        state.engine.check(Request(ids, bases[-1]))  # before compiling a schema: fail fast
    procs = await asyncio.to_thread(processors) if constrained else None
    jobs = []
    for p, (ids, base) in enumerate(zip(prompts, bases)):
        for j in range(req.n):
            params = base
            if j and base.seed is not None:
                params = params.replace(seed=base.seed + j)  # distinct but reproducible choices
            if procs is not None:
                params = params.replace(logits_processors=[procs[p * req.n + j]])
            jobs.append(Request(ids, params, logprobs=k))
    return jobs


async def _prompt_logprobs(state: ServerState, ids: list[int], k: int | None) -> list | None:
    """Logprob of each prompt token given the ones before it (None for the first): for echo, so that
    evaluation tools can score a text. One full forward, outside the engine's batch."""
    if k is None:
        return None
    import torch

    def score():
        with state.echo_lock:
            logits = state.llm.logits(ids)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        out: list = [(ids[0], None, [])]
        for pos in range(1, len(ids)):
            row = logprobs[pos - 1]
            top = []
            if k:
                values, indices = torch.topk(row, k)
                top = list(zip(indices.tolist(), values.tolist()))
            out.append((ids[pos], float(row[ids[pos]]), top))
        return out

    return await asyncio.to_thread(score)


# ------------------------------------------------------------------------------------ running requests


class _ClientGone(Exception):
    pass


class _Run:
    """The engine requests (one per choice) of one HTTP request, their events brought into asyncio.

    Submitting happens here, synchronously, so that a full queue or a too-long prompt is an HTTP
    error before any response starts. Leaving ``events()`` early for any reason (the client went
    away, the time limit passed, an error) cancels every unfinished choice: its slot is free at the
    engine's next step.
    """

    def __init__(self, state: ServerState, metrics: Metrics, jobs: list, arrival: float, request: Request,
                 poll_disconnect: bool):
        self.metrics = metrics
        self.arrival = arrival
        self.deadline = arrival + state.config.request_timeout
        self.timeout = state.config.request_timeout
        self.request = request
        self.poll_disconnect = poll_disconnect
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles = []
        self.last = [None] * len(jobs)
        try:
            for i, job in enumerate(jobs):
                self.handles.append(state.engine.submit(job, on_event=self._callback(i)))
        except LLMKitError as exc:
            self.cancel()
            from llmkit.engine import QueueFullError

            metrics.rejected.labels("queue_full" if isinstance(exc, QueueFullError) else "invalid").inc()
            raise

    def _callback(self, i: int):
        loop, queue = self.loop, self.queue

        def deliver(event) -> None:  # on the engine thread: keep it tiny, and never raise there
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (i, event, time.perf_counter()))
            except RuntimeError:  # the event loop is closed (server stopped)
                pass

        return deliver

    def cancel(self) -> None:
        for h in self.handles:
            if not h.done:
                h.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        remaining = len(self.handles)
        checked = time.perf_counter()
        try:
            while remaining:
                now = time.perf_counter()
                left = self.deadline - now
                if left <= 0:
                    raise APIError(504, f"The request took longer than the server's time limit of "
                                        f"{self.timeout:g} s; ask for fewer tokens, or retry when the server is "
                                        "less busy.", code="timeout")
                # A streamed response notices a disconnect itself (Starlette cancels this task); a
                # whole-answer one asks now and then, so that a client gone away frees its slots.
                if self.poll_disconnect and now - checked > 0.25:
                    checked = now
                    if await self.request.is_disconnected():
                        raise _ClientGone()
                try:
                    i, event, at = await asyncio.wait_for(self.queue.get(), timeout=min(left, 0.25))
                except asyncio.TimeoutError:
                    continue
                self._observe(i, event, at)
                if event.finish_reason is not None:
                    remaining -= 1
                if event.error is not None:
                    raise APIError(500, f"Generation failed: {type(event.error).__name__}: {event.error}",
                                   code="internal_error")
                yield i, event
        finally:
            for i, h in enumerate(self.handles):
                if not h.done:  # abandoned: the client left, the time limit passed, or an error
                    h.cancel()
                    self.metrics.finished("cancelled")
                    self.metrics.e2e.observe(time.perf_counter() - self.arrival)

    def _observe(self, i: int, event, at: float) -> None:
        m = self.metrics
        if event.token is not None:
            if self.last[i] is None:
                m.ttft.observe(at - self.arrival)
            else:
                m.itl.observe(at - self.last[i])
            self.last[i] = at
        if event.finish_reason is not None:
            m.e2e.observe(at - self.arrival)
            m.finished(event.finish_reason)


class _Tokens:
    """Each token's own bytes and text, for logprobs."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.special = tokenizer.special_ids
        from llmkit.tokenizer import _byte_alphabet

        alphabet = set(_byte_alphabet().values())
        sample = [tokenizer.id_to_token(i) or "" for i in range(min(len(tokenizer), 2000))]
        chars = sum(len(s) for s in sample) or 1
        self.byte_level = sum(ch in alphabet for s in sample for ch in s) / chars > 0.99
        self.inverse = {c: b for b, c in _byte_alphabet().items()}
        self.cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        hit = self.cache.get(token)
        if hit is not None:
            return hit
        piece = self.tok.id_to_token(token) or ""
        if token in self.special:
            raw = piece.encode()
        elif self.byte_level:
            try:
                raw = bytes(self.inverse[c] for c in piece)
            except KeyError:
                raw = piece.encode()
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            raw = bytes([int(piece[3:5], 16)])
        else:
            raw = piece.replace("\u2581", " ").encode()
        out = (raw.decode("utf-8", errors="replace"), raw)
        self.cache[token] = out
        return out


_token_tables: dict[int, _Tokens] = {}


def _tokens_for(tokenizer) -> _Tokens:
    table = _token_tables.get(id(tokenizer))
    if table is None or table.tok is not tokenizer:
        table = _token_tables[id(tokenizer)] = _Tokens(tokenizer)
    return table


def _num(x: float) -> float:
    # JSON has no -Infinity: a token the mask removed has logprob -inf
    return x if math.isfinite(x) else -9999.0


class _Generation:
    """Assembles OpenAI responses (whole, or as stream chunks) from engine events."""

    def __init__(self, prefix: str, model: str, prompt_lens: list[int], n: int, tokenizer,
                 plan: tools.ToolPlan | None = None):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.tools = plan  # tools offered to the model: its output is parsed for calls
        self.created = int(time.time())
        self.model = model
        self.prompt_lens = prompt_lens
        self.n = n
        count = len(prompt_lens) * n
        self.texts: list[list[str]] = [[] for _ in range(count)]
        self.tokens = [0] * count
        self.logprobs: list[list] = [[] for _ in range(count)]
        self.finish: list[str | None] = [None] * count
        self.table = _tokens_for(tokenizer)
        self.echo: list | None = None

    # -- shared

    def _record(self, i: int, event) -> None:
        if event.token is not None:
            self.tokens[i] += 1
            if event.logprob is not None:
                self.logprobs[i].append((event.token, event.logprob, event.top_logprobs or []))
        self.texts[i].append(event.text)
        if event.finish_reason is not None:
            self.finish[i] = event.finish_reason

    def usage(self) -> dict:
        prompt = sum(self.prompt_lens)
        completion = sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def collect(self, run: _Run) -> None:
        try:
            async for i, event in run.events():
                self._record(i, event)
        except _ClientGone:
            pass

    # -- chat

    def _chat_logprob(self, token: int, logprob: float, top) -> dict:
        text, raw = self.table(token)
        return {"token": text, "logprob": _num(logprob), "bytes": list(raw),
                "top_logprobs": [{"token": self.table(t)[0], "logprob": _num(lp), "bytes": list(self.table(t)[1])}
                                 for t, lp in top]}

    def _finish_reason(self, reason: str | None, calls: list[dict]) -> str | None:
        if not calls:
            return _reason(reason)
        return "function_call" if self.tools.legacy else "tool_calls"

    def chat_body(self, with_logprobs: bool) -> dict:
        choices = []
        for i in range(len(self.texts)):
            text, calls = "".join(self.texts[i]), []
            if self.tools is not None:
                text, calls = tools.parse(text, self.tools)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls and self.tools.legacy:
                message["function_call"] = calls[0]["function"]
            elif calls:
                message["tool_calls"] = calls
            choices.append({
                "index": i,
                "message": message,
                "logprobs": {"content": [self._chat_logprob(*x) for x in self.logprobs[i]]} if with_logprobs else None,
                "finish_reason": self._finish_reason(self.finish[i], calls),
            })
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def _chunk(self, obj: str, choices: list, include_usage: bool) -> dict:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if include_usage:
            body["usage"] = None
        return body

    async def chat_chunks(self, run: _Run, include_usage: bool, with_logprobs: bool) -> AsyncIterator[dict]:
        def chunk(i: int, delta: dict, logprobs=None, reason=None) -> dict:
            return self._chunk("chat.completion.chunk", [{"index": i, "delta": delta, "logprobs": logprobs,
                                                          "finish_reason": reason}], include_usage)

        # with tools, text that may be a tool call is held back until the choice ends
        splitters = [tools.StreamSplitter(self.tools) if self.tools else None for _ in self.texts]
        for i in range(len(self.texts)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, event in run.events():
            self._record(i, event)
            text = splitters[i].feed(event.text) if splitters[i] else event.text
            if text or (with_logprobs and event.token is not None):
                logprobs = None
                if with_logprobs and event.token is not None and event.logprob is not None:
                    logprobs = {"content": [self._chat_logprob(event.token, event.logprob, event.top_logprobs or [])]}
                yield chunk(i, {"content": text}, logprobs)
            if event.finish_reason is not None:
                calls = []
                if splitters[i]:
                    rest, calls = splitters[i].finish()
                    if rest:
                        yield chunk(i, {"content": rest})
                for j, call in enumerate(calls):  # as OpenAI streams them: id and name, then the arguments
                    name = {"name": call["function"]["name"], "arguments": ""}
                    arguments = {"arguments": call["function"]["arguments"]}
                    if self.tools.legacy:
                        yield chunk(i, {"function_call": name})
                        yield chunk(i, {"function_call": arguments})
                        break
                    yield chunk(i, {"tool_calls": [{"index": j, "id": call["id"], "type": "function",
                                                    "function": name}]})
                    yield chunk(i, {"tool_calls": [{"index": j, "function": arguments}]})
                yield chunk(i, {}, reason=self._finish_reason(event.finish_reason, calls))
        if include_usage:
            yield {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": [], "usage": self.usage()}

    # -- text completions

    def _completion_logprobs(self, entries: list, start: int) -> dict:
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = start
        for token, logprob, alternatives in entries:
            text = self.table(token)[0]
            tokens.append(text)
            token_logprobs.append(None if logprob is None else _num(logprob))
            top.append(None if logprob is None else {self.table(t)[0]: _num(lp) for t, lp in alternatives})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _echo_for(self, i: int) -> tuple[str, list | None]:
        if self.echo is None:
            return "", None
        return self.echo[i // self.n]

    def completion_body(self, with_logprobs: bool) -> dict:
        choices = []
        for i in range(len(self.texts)):
            prefix, prompt_lp = self._echo_for(i)
            logprobs = None
            if with_logprobs:
                entries = (prompt_lp or []) + self.logprobs[i]
                logprobs = self._completion_logprobs(entries, 0)
            choices.append({"index": i, "text": prefix + "".join(self.texts[i]), "logprobs": logprobs,
                            "finish_reason": _reason(self.finish[i] or "length")})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    async def completion_chunks(self, run: _Run | None, include_usage: bool,
                                with_logprobs: bool) -> AsyncIterator[dict]:
        offsets = [0] * len(self.texts)
        if self.echo is not None:
            for i in range(len(self.texts)):
                prefix, prompt_lp = self._echo_for(i)
                logprobs = self._completion_logprobs(prompt_lp or [], 0) if with_logprobs else None
                offsets[i] = len(prefix)
                yield self._chunk("text_completion", [{"index": i, "text": prefix, "logprobs": logprobs,
                                                       "finish_reason": None if run else "length"}], include_usage)
        if run is not None:
            async for i, event in run.events():
                self._record(i, event)
                if event.text or (with_logprobs and event.token is not None) or event.finish_reason:
                    logprobs = None
                    if with_logprobs and event.token is not None and event.logprob is not None:
                        logprobs = self._completion_logprobs(
                            [(event.token, event.logprob, event.top_logprobs or [])], offsets[i])
                    offsets[i] += len(event.text)
                    yield self._chunk("text_completion", [{"index": i, "text": event.text, "logprobs": logprobs,
                                                           "finish_reason": _reason(event.finish_reason)}],
                                      include_usage)
        if include_usage:
            yield {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                   "choices": [], "usage": self.usage()}


def _reason(reason: str | None) -> str | None:
    # "cancelled" reaches a client only when a shutdown's drain time ran out mid-generation
    return "abort" if reason == "cancelled" else reason


def _on_response(middlewares: list, body: dict) -> dict:
    for m in middlewares:
        if hasattr(m, "on_response"):
            body = m.on_response(body)
    return body


def _sse(chunks: AsyncIterator[dict], middlewares: list) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                try:
                    chunk = _on_response(middlewares, chunk)
                except LLMKitError as exc:  # refused mid-stream: the error is the last event
                    raise _refused(exc) from None
                yield b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
        except APIError as exc:  # the response has started: the error goes into the stream
            yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
        except LLMKitError as exc:
            yield b"data: " + json.dumps(errors.from_llmkit_error(exc).body()).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ------------------------------------------------------------------------------------------- OpenAPI


_BODY_MODELS: list[type[BaseModel]] = []


def _ref(model: type[BaseModel]) -> dict:
    if model not in _BODY_MODELS:
        _BODY_MODELS.append(model)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _body(model: type[BaseModel]) -> dict:
    """Describe a JSON request body that the route parses itself (so that middleware can see it first)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(model)}}}}


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in _BODY_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
        for name, sub in schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = schema
    app.openapi_schema = doc
    return doc


@lru_cache(maxsize=1)
def _chat_page() -> str:
    return (STATIC / "index.html").read_text(encoding="utf-8")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("llmkit")
    except Exception:  # pragma: no cover
        return "0"
