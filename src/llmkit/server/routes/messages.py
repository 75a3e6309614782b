"""Anthropic's Messages API: ``POST /v1/messages`` (whole or streamed) and
``POST /v1/messages/count_tokens``.

A request is translated into a chat completion request (``llmkit.server.anthropic``) and run by
the chat route's own pipeline (``completions.start_chat``): the same prompt rendering, tool
enforcement, limits, engine requests and metrics. Plugins' middleware sees the request body as
the client sent it, and the answer in the chat completion shape (whole, or streamed through the
same hold-back as the chat route) before it becomes a Message: one response filter serves every
generation API.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from llmkit.server import anthropic, prompts, tools
from llmkit.server.bodies import parse
from llmkit.server.openapi import body, ref
from llmkit.server.routes.completions import start_chat
from llmkit.server.state import state_of

router = APIRouter()

_ERRORS = {status: {"model": anthropic.AnthropicError} for status in (400, 401, 404, 429, 503)}


@router.post("/v1/messages", openapi_extra=body(anthropic.AnthropicMessagesRequest),
             summary="Anthropic Messages (stream: server-sent message_start ... message_stop events).",
             responses={200: {"model": anthropic.AnthropicMessageResponse,
                              "content": {"text/event-stream": {"schema": ref(anthropic.AnthropicStreamEvent)}}},
                        **_ERRORS})
async def messages(request: Request):
    arrival = time.perf_counter()
    req = await parse(request, anthropic.AnthropicMessagesRequest, generation=True)
    state, gen, run, _ = await start_chat(request, anthropic.chat_request(req), arrival)
    outcome = anthropic.outcome(gen, state.llm.tokenizer, req)
    msg_id, model = anthropic.message_id(), req.model or state.config.model_name
    if req.stream:
        chunks = state.middleware.stream(gen.chat_chunks(run, True, False))
        return anthropic.sse(anthropic.EventWriter(outcome, msg_id, model).events(chunks))
    await gen.collect(run)
    chat_body = state.middleware.on_response(gen.chat_body(False))
    return JSONResponse(anthropic.message_body(chat_body, outcome, msg_id, model))


@router.post("/v1/messages/count_tokens", openapi_extra=body(anthropic.AnthropicCountTokensRequest),
             response_model=anthropic.AnthropicCountTokensResponse,
             summary="Tokens in a Messages request's prompt (system, messages and tools, as templated).",
             responses=_ERRORS)
async def count_tokens(request: Request):
    state = state_of(request)
    req = await parse(request, anthropic.AnthropicCountTokensRequest)
    llm = state.need_model()
    state.check_model(req.model)
    chat = anthropic.chat_request(req)
    prompts.check_messages(chat.messages, state.config)
    ids = await state.prep(prompts.chat_ids, llm.tokenizer, chat.messages, chat.add_generation_prompt,
                           chat.continue_final_message, tools.plan_for(chat), chat.chat_template_kwargs)
    return state.middleware.answer({"input_tokens": len(ids)})
