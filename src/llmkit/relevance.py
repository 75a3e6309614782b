"""How relevant a document is to a query, from the model's own log-likelihood: the reranking and
scoring behind the server's ``/v1/rerank`` and ``/v1/score``.

The score is how likely the model finds the query as a question written about the document:
the mean log-probability of the query's tokens after a prompt that shows the document and asks
for a question about it (unsupervised passage reranking by query likelihood, Sachan et al. 2022,
"Improving Passage Retrieval with Zero-Shot Question Generation"). A generative model does this
with no training for the task: a document that holds the answer makes the words of the question
predictable. (Asking the model "does this document answer the query? Yes or No" and reading the
probability of "Yes" is the other common way; with the small default model it ranked a document
about Paris above one about car engines for the question how a car engine works, where query
likelihood ranked all three questions of the tests' small set right.)

The query is scored through the engine like any generation: one request per (query, document)
pair whose tokens are forced to be the query's, with each forced token's log-probability under
the model's own distribution reported (``logprobs``); the pairs of a request decode together in
the engine's batch. ``relevance_score`` is ``exp`` of the mean: the geometric mean of the query
tokens' probabilities, in (0, 1], higher is more relevant.

The same forcing scores a whole text (the server's echoed prompt with logprobs): every token after
the first, forced after the first, on the base model or a LoRA adapter like any generation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from llmkit.errors import InvalidSamplingError
from llmkit.sampling import SamplingParams

__all__ = ["scoring_ids", "scoring_requests", "score_of", "rerank", "text_scoring_requests", "text_logprobs",
           "PASSAGE_PROMPT"]

PASSAGE_PROMPT = "Passage: {document}\nPlease write a question based on this passage."


def scoring_ids(tokenizer, query: str, document: str) -> tuple[list[int], list[int]]:
    """(prompt ids, query ids) of one pair. With a chat template the prompt is a user turn and the
    query the assistant's answer (thinking turned off where the template reads
    ``enable_thinking``); without one, plain text that ends in "Question:"."""
    instruction = PASSAGE_PROMPT.format(document=document)
    if tokenizer.chat_templates:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                               add_generation_prompt=True, enable_thinking=False)
        return tokenizer.encode(prompt), tokenizer.encode(query)
    return tokenizer.encode(instruction + "\nQuestion:", add_special_tokens=True), tokenizer.encode(" " + query)


def _forcing(target: list[int]):
    """A logits processor that allows only the next token of ``target``."""

    def force(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(logits, -math.inf)
        out[target[len(generated)]] = 0.0
        return out

    return force


def scoring_requests(llm, pairs: Sequence[tuple[list[int], list[int]]], *, top: int = 0,
                     adapter: str | None = None) -> list:
    """One engine request per (prompt ids, query ids): the query's tokens forced, each one's
    log-probability reported (``Event.logprob``), with the ``top`` most likely tokens at its
    place (``Event.top_logprobs``); on the LoRA adapter ``adapter`` (None: the base model)."""
    out = []
    for prompt_ids, query_ids in pairs:
        if not query_ids:
            raise InvalidSamplingError("the query is empty: give at least one token of text to score.")
        params = SamplingParams(max_tokens=len(query_ids), temperature=0, ignore_eos=True,
                                logits_processors=[_forcing(list(query_ids))])
        out.extend(llm.requests([prompt_ids], params, logprobs=top, speculative=False, adapter=adapter))
    return out


def text_scoring_requests(llm, texts: Sequence[Sequence[int]], *, top: int = 0, adapter: str | None = None) -> list:
    """The scoring of whole texts (an echoed prompt's logprobs): each text's tokens after its
    first forced after that first one. Texts of one token have nothing to score: no request."""
    return scoring_requests(llm, [(list(ids[:1]), list(ids[1:])) for ids in texts if len(ids) > 1],
                            top=top, adapter=adapter)


def text_logprobs(texts: Sequence[Sequence[int]], events: Sequence[Sequence]) -> list[list[tuple]]:
    """Per text, (token, logprob, top alternatives as (token, logprob)) for each of its tokens,
    logprob None for the first (nothing comes before it); ``events``: the token events of each
    of ``text_scoring_requests``'s requests, in order."""
    out, scored = [], iter(events)
    for ids in texts:
        rows = [(ids[0], None, [])]
        if len(ids) > 1:
            rows += [(token, e.logprob, list(e.top_logprobs or [])) for token, e in zip(ids[1:], next(scored))]
        out.append(rows)
    return out


def score_of(logprobs: Sequence[float]) -> float:
    """The relevance score of one pair from its query tokens' log-probabilities."""
    return math.exp(sum(logprobs) / len(logprobs))


def rerank(llm, query: str, documents: Sequence[str]) -> list[float]:
    """The relevance score of each document to ``query`` (same order as ``documents``)."""
    pairs = [scoring_ids(llm.tokenizer, query, d) for d in documents]
    requests = scoring_requests(llm, pairs)
    for request in requests:
        llm.check(request)
    logprobs: list[list[float]] = [[] for _ in requests]
    for event in llm.run(requests):
        if event.logprob is not None:
            logprobs[event.index].append(event.logprob)
    return [score_of(lp) for lp in logprobs]
