"""Assembling OpenAI responses from engine events: whole answers, or stream chunks, for chat
and text completions, with logprobs and tool calls."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, AsyncIterator

from llmkit import reasoning
from llmkit.server import tools
from llmkit.server.offload import ClientGone
from llmkit.server.running import Run


class Tokens:
    """Each token's own bytes and text, for logprobs."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.special = tokenizer.special_ids
        from llmkit.tokenizer import _byte_alphabet

        alphabet = set(_byte_alphabet().values())
        sample = [tokenizer.id_to_token(i) or "" for i in range(min(len(tokenizer), 2000))]
        chars = sum(len(s) for s in sample) or 1
        self.byte_level = sum(ch in alphabet for s in sample for ch in s) / chars > 0.99
        self.inverse = {c: b for b, c in _byte_alphabet().items()}
        self.cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        hit = self.cache.get(token)
        if hit is not None:
            return hit
        piece = self.tok.id_to_token(token) or ""
        if token in self.special:
            raw = piece.encode()
        elif self.byte_level:
            try:
                raw = bytes(self.inverse[c] for c in piece)
            except KeyError:
                raw = piece.encode()
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            raw = bytes([int(piece[3:5], 16)])
        else:
            raw = piece.replace("\u2581", " ").encode()
        out = (raw.decode("utf-8", errors="replace"), raw)
        self.cache[token] = out
        return out


_token_tables: dict[int, Tokens] = {}


def _tokens_for(tokenizer) -> Tokens:
    table = _token_tables.get(id(tokenizer))
    if table is None or table.tok is not tokenizer:
        table = _token_tables[id(tokenizer)] = Tokens(tokenizer)
    return table


def _num(x: float) -> float:
    # JSON has no -Infinity: a token the mask removed has logprob -inf
    return x if math.isfinite(x) else -9999.0


class Generation:
    """Assembles OpenAI responses (whole, or as stream chunks) from engine events."""

    def __init__(self, prefix: str, model: str, prompt_lens: list[int], n: int, tokenizer,
                 plan: tools.ToolPlan | None = None):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.tools = plan  # tools offered to the model: its output is parsed for calls
        self.created = int(time.time())
        self.model = model
        self.prompt_lens = prompt_lens
        self.n = n
        count = len(prompt_lens) * n
        self.texts: list[list[str]] = [[] for _ in range(count)]
        self.tokens = [0] * count
        self.logprobs: list[list] = [[] for _ in range(count)]
        self.finish: list[str | None] = [None] * count
        self.table = _tokens_for(tokenizer)
        self.echo: list | None = None
        # for a model that thinks (keep_reasoning_apart): markers, whether the prompt opened the
        # block, and per choice a splitter of the streamed text and a counter of reasoning tokens
        self.markers: tuple[str, str] | None = None
        self.opened = False
        self.splitters: list[reasoning.ReasoningSplitter] = []
        self.trackers: list[reasoning.ThinkingTracker | None] = []

    def keep_reasoning_apart(self, tokenizer, prompt_ids: list[int]) -> None:
        """For a model whose chat template thinks: each choice's reasoning comes apart from its
        answer (``reasoning_content``) and its tokens are counted (``reasoning_tokens``). Nothing
        changes for a model that does not think."""
        self.markers = reasoning.markers(tokenizer)
        if self.markers is None:
            return
        self.opened = reasoning.prompt_is_open(tokenizer, prompt_ids, self.markers[0])
        self.splitters = [reasoning.ReasoningSplitter(*self.markers, open=self.opened) for _ in self.texts]
        self.trackers = [reasoning.tracker_for(tokenizer, prompt_ids) for _ in self.texts]

    # -- shared

    def _record(self, i: int, event) -> None:
        if event.token is not None:
            self.tokens[i] += 1
            if self.trackers and self.trackers[i] is not None:
                self.trackers[i].accept(event.token)
            if event.logprob is not None:
                self.logprobs[i].append((event.token, event.logprob, event.top_logprobs or []))
        self.texts[i].append(event.text)
        if event.finish_reason is not None:
            self.finish[i] = event.finish_reason

    def _events(self, run: Run):
        self.handles = run.handles  # what the engine says of each choice: cached prompt tokens
        return run.events()

    def usage(self) -> dict:
        prompt = sum(self.prompt_lens)
        completion = sum(self.tokens)
        out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if self.trackers:
            out["completion_tokens_details"] = {"reasoning_tokens": sum(t.tokens for t in self.trackers if t)}
        handles = getattr(self, "handles", None)
        if handles:  # as OpenAI reports prompt caching: per prompt, the tokens its choices reused
            out["prompt_tokens_details"] = {"cached_tokens": sum(
                max(h.cached_tokens for h in handles[p * self.n : (p + 1) * self.n]) for p in range(len(self.prompt_lens)))}
        return out

    async def collect(self, run: Run) -> None:
        try:
            async for i, event in self._events(run):
                self._record(i, event)
        except ClientGone:
            pass

    # -- chat

    def _chat_logprob(self, token: int, logprob: float, top) -> dict:
        text, raw = self.table(token)
        return {"token": text, "logprob": _num(logprob), "bytes": list(raw),
                "top_logprobs": [{"token": self.table(t)[0], "logprob": _num(lp), "bytes": list(self.table(t)[1])}
                                 for t, lp in top]}

    def _finish_reason(self, reason: str | None, calls: list[dict]) -> str | None:
        if not calls:
            return _reason(reason)
        return "function_call" if self.tools.legacy else "tool_calls"

    def chat_body(self, with_logprobs: bool) -> dict:
        choices = []
        for i in range(len(self.texts)):
            text, calls, thought = "".join(self.texts[i]), [], None
            if self.markers is not None:
                thought, text = reasoning.split(text, *self.markers, open=self.opened)
            if self.tools is not None:
                text, calls = tools.parse(text, self.tools)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thought is not None:
                message["reasoning_content"] = thought
            if calls and self.tools.legacy:
                message["function_call"] = calls[0]["function"]
            elif calls:
                message["tool_calls"] = calls
            choices.append({
                "index": i,
                "message": message,
                "logprobs": {"content": [self._chat_logprob(*x) for x in self.logprobs[i]]} if with_logprobs else None,
                "finish_reason": self._finish_reason(self.finish[i], calls),
            })
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def _chunk(self, obj: str, choices: list, include_usage: bool) -> dict:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if include_usage:
            body["usage"] = None
        return body

    async def chat_chunks(self, run: Run, include_usage: bool, with_logprobs: bool) -> AsyncIterator[dict]:
        def chunk(i: int, delta: dict, logprobs=None, reason=None) -> dict:
            return self._chunk("chat.completion.chunk", [{"index": i, "delta": delta, "logprobs": logprobs,
                                                          "finish_reason": reason}], include_usage)

        # with tools, text that may be a tool call is held back until the choice ends
        splitters = [tools.StreamSplitter(self.tools) if self.tools else None for _ in self.texts]
        for i in range(len(self.texts)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, event in self._events(run):
            self._record(i, event)
            text = event.text
            if self.splitters:  # the reasoning goes apart, before any tool-call parsing of the answer
                thought, text = self.splitters[i].feed(text)
                if event.finish_reason is not None:
                    more_thought, more_text = self.splitters[i].finish()
                    thought, text = thought + more_thought, text + more_text
                if thought:
                    yield chunk(i, {"reasoning_content": thought})
            text = splitters[i].feed(text) if splitters[i] else text
            if text or (with_logprobs and event.token is not None):
                logprobs = None
                if with_logprobs and event.token is not None and event.logprob is not None:
                    logprobs = {"content": [self._chat_logprob(event.token, event.logprob, event.top_logprobs or [])]}
                yield chunk(i, {"content": text}, logprobs)
            if event.finish_reason is not None:
                calls = []
                if splitters[i]:
                    rest, calls = splitters[i].finish()
                    if rest:
                        yield chunk(i, {"content": rest})
                for j, call in enumerate(calls):  # as OpenAI streams them: id and name, then the arguments
                    name = {"name": call["function"]["name"], "arguments": ""}
                    arguments = {"arguments": call["function"]["arguments"]}
                    if self.tools.legacy:
                        yield chunk(i, {"function_call": name})
                        yield chunk(i, {"function_call": arguments})
                        break
                    yield chunk(i, {"tool_calls": [{"index": j, "id": call["id"], "type": "function",
                                                    "function": name}]})
                    yield chunk(i, {"tool_calls": [{"index": j, "function": arguments}]})
                yield chunk(i, {}, reason=self._finish_reason(event.finish_reason, calls))
        if include_usage:
            yield {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": [], "usage": self.usage()}

    # -- text completions

    def _completion_logprobs(self, entries: list, start: int) -> dict:
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = start
        for token, logprob, alternatives in entries:
            text = self.table(token)[0]
            tokens.append(text)
            token_logprobs.append(None if logprob is None else _num(logprob))
            top.append(None if logprob is None else {self.table(t)[0]: _num(lp) for t, lp in alternatives})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _echo_for(self, i: int) -> tuple[str, list | None]:
        if self.echo is None:
            return "", None
        return self.echo[i // self.n]

    def completion_body(self, with_logprobs: bool) -> dict:
        choices = []
        for i in range(len(self.texts)):
            prefix, prompt_lp = self._echo_for(i)
            logprobs = None
            if with_logprobs:
                entries = (prompt_lp or []) + self.logprobs[i]
                logprobs = self._completion_logprobs(entries, 0)
            choices.append({"index": i, "text": prefix + "".join(self.texts[i]), "logprobs": logprobs,
                            "finish_reason": _reason(self.finish[i] or "length")})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    async def completion_chunks(self, run: Run | None, include_usage: bool,
                                with_logprobs: bool) -> AsyncIterator[dict]:
        offsets = [0] * len(self.texts)
        if self.echo is not None:
            for i in range(len(self.texts)):
                prefix, prompt_lp = self._echo_for(i)
                logprobs = self._completion_logprobs(prompt_lp or [], 0) if with_logprobs else None
                offsets[i] = len(prefix)
                yield self._chunk("text_completion", [{"index": i, "text": prefix, "logprobs": logprobs,
                                                       "finish_reason": None if run else "length"}], include_usage)
        if run is not None:
            async for i, event in self._events(run):
                self._record(i, event)
                if event.text or (with_logprobs and event.token is not None) or event.finish_reason:
                    logprobs = None
                    if with_logprobs and event.token is not None and event.logprob is not None:
                        logprobs = self._completion_logprobs(
                            [(event.token, event.logprob, event.top_logprobs or [])], offsets[i])
                    offsets[i] += len(event.text)
                    yield self._chunk("text_completion", [{"index": i, "text": event.text, "logprobs": logprobs,
                                                           "finish_reason": _reason(event.finish_reason)}],
                                      include_usage)
        if include_usage:
            yield {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                   "choices": [], "usage": self.usage()}


def _reason(reason: str | None) -> str | None:
    # "cancelled" reaches a client only when a shutdown's drain time ran out mid-generation
    return "abort" if reason == "cancelled" else reason
