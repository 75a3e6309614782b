"""Embeddings: the model's hidden states, mean-pooled and L2-normalised (``llmkit.tasks.embed``).

The forward passes run beside the engine's batch through ``ServerState.offload``: a bounded
queue, the request's time limit, and a stop between groups of inputs when the client leaves."""

from __future__ import annotations

import functools
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmkit.server import prompts, schemas
from llmkit.server.bodies import parse
from llmkit.server.errors import bad_request
from llmkit.server.offload import ClientGone
from llmkit.server.openapi import body
from llmkit.server.state import state_of

router = APIRouter()

# Tokens embedded per step of the worker: between steps it checks the deadline and the client.
STEP_TOKENS = 1024


def _groups(counts: list[int], budget: int) -> list[list[int]]:
    groups: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(counts):
        if groups[-1] and used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


@router.post("/v1/embeddings", response_model=schemas.EmbeddingList, openapi_extra=body(schemas.EmbeddingRequest),
             summary="Embeddings of texts: the model's hidden states, mean-pooled and L2-normalised.")
async def embeddings(request: Request):
    import numpy as np

    from llmkit.tasks import embed

    arrival = time.perf_counter()
    state = state_of(request)
    config = state.config
    req = await parse(request, schemas.EmbeddingRequest)
    llm = state.need_model()
    state.check_model(req.model)
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts or any(not t for t in texts):
        raise bad_request("input must be a non-empty string or a list of non-empty strings.", param="input")
    prompts.check_texts(texts, "input", config)
    counts = [len(ids) for ids in await state.prep(prompts.encode, llm.tokenizer, texts, True)]
    if max(counts) > llm.context_length:
        raise bad_request(f"An input has {max(counts)} tokens, more than the context size of "
                          f"{llm.context_length}.", param="input", code="context_length_exceeded")
    if sum(counts) > config.max_request_tokens:
        raise bad_request(f"The inputs have {sum(counts)} tokens together, more than this server's limit of "
                          f"{config.max_request_tokens} per request (max_request_tokens); send them in several "
                          "requests.", param="input", code="request_too_large")
    steps = [functools.partial(embed, llm, [texts[i] for i in group]) for group in _groups(counts, STEP_TOKENS)]
    try:
        parts = await state.offload.run(steps, deadline=arrival + config.request_timeout,
                                        timeout=config.request_timeout, request=request)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it
    vectors = np.concatenate(parts)
    if req.encoding_format == "base64":  # what the official client asks for by default
        import base64

        encoded = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        encoded = [v.tolist() for v in vectors]
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
    return state.middleware.answer({"object": "list", "data": data, "model": config.model_name,
                                    "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}})
