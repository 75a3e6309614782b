"""OpenAI's generation routes: chat completions and text completions, whole or streamed."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

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
        if k is not None and adapter is not None:  # the prompt is scored by the base model's forward
            raise bad_request(f"echo with logprobs scores prompts on the base model only, not on the adapter "
                              f"{adapter!r}: ask the base model ({config.model_name!r}) or leave out echo.",
                              param="echo")
        if k is not None:
            limits = [0 if req.max_tokens == 0 else params.max_tokens_for(req.max_tokens, len(p), llm.context_length,
                                                                          config) for p in ids_list]
            params.check_work(config, ids_list, req.n, limits, k, echo=True)
        try:
            scores = await _prompt_logprobs(state, request, ids_list, k, arrival)
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
                           arrival: float) -> list:
    """Logprob of each prompt token given the ones before it (None for the first), per prompt: for
    echo, so that evaluation tools can score a text. One full forward per prompt, beside the
    engine's batch (``ServerState.offload``: bounded queue, time limit, stops when the client leaves)."""
    if k is None:
        return [None] * len(prompts_ids)
    llm = state.llm

    def score(ids: list[int]) -> list:
        import torch

        logprobs = torch.log_softmax(llm.logits(ids).float(), dim=-1)
        out: list = [(ids[0], None, [])]
        for pos in range(1, len(ids)):
            row = logprobs[pos - 1]
            top = []
            if k:
                values, indices = torch.topk(row, k)
                top = list(zip(indices.tolist(), values.tolist()))
            out.append((ids[pos], float(row[ids[pos]]), top))
        return out

    timeout = state.config.request_timeout
    steps = [lambda ids=ids: score(ids) for ids in prompts_ids]
    return await state.offload.run(steps, deadline=arrival + timeout, timeout=timeout, request=request)
