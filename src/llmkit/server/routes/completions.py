"""OpenAI's generation routes: chat completions and text completions, whole or streamed."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmkit import relevance
from llmkit.server import params, prompts, schemas, tools
from llmkit.server.bodies import parse
from llmkit.server.errors import bad_request
from llmkit.server.generation import Generation
from llmkit.server.offload import ClientGone
from llmkit.server.openapi import body, ref
from llmkit.server.running import Run, sse
from llmkit.server.state import ServerState, state_of

router = APIRouter()

_ERRORS = {status: {"model": schemas.ErrorResponse} for status in (400, 401, 404, 429, 503)}


@router.post("/v1/chat/completions", openapi_extra=body(schemas.ChatCompletionRequest),
             summary="Chat completion (stream: server-sent ChatCompletionChunk events).",
             responses={200: {"model": schemas.ChatCompletion,
                              "content": {"text/event-stream": {"schema": ref(schemas.ChatCompletionChunk)}}},
                        **_ERRORS})
async def chat_completions(request: Request):
    arrival = time.perf_counter()
    req = await parse(request, schemas.ChatCompletionRequest, generation=True)
    state, gen, run, k = await start_chat(request, req, arrival)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream:
        return sse(state.middleware.stream(gen.chat_chunks(run, include_usage, k is not None)))
    await gen.collect(run)
    return state.middleware.answer(gen.chat_body(k is not None))


async def start_chat(request: Request, req: schemas.ChatCompletionRequest,
                     arrival: float) -> tuple[ServerState, Generation, Run, int | None]:
    """Every check of a chat request, its prompt, and its choices submitted to the engine: the
    state, the Generation that assembles the answer, the Run that brings its events, and the
    number of top logprobs asked (None: no logprobs). Other wire formats that speak chat (the
    Responses API) translate their request to a chat request and start it here."""
    state = state_of(request)
    llm = state.need_model()
    adapter = state.check_model(req.model)
    prompts.check_messages(req.messages, state.config)
    plan = tools.plan_for(req)
    tool_schema = plan.schema() if plan is not None else None
    if tool_schema is not None and req.response_format and req.response_format.type != "text":
        raise bad_request("response_format cannot be combined with a tool_choice that forces a call.",
                          param="response_format")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens == 0:
        raise bad_request("max_tokens must be at least 1.", param="max_tokens", code="invalid_value")
    k = (req.top_logprobs or 0) if req.logprobs else None
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true.", param="top_logprobs")
    ids = await state.prep(prompts.chat_ids, llm.tokenizer, req.messages, req.add_generation_prompt,
                           req.continue_final_message, plan, req.chat_template_kwargs)
    prompts.check_not_empty([ids], "messages")
    jobs = await params.build(state, req, [ids], max_tokens, k, tool_schema, adapter)
    run = Run(state, jobs, arrival, request, poll_disconnect=not req.stream)
    gen = Generation("chatcmpl", state.config.model_name, [len(ids)], req.n, llm.tokenizer,
                     plan if plan is not None and plan.offered else None)
    gen.keep_reasoning_apart(llm.tokenizer, ids)
    return state, gen, run, k


@router.post("/v1/completions", openapi_extra=body(schemas.CompletionRequest),
             summary="Text completion (stream: server-sent Completion events).",
             responses={200: {"model": schemas.Completion}, **_ERRORS})
async def completions(request: Request):
    arrival = time.perf_counter()
    state = state_of(request)
    config = state.config
    req = await parse(request, schemas.CompletionRequest, generation=True)
    llm = state.need_model()
    adapter = state.check_model(req.model)
    if req.suffix:
        raise bad_request("suffix (fill-in-the-middle) is not supported.", param="suffix")
    if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], str)):
        prompts.check_texts([req.prompt] if isinstance(req.prompt, str) else req.prompt, "prompt", config)
    ids_list = await state.prep(prompts.completion_prompts, llm, req.prompt)
    if req.max_tokens == 0 and not req.echo:
        raise bad_request("max_tokens must be at least 1 (0 only with echo, to score the prompt).",
                          param="max_tokens", code="invalid_value")
    for ids in ids_list:
        if len(ids) > llm.context_length:  # before scoring an echoed prompt; params.build checks the rest
            params.check_prompt(llm, ids)
    gen = Generation("cmpl", config.model_name, [len(p) for p in ids_list], req.n, llm.tokenizer)
    k = req.logprobs
    # every check before any work: the choices' requests are built (not yet queued) first
    jobs = await params.build(state, req, ids_list, req.max_tokens, k, adapter=adapter) if req.max_tokens != 0 else None
    if req.echo:
        if k is not None:
            limits = [0 if req.max_tokens == 0 else params.max_tokens_for(req.max_tokens, len(p), llm.context_length,
                                                                          config) for p in ids_list]
            params.check_work(config, ids_list, req.n, limits, k, echo=True)
        try:
            scores = await _prompt_logprobs(state, request, ids_list, k, arrival, adapter)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        gen.echo = [(llm.tokenizer.decode(ids), lp) for ids, lp in zip(ids_list, scores)]
    run = Run(state, jobs, arrival, request, poll_disconnect=not req.stream) if jobs is not None else None
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream:
        return sse(state.middleware.stream(gen.completion_chunks(run, include_usage, k is not None)))
    if run is not None:
        await gen.collect(run)
    return state.middleware.answer(gen.completion_body(k is not None))


async def _prompt_logprobs(state: ServerState, request: Request, prompts_ids: list[list[int]], k: int | None,
                           arrival: float, adapter: str | None) -> list:
    """Logprob of each prompt token given the ones before it (None for the first), per prompt, on
    the request's model or adapter: for echo, so that evaluation tools can score a text. Scored
    through the engine like any generation (``relevance.text_scoring_requests``)."""
    if k is None:
        return [None] * len(prompts_ids)
    jobs = relevance.text_scoring_requests(state.llm, prompts_ids, top=k, adapter=adapter)
    events: list[list] = [[] for _ in jobs]
    async for i, event in Run(state, jobs, arrival, request, poll_disconnect=True).events():
        if event.token is not None:
            events[i].append(event)
    return relevance.text_logprobs(prompts_ids, events)
