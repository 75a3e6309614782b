"""Tokenize and detokenize, with the served model's tokenizer and chat template."""

from __future__ import annotations

from fastapi import APIRouter, Request

from llmkit.server import prompts, schemas, tools
from llmkit.server.bodies import parse
from llmkit.server.errors import bad_request
from llmkit.server.openapi import body
from llmkit.server.state import state_of

router = APIRouter()


@router.post("/tokenize", response_model=schemas.TokenizeResponse, openapi_extra=body(schemas.TokenizeRequest),
             summary="Token ids of a prompt, or of a conversation rendered with the chat template.")
async def tokenize(request: Request):
    state = state_of(request)
    req = await parse(request, schemas.TokenizeRequest)
    llm = state.need_model()
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("Give either prompt or messages.", param="prompt")
    if req.messages is not None:
        prompts.check_messages(req.messages, state.config)
        plan = tools.ToolPlan([t.model_dump(exclude_none=True) for t in req.tools], "auto") if req.tools else None
        ids = await state.prep(prompts.chat_ids, llm.tokenizer, req.messages, req.add_generation_prompt, False, plan)
    else:
        prompts.check_texts([req.prompt], "prompt", state.config)
        (ids,) = await state.prep(prompts.encode, llm.tokenizer, [req.prompt], req.add_special_tokens)
    return state.middleware.answer({"tokens": ids, "count": len(ids), "max_model_len": llm.context_length})


@router.post("/detokenize", response_model=schemas.DetokenizeResponse,
             openapi_extra=body(schemas.DetokenizeRequest), summary="Text of token ids.")
async def detokenize(request: Request):
    state = state_of(request)
    req = await parse(request, schemas.DetokenizeRequest)
    llm = state.need_model()
    state.check_model(req.model)
    if len(req.tokens) > state.config.max_request_tokens:
        raise bad_request(f"tokens holds {len(req.tokens)} ids, more than this server's limit of "
                          f"{state.config.max_request_tokens} per request (max_request_tokens).", param="tokens",
                          code="request_too_large")
    prompts.check_ids(req.tokens, llm.config.vocab_size, "tokens")
    text = await state.prep(llm.tokenizer.decode, req.tokens)
    return state.middleware.answer({"prompt": text})
