"""Liveness, readiness, Prometheus metrics, and the list of models."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmkit.server import schemas
from llmkit.server.errors import APIError
from llmkit.server.metrics import CONTENT_TYPE
from llmkit.server.state import state_of

router = APIRouter()


@router.get("/health", summary="Liveness: 200 while the process serves HTTP.")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: 200 once the model is loaded, 503 before and while shutting down.",
            responses={503: {"model": schemas.ErrorResponse}})
async def ready(request: Request):
    state = state_of(request)
    if state.ready:
        return {"status": "ready", "model": state.config.model_name}
    if state.draining:
        return APIError(503, "shutting down", code="shutting_down").response()
    if state.load_error:
        return APIError(503, f"the model failed to load: {state.load_error}", code="model_load_failed").response()
    return APIError(503, "the model is loading", code="model_loading", headers={"Retry-After": "5"}).response()


@router.get("/metrics", summary="Prometheus metrics (llmkit: prefix, vLLM's names).")
async def prometheus(request: Request) -> Response:
    return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", response_model=schemas.ModelList,
            summary="The model this server runs, and the LoRA adapters served beside it.")
async def models(request: Request):
    state = state_of(request)
    context = state.llm.context_length if state.llm is not None else None
    card = {"id": state.config.model_name, "object": "model", "created": int(state.started), "owned_by": "llmkit",
            "max_model_len": context}
    adapters = [{**card, "id": name, "parent": state.config.model_name} for name in
                (state.llm.adapters if state.llm is not None else [])]
    return {"object": "list", "data": [card, *adapters]}
