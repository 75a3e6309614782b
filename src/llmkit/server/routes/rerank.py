"""Rerank and score: ``POST /v1/rerank`` in the Cohere/Jina shape (as vLLM and llama.cpp serve
it) and ``POST /v1/score`` in vLLM's shape, both from the model's own query likelihood
(``llmkit.relevance``), run through the engine like any generation: every pair of a request
decodes in the same batch, under the request's time limit, counted in the metrics."""

from __future__ import annotations

import time
import uuid
from typing import Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from llmkit import relevance
from llmkit.server import prompts, schemas
from llmkit.server.bodies import parse
from llmkit.server.errors import bad_request
from llmkit.server.offload import ClientGone
from llmkit.server.openapi import body
from llmkit.server.running import Run
from llmkit.server.state import ServerState, state_of

router = APIRouter()

_ALLOW = ConfigDict(extra="allow")
_ERRORS = {status: {"model": schemas.ErrorResponse} for status in (400, 401, 404, 429, 503)}


class RerankDocument(BaseModel):
    model_config = _ALLOW
    text: str


class RerankRequest(BaseModel):
    model_config = _ALLOW
    model: Optional[str] = None
    query: str = Field(min_length=1)
    documents: list[Union[str, RerankDocument]] = Field(min_length=1, description="Texts, or objects with a text.")
    top_n: Optional[int] = Field(default=None, ge=0, description="Return the n most relevant; none or 0: all.")
    return_documents: bool = Field(default=True, description="Include each document's text in its result.")


class ScoreRequest(BaseModel):
    model_config = _ALLOW
    model: Optional[str] = None
    text_1: Union[str, list[str]] = Field(description="The query, or queries (one per text_2, or a single one).")
    text_2: Union[str, list[str]] = Field(description="The documents scored against text_1.")


class RerankResultDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="The document's position in the request.")
    relevance_score: float = Field(description="Geometric mean probability of the query's tokens given the "
                                   "document, in (0, 1]: higher is more relevant.")
    document: Optional[RerankResultDocument] = None


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult] = Field(description="Most relevant first.")
    usage: RerankUsage


class ScoreData(BaseModel):
    index: int
    object: str = "score"
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class ScoreResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


async def _scores(state: ServerState, request: Request, pairs: list[tuple[str, str]], param: str,
                  arrival: float) -> tuple[list[float], int]:
    """The relevance score of each (query, document) pair, and the tokens they took."""
    llm = state.need_model()
    prompts.check_texts([t for pair in pairs for t in pair], param, state.config)

    def tokenize() -> list[tuple[list[int], list[int]]]:
        return [relevance.scoring_ids(llm.tokenizer, q, d) for q, d in pairs]

    ids = await state.prep(tokenize)
    total = sum(len(p) + len(q) for p, q in ids)
    if total > state.config.max_request_tokens:
        raise bad_request(f"Scoring these texts takes {total} tokens, more than this server's limit of "
                          f"{state.config.max_request_tokens} per request (max_request_tokens); send fewer or "
                          "shorter documents per request.", param=param, code="request_too_large")
    if any(not q for _, q in ids):
        raise bad_request("The query is empty: give at least one token of text to score.", param=param)
    jobs = relevance.scoring_requests(llm, ids)
    for i, job in enumerate(jobs):
        need = len(job.prompt_ids) + job.params.max_tokens
        if need > llm.context_length:
            where = f"{param}[{i}]" if len(jobs) > 1 else param
            raise bad_request(f"Scoring {where} takes {need} tokens (prompt, document and query), more than the "
                              f"model's context window of {llm.context_length}; shorten the document.",
                              param=param, code="context_length_exceeded")
    run = Run(state, jobs, arrival, request, poll_disconnect=True)
    logprobs: list[list[float]] = [[] for _ in jobs]
    async for i, event in run.events():
        if event.logprob is not None:
            logprobs[i].append(event.logprob)
    return [relevance.score_of(lp) for lp in logprobs], total


@router.post("/v1/rerank", openapi_extra=body(RerankRequest), responses={200: {"model": RerankResponse}, **_ERRORS},
             summary="Rerank documents by relevance to a query (Cohere/Jina shape), from the model's query likelihood.")
@router.post("/rerank", include_in_schema=False)
@router.post("/v2/rerank", include_in_schema=False)
async def rerank(request: Request):
    arrival = time.perf_counter()
    state = state_of(request)
    req = await parse(request, RerankRequest)
    state.need_model()
    state.check_model(req.model)
    texts = [d if isinstance(d, str) else d.text for d in req.documents]
    try:
        scores, total = await _scores(state, request, [(req.query, t) for t in texts], "documents", arrival)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it
    order = sorted(range(len(texts)), key=lambda i: -scores[i])
    if req.top_n:
        order = order[: req.top_n]
    results = []
    for i in order:
        result = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            result["document"] = {"text": texts[i]}
        results.append(result)
    return state.middleware.answer({"id": f"rerank-{uuid.uuid4().hex}", "model": state.config.model_name,
                                    "results": results, "usage": {"total_tokens": total}})


def _pairs(req: ScoreRequest) -> list[tuple[str, str]]:
    """vLLM's pairing: one text_1 against every text_2, or text_1[i] against text_2[i]."""
    queries = [req.text_1] if isinstance(req.text_1, str) else req.text_1
    documents = [req.text_2] if isinstance(req.text_2, str) else req.text_2
    if not queries or not documents:
        raise bad_request("text_1 and text_2 must not be empty lists.", param="text_1" if not queries else "text_2")
    if len(queries) == 1:
        return [(queries[0], d) for d in documents]
    if len(queries) != len(documents):
        raise bad_request(f"text_1 has {len(queries)} texts and text_2 {len(documents)}: give one text_1 for all, "
                          "or as many text_1 as text_2 (scored pairwise).", param="text_2")
    return list(zip(queries, documents))


@router.post("/v1/score", openapi_extra=body(ScoreRequest), responses={200: {"model": ScoreResponse}, **_ERRORS},
             summary="Relevance score of text pairs (vLLM shape), from the model's query likelihood.")
@router.post("/score", include_in_schema=False)
async def score(request: Request):
    arrival = time.perf_counter()
    state = state_of(request)
    req = await parse(request, ScoreRequest)
    state.need_model()
    state.check_model(req.model)
    pairs = _pairs(req)
    try:
        scores, total = await _scores(state, request, pairs, "text_2", arrival)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    return state.middleware.answer({"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                                    "model": state.config.model_name, "data": data,
                                    "usage": {"prompt_tokens": total, "total_tokens": total}})
