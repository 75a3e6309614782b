"""The generation engine: runs several requests together over one model and one KV cache.

Each request gets a cache slot. Prompts are prefilled in chunks into their slot; then all live
requests decode together, one token each per step, each at its own position. A request leaves
the batch as soon as it ends (end of sequence, a stop string, max_tokens), so short answers
never wait for long ones. Text is produced incrementally: a UTF-8 character split across tokens
and a possible prefix of a stop string are held back until they are final.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from llmkit.errors import ContextLengthError
from llmkit.sampling import Sampler, SamplingParams, StopMatcher

PREFILL_CHUNK = 512  # tokens per prefill forward: bounds the attention mask and activations


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Event:
    """One step of one request: a new token and the text that became final with it."""

    index: int  # position of the request in the list given to Engine.run
    token: int | None
    text: str
    finish_reason: str | None = None  # "stop" | "length" once the request has ended


@dataclass
class _Live:
    index: int
    request: Request
    slot: int
    sampler: Sampler
    decoder: object
    stops: StopMatcher
    position: int = 0  # next position to write in the cache
    generated: list[int] = field(default_factory=list)


def _bucket(n: int, limit: int) -> int:
    """Round a cache length up to a power of two (at least 256), never past the context."""
    size = 256
    while size < n:
        size *= 2
    return min(size, limit)


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, context_length: int):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.vocab_size = model.config.vocab_size
        self._cache = None

    def check(self, request: Request) -> None:
        n, m = len(request.prompt_ids), request.params.max_tokens
        if n == 0:
            raise ContextLengthError("the prompt is empty: give at least one token of text")
        if n >= self.context_length:
            raise ContextLengthError(
                f"the prompt has {n} tokens, more than the model's context window of {self.context_length} "
                f"tokens leaves room for: shorten it by at least {n - self.context_length + 1} tokens."
            )
        if n + m > self.context_length:
            raise ContextLengthError(
                f"the prompt has {n} tokens and max_tokens is {m}: together {n + m}, more than the "
                f"model's context window of {self.context_length} tokens. Shorten the prompt or "
                f"lower max_tokens to at most {max(self.context_length - n, 0)}."
            )

    def _cache_for(self, slots: int, length: int):
        c = self._cache
        if c is None or c.slots < slots or c.max_len < length:
            c = self._cache = self.model.new_cache(slots, _bucket(length, self.context_length))
        return c

    @torch.inference_mode()
    def run(self, requests: Sequence[Request]) -> Iterator[Event]:
        """Generate for all requests together; yield events as tokens are produced."""
        for r in requests:
            r.params.validate()
            self.check(r)
        if not requests:
            return
        longest = max(len(r.prompt_ids) + r.params.max_tokens for r in requests)
        cache = self._cache_for(len(requests), longest)
        eos = self.tokenizer.eos_token_ids
        live: list[_Live] = []
        for i, r in enumerate(requests):
            seq = _Live(i, r, i, Sampler(r.params, self.vocab_size), self.tokenizer.stream_decoder(skip_special_tokens=True),
                        StopMatcher(r.params.stop))
            logits = self._prefill(cache, seq)
            event = self._advance(seq, logits, eos)
            yield event
            if event.finish_reason is None:
                live.append(seq)
        while live:
            tokens = torch.tensor([[s.generated[-1]] for s in live])
            positions = torch.tensor([[s.position] for s in live])
            slots = torch.tensor([s.slot for s in live])
            logits = self.model(tokens, positions=positions, cache=cache, slots=slots)[:, -1]
            for s in live:
                s.position += 1
            still = []
            for row, s in zip(logits, live):
                event = self._advance(s, row, eos)
                yield event
                if event.finish_reason is None:
                    still.append(s)
            live = still

    def _prefill(self, cache, seq: _Live) -> torch.Tensor:
        ids = seq.request.prompt_ids
        slots = torch.tensor([seq.slot])
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = torch.tensor([ids[start : start + PREFILL_CHUNK]])
            positions = torch.arange(start, start + chunk.shape[1])[None]
            logits = self.model(chunk, positions=positions, cache=cache, slots=slots, last_only=True)
        seq.position = len(ids)
        return logits[0, -1]

    def _advance(self, seq: _Live, logits: torch.Tensor, eos: set[int]) -> Event:
        """Sample one token for seq and turn it into an event (with its final text)."""
        p = seq.request.params
        for process in p.logits_processors:
            logits = process(seq.generated, logits)
        token = seq.sampler.sample(logits, seq.request.prompt_ids)
        seq.generated.append(token)
        ends = (token in eos and not p.ignore_eos) or token in p.stop_token_ids
        if ends:
            text, hit = seq.stops.feed(seq.decoder.flush())
            return Event(seq.index, token, text + ("" if hit else seq.stops.flush()), "stop")
        text, hit = seq.stops.feed(seq.decoder.add(token))
        if hit:
            return Event(seq.index, token, text, "stop")
        if len(seq.generated) >= p.max_tokens:
            # cut off mid-character: drop the incomplete bytes rather than emit U+FFFD
            tail, hit = seq.stops.feed(seq.decoder.flush().rstrip("\ufffd"))
            return Event(seq.index, token, text + tail + ("" if hit else seq.stops.flush()), "length")
        return Event(seq.index, token, text)
