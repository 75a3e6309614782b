"""OpenAI's Responses API: ``POST /v1/responses`` (whole, or streamed as typed events) and the
responses kept for later turns, ``GET`` and ``DELETE /v1/responses/{id}``.

A Responses request is translated into a chat request (``llmkit.server.responses_api``) and run
by the chat route's own pipeline (``completions.start_chat``); its answer is translated back
(``llmkit.server.responses_output``).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from llmkit.errors import LLMKitError
from llmkit.server import errors, schemas
from llmkit.server.bodies import parse
from llmkit.server.errors import APIError
from llmkit.server.openapi import body
from llmkit.server.responses_api import PARAMS, ResponsesRequest, chat_request, input_items
from llmkit.server.responses_output import EventStream, Turn, stored_history, typed_sse
from llmkit.server.routes.completions import start_chat
from llmkit.server.state import state_of

router = APIRouter()

_ERRORS = {status: {"model": schemas.ErrorResponse} for status in (400, 401, 404, 429, 503)}
_RESPONSE = {"description": "A Response object; with stream: true, server-sent events (response.created, "
                            "response.output_text.delta, ..., response.completed).",
             "content": {"application/json": {}, "text/event-stream": {}}}


@router.post("/v1/responses", openapi_extra=body(ResponsesRequest), summary="Create a response (OpenAI's "
             "Responses API; stream: typed server-sent events).", responses={200: _RESPONSE, **_ERRORS})
async def create_response(request: Request):
    arrival = time.perf_counter()
    state = state_of(request)
    req = await parse(request, ResponsesRequest, generation=True)
    history: list[dict] = []
    if req.previous_response_id is not None:
        stored = state.responses.get(req.previous_response_id)
        if stored is None:
            raise APIError(404, f"Previous response with id {req.previous_response_id!r} not found: it was not "
                                "stored (store: false), was deleted, or left this server's store "
                                "(max_stored_responses). Send the whole conversation as input instead.",
                           param="previous_response_id", code="previous_response_not_found")
        history = stored.history
    items = [*history, *input_items(req)]
    try:
        state, gen, run, _ = await start_chat(request, chat_request(req, items, len(history)), arrival)
    except APIError as exc:
        exc.param = PARAMS.get(exc.param, exc.param)
        raise
    except LLMKitError as exc:
        error = errors.from_llmkit_error(exc)
        error.param = PARAMS.get(error.param, error.param)
        raise error from None
    turn = Turn(req, state.config.model_name)

    def keep(response: dict) -> None:
        if req.store:
            state.responses.put(response, stored_history(items, response))

    if req.stream:
        chunks = state.middleware.stream(gen.chat_chunks(run, include_usage=True, with_logprobs=False))
        return typed_sse(EventStream(turn, keep).events(chunks))
    await gen.collect(run)
    response = turn.from_chat(state.middleware.on_response(gen.chat_body(False)))
    keep(response)
    return JSONResponse(response)


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id {response_id!r} not found: it was not stored (store: false), was "
                         "deleted, or left this server's store (max_stored_responses).", param="response_id",
                    code="response_not_found")


@router.get("/v1/responses/{response_id}", summary="A stored response.", responses={200: _RESPONSE, **_ERRORS})
async def get_response(request: Request, response_id: str):
    stored = state_of(request).responses.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return JSONResponse(stored.response)


@router.delete("/v1/responses/{response_id}", summary="Delete a stored response.", responses=_ERRORS)
async def delete_response(request: Request, response_id: str):
    if not state_of(request).responses.delete(response_id):
        raise _not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
