"""From a validated completion request to engine requests, built by ``LLM.requests`` (the one
place that decides choices and their seeds): sampling settings, the work bound of one request,
and JSON-schema or tool-call constraints."""

from __future__ import annotations

import asyncio
import dataclasses
import re

from llmkit.reasoning import budget_for_effort
from llmkit.sampling import SamplingParams
from llmkit.server import schemas, tools
from llmkit.server.config import ServerConfig
from llmkit.server.errors import APIError, bad_request

# The request fields that are sampling settings: SamplingParams' own fields that the API also has.
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name in schemas._Sampling.model_fields)
_TOKEN_ID = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() also takes "²", which int() refuses


def logit_bias(raw: dict[str, float] | None, vocab: int) -> dict[int, float] | None:
    """OpenAI's logit_bias (token id as a JSON key -> bias in [-100, 100]) with int keys."""
    if not raw:
        return None
    out = {}
    for key, value in raw.items():
        text = key.strip()
        if not _TOKEN_ID.fullmatch(text) or int(text) >= vocab:
            raise bad_request(f"logit_bias key {key!r} is not a token id: keys are token ids in [0, {vocab}).",
                              param="logit_bias", code="invalid_value")
        if not -100 <= value <= 100:
            raise bad_request(f"logit_bias[{key!r}]={value!r}: biases must be in [-100, 100].", param="logit_bias")
        out[int(text)] = value
    return out


def sampling_params(req, max_tokens: int, vocab: int) -> SamplingParams:
    """The request's sampling settings; SamplingParams checks them (InvalidSamplingError: a 400)."""
    values = {name: getattr(req, name) for name in SAMPLING_FIELDS if getattr(req, name) is not None}
    values["max_tokens"] = max_tokens
    if req.top_k is not None:
        values["top_k"] = max(req.top_k, 0)  # OpenAI-style servers take -1 for "off"
    values["logit_bias"] = logit_bias(req.logit_bias, vocab)
    budget = thinking_budget(req)
    if budget is not None:
        values["max_thinking_tokens"] = budget
    return SamplingParams(**values)


def thinking_budget(req) -> int | None:
    """A chat request's thinking-token budget: ``max_thinking_tokens``, else by ``reasoning_effort``."""
    budget = getattr(req, "max_thinking_tokens", None)
    return budget if budget is not None else budget_for_effort(getattr(req, "reasoning_effort", None))


def max_tokens_for(req_max: int | None, prompt_len: int, context: int, config: ServerConfig) -> int:
    """What a choice may generate: as asked, else the server's default within what the context leaves."""
    if req_max is not None:
        return req_max
    return max(1, min(config.default_max_tokens, context - prompt_len))


def check_work(config: ServerConfig, prompts: list[list[int]], n: int, max_tokens: list[int],
               logprobs: int | None, echo: bool = False) -> None:
    """A 400 that names the limit when one request asks for more work than ``max_request_tokens``:
    its choices' prompt and generated tokens, or the logprob entries it would return."""
    limit = config.max_request_tokens
    tokens = n * sum(len(p) + m for p, m in zip(prompts, max_tokens))
    if tokens > limit:
        raise bad_request(
            f"This request asks for up to {tokens} tokens of work ({len(prompts)} prompt(s) x n={n} choices, "
            f"prompt plus max_tokens each), more than this server's limit of {limit} per request "
            "(max_request_tokens); lower n or max_tokens, or split the request.", param="n",
            code="request_too_large")
    if logprobs is not None:
        entries = (1 + logprobs) * (n * sum(max_tokens) + (sum(len(p) for p in prompts) if echo else 0))
        if entries > limit:
            raise bad_request(
                f"This request asks for up to {entries} logprob entries (tokens x (1 + {logprobs} alternatives)), "
                f"more than this server's limit of {limit} per request (max_request_tokens); lower n, "
                "max_tokens or the number of top logprobs.", param="logprobs", code="request_too_large")


async def build(state, req, prompts: list[list[int]], max_tokens: int | None, k: int | None,
                tool_schema: dict | None = None, adapter: str | None = None) -> list:
    """Engine requests for every choice (``LLM.requests``: n per prompt, choice = prompt * n + j),
    each checked against the context window before any schema is compiled. ``tool_schema``: a
    tool call to enforce while decoding (``tools.ToolPlan.schema``)."""
    llm = state.llm
    vocab = llm.config.vocab_size
    limits = [max_tokens_for(max_tokens, len(ids), llm.context_length, state.config) for ids in prompts]
    rf = req.response_format.model_dump(by_alias=True, exclude_none=True) if req.response_format else None
    if rf and rf.get("type") == "json_schema" and not (rf.get("json_schema") or {}).get("schema"):
        raise bad_request("response_format json_schema needs json_schema.schema.", param="response_format")
    params = sampling_params(req, limits[0], vocab)
    for request, m in zip(llm.requests(prompts, params, n=1, logprobs=k, adapter=adapter), limits):
        request.params = request.params.replace(max_tokens=m)
        llm.check(request)  # the context first: the error that says most
    # then the work, before the choices are made (n of each prompt) and any schema is compiled
    check_work(state.config, prompts, req.n, limits, k)
    requests = llm.requests(prompts, params, n=req.n, logprobs=k, adapter=adapter)
    for i, request in enumerate(requests):
        m = limits[i // req.n]
        if m != request.params.max_tokens:
            request.params = request.params.replace(max_tokens=m)
    constrained = tool_schema is not None or (rf and rf.get("type") != "text")
    if constrained:
        processors = await asyncio.to_thread(_processors, llm, rf, tool_schema, len(requests))
        for request, processor in zip(requests, processors):
            request.params = request.params.replace(logits_processors=[processor])
    return requests


def _processors(llm, rf: dict | None, tool_schema: dict | None, count: int) -> list:
    """One logits processor per choice (each keeps its own state while decoding)."""
    param = "tools" if tool_schema is not None else "response_format"
    try:
        from llmkit.constrain import UnsupportedSchemaError, json_schema_processor, processor_for_response_format
    except ImportError:
        raise APIError(400, f"{param} needs llmkit.constrain, which this installation lacks.", param=param) from None
    vocab = llm.config.vocab_size
    if tool_schema is None:
        return [processor_for_response_format(llm.tokenizer, vocab, rf) for _ in range(count)]
    try:
        return [json_schema_processor(llm.tokenizer, vocab, tool_schema, tools.WRAP) for _ in range(count)]
    except UnsupportedSchemaError as exc:
        raise APIError(400, f"A tool's parameters cannot be enforced while decoding: {exc}", param="tools",
                       code="unsupported_schema") from None


def check_prompt(llm, ids: list[int]) -> None:
    """ContextLengthError (a 400) if ``ids`` leaves no room to generate even one token."""
    (probe,) = llm.requests([ids], SamplingParams(max_tokens=1))
    llm.check(probe)
