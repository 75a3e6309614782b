"""Plugins on the server: middleware (``register_middleware``) and extra routes (``register_routes``).

Middleware sees what the client will see. ``on_request`` gets a generation request's body before
the model does; ``on_response`` gets every response body before it is sent: chat and text
completions, embeddings, tokenize and detokenize. A streamed answer is not shown to it chunk by
chunk (an e-mail address split over two chunks would pass unseen): ``StreamView`` gives it, for
each choice, a chunk that holds the whole text so far with every logprob entry and tool call, and
sends only what became final since the last one. Text near the end of what has been generated
may still change meaning when the next tokens come, so the last word, and at least
``HOLD_BACK_CHARS`` characters, wait until more text (or the end of the choice) arrives.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from llmkit.errors import LLMKitError
from llmkit.server.errors import APIError

log = logging.getLogger("llmkit.server")

# Text held back from a stream while middleware may still change it: long enough for the
# multi-word things a filter looks for (a phone number, an IBAN written in groups).
HOLD_BACK_CHARS = 64
_SPACES = (" ", "\n", "\t", "\r")


def plugged(kind: str) -> list:
    """What plugins registered through ``register_<kind>`` (middleware, routes), in order."""
    from llmkit import plugins

    if not hasattr(plugins.Specs, f"register_{kind}"):
        return []
    return list(plugins.registry(kind).values())


def refused(exc: LLMKitError) -> APIError:
    """A middleware or plugin route said no: its message, as a 400."""
    return APIError(400, str(exc), code="rejected")


class Middleware:
    """The plugins' middleware, applied in registration order."""

    def __init__(self, middlewares: list):
        self.requests = [m for m in middlewares if hasattr(m, "on_request")]
        self.responses = [m for m in middlewares if hasattr(m, "on_response")]

    def on_request(self, body: dict) -> dict:
        return _through(self.requests, "on_request", body)

    def on_response(self, body: dict) -> dict:
        return _through(self.responses, "on_response", body)

    def answer(self, body: dict) -> JSONResponse:
        return JSONResponse(self.on_response(body))

    def stream(self, chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
        if not self.responses:
            return chunks
        return StreamView(self).filter(chunks)


# ------------------------------------------------------------------------------------------ streams


def final_upto(text: str, hold: int = HOLD_BACK_CHARS) -> int:
    """How much of ``text`` is final while more may follow: up to the last white space that lies
    at least ``hold`` characters before the end (never inside a word)."""
    limit = len(text) - hold
    if limit <= 0:
        return 0
    return max(0, *(text.rfind(ch, 0, limit + 1) for ch in _SPACES))


class _Choice:
    """One choice of a streamed answer: everything generated so far, and how much of it was sent."""

    def __init__(self, index: int):
        self.index = index
        self.text = ""  # as generated
        self.final = 0  # how much of it middleware has been shown as final
        self.sent = ""  # what the client has (after middleware)
        self.entries: list = []  # logprob entries, one per token
        self.token_ends: list[int] = []  # where each entry's token ends in the tokens' joined text
        self.entries_final = 0  # entries shown to middleware as final
        self.entries_sent = 0  # entries the client has
        self.calls: dict[int, dict] = {}  # tool calls, assembled from their deltas (sent at the end)
        self.function_call: dict | None = None  # the legacy form


class StreamView:
    """Streams through middleware: see the module docstring."""

    def __init__(self, middleware: Middleware):
        self.middleware = middleware
        self.choices: dict[int, _Choice] = {}

    async def filter(self, chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
        async for chunk in chunks:
            if len(chunk.get("choices") or ()) != 1:  # the usage chunk
                yield await asyncio.to_thread(self.middleware.on_response, chunk)
                continue
            for out in await asyncio.to_thread(self._feed, chunk):
                yield out

    def _feed(self, chunk: dict) -> list[dict]:
        c = chunk["choices"][0]
        choice = self.choices.setdefault(c["index"], _Choice(c["index"]))
        chat = "delta" in c
        delta = dict(c.get("delta") or {})
        choice.text += (delta.pop("content", None) if chat else c.get("text")) or ""
        self._add_logprobs(choice, c.get("logprobs"), chat)
        for call in delta.pop("tool_calls", None) or []:
            whole = choice.calls.setdefault(call.get("index", 0), {"function": {"arguments": ""}})
            for key in ("index", "id", "type"):
                if key in call:
                    whole[key] = call[key]
            function = call.get("function") or {}
            if "name" in function:
                whole["function"]["name"] = function["name"]
            whole["function"]["arguments"] += function.get("arguments") or ""
        if "function_call" in delta:
            function = delta.pop("function_call") or {}
            choice.function_call = choice.function_call or {"arguments": ""}
            if "name" in function:
                choice.function_call["name"] = function["name"]
            choice.function_call["arguments"] += function.get("arguments") or ""
        finished = c.get("finish_reason") is not None
        text_end = len(choice.text) if finished else final_upto(choice.text)
        entries_end = len(choice.entries) if finished else self._final_entries(choice)
        news = text_end > choice.final or entries_end > choice.entries_final
        if not (news or finished or delta):  # delta: what else it carried (the role)
            return []
        return self._release(chunk, choice, chat, delta, text_end, entries_end, finished)

    @staticmethod
    def _add_logprobs(choice: _Choice, logprobs: dict | None, chat: bool) -> None:
        if not logprobs:
            return
        if chat:
            rows = logprobs.get("content") or []
            texts = [row.get("token", "") for row in rows]
        else:
            rows = list(zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs.get("top_logprobs")
                            or [None] * len(logprobs["tokens"]), logprobs["text_offset"]))
            texts = [row[0] for row in rows]
        end = choice.token_ends[-1] if choice.token_ends else 0
        for row, text in zip(rows, texts):
            end += len(text)
            choice.entries.append(row)
            choice.token_ends.append(end)

    @staticmethod
    def _final_entries(choice: _Choice) -> int:
        if not choice.entries:
            return 0
        # the tokens' own text, cut by the same rule as the answer's
        cut = final_upto("".join(_entry_text(e) for e in choice.entries))
        n = 0
        while n < len(choice.token_ends) and choice.token_ends[n] <= cut:
            n += 1
        return n

    def _release(self, chunk: dict, choice: _Choice, chat: bool, delta: dict, text_end: int, entries_end: int,
                 finished: bool) -> list[dict]:
        """Show middleware everything final so far; send the client what is new in its answer."""
        choice.final, choice.entries_final = text_end, entries_end
        envelope = {k: v for k, v in chunk.items() if k != "choices"}
        reason = chunk["choices"][0].get("finish_reason") if finished else None
        view = _view(choice, chat, delta, choice.text[:text_end], choice.entries[:entries_end], finished, reason)
        seen = self.middleware.on_response({**envelope, "choices": [view]})["choices"][0]
        if chat:
            seen_delta = seen.get("delta") or {}
            whole, entries = seen_delta.get("content") or "", (seen.get("logprobs") or {}).get("content") or []
        else:
            seen_delta, whole, entries = {}, seen.get("text") or "", _completion_rows(seen.get("logprobs"))
        if not whole.startswith(choice.sent):  # a change that reaches back past what was held
            log.warning("middleware changed streamed text that was already sent; the client keeps what it got")
        new_text, choice.sent = whole[len(choice.sent):], whole
        new_entries = entries[choice.entries_sent:]
        choice.entries_sent = max(choice.entries_sent, len(entries))
        reason = seen.get("finish_reason") if finished else None
        if not chat:
            logprobs = _completion_logprobs(new_entries) if new_entries else None
            return [{**envelope, "choices": [{"index": choice.index, "text": new_text, "logprobs": logprobs,
                                              "finish_reason": reason}]}]
        return [{**envelope, "choices": [c]} for c in _chat_choices(choice.index, seen_delta, new_text, new_entries,
                                                                     finished, reason)]


def _view(choice: _Choice, chat: bool, delta: dict, text: str, entries: list, finished: bool, reason) -> dict:
    """The choice as middleware sees it: the whole text so far, every logprob entry and, at the
    end, the whole tool calls."""
    shown: dict[str, Any] = {"index": choice.index}
    if chat:
        shown_delta = {**delta, "content": text}
        if finished and choice.calls:
            shown_delta["tool_calls"] = [choice.calls[k] for k in sorted(choice.calls)]
        if finished and choice.function_call is not None:
            shown_delta["function_call"] = choice.function_call
        shown["delta"] = shown_delta
        shown["logprobs"] = {"content": entries} if choice.entries else None
    else:
        shown["text"] = text
        shown["logprobs"] = _completion_logprobs(entries) if choice.entries else None
    shown["finish_reason"] = reason
    return shown


def _chat_choices(index: int, seen_delta: dict, new_text: str, new_entries: list, finished: bool, reason) -> list:
    """What goes out for one chat choice: the new text (with the role, on the first chunk) and
    logprobs; at the end the tool calls, each whole, then the finish reason."""
    out = []
    first = {k: v for k, v in seen_delta.items() if k not in ("content", "tool_calls", "function_call")}
    if new_text or first or not finished:
        first["content"] = new_text
    logprobs = {"content": new_entries} if new_entries else None
    if first or logprobs:
        out.append({"index": index, "delta": first, "logprobs": logprobs, "finish_reason": None})
    if finished:
        for key in ("tool_calls", "function_call"):
            if seen_delta.get(key):
                out.append({"index": index, "delta": {key: seen_delta[key]}, "logprobs": None, "finish_reason": None})
        out.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason})
    return out


def _entry_text(entry) -> str:
    return entry.get("token", "") if isinstance(entry, dict) else entry[0]


def _completion_logprobs(rows: list) -> dict:
    return {"tokens": [r[0] for r in rows], "token_logprobs": [r[1] for r in rows],
            "top_logprobs": [r[2] for r in rows], "text_offset": [r[3] for r in rows]}


def _completion_rows(logprobs: dict | None) -> list:
    if not logprobs:
        return []
    tokens = logprobs.get("tokens") or []
    return list(zip(tokens, logprobs.get("token_logprobs") or [None] * len(tokens),
                    logprobs.get("top_logprobs") or [None] * len(tokens),
                    logprobs.get("text_offset") or [0] * len(tokens)))


# ------------------------------------------------------------------------------------------ routes


def _flat(routes) -> list:
    """Routes, with those of included routers listed one by one."""
    out = []
    for r in routes:
        inner = getattr(r, "original_router", None)  # FastAPI keeps an included router whole
        out.extend(_flat(inner.routes) if inner is not None else [r])
    return out


def add_plugin_routes(app: FastAPI, routes: list, parse_json) -> None:
    """Routes from the ``register_routes`` hook: ``handler(body: dict) -> dict``, run in a worker
    thread (a plugin may block). Added after the built-in routes, which therefore win.
    ``parse_json(request)`` reads a body as the built-in routes do (media type, depth); an empty
    body is ``{}``."""
    taken = {(m, r.path) for r in _flat(app.routes) for m in getattr(r, "methods", ()) or ()}
    for route in routes:
        method, path = str(route.method).upper(), str(route.path)
        if (method, path) in taken:
            log.warning("plugin route %s %s ignored: a built-in route has that method and path", method, path)
            continue
        taken.add((method, path))

        async def endpoint(request: Request, _handler=route.handler, _method=method):
            body: Any = {}
            if _method not in ("GET", "HEAD", "DELETE"):
                body = await parse_json(request)
            try:
                out = await asyncio.to_thread(_handler, body)
            except LLMKitError as exc:
                raise refused(exc) from None
            return JSONResponse(out)

        app.add_api_route(path, endpoint, methods=[method], summary=f"(plugin) {method} {path}",
                          name=f"plugin:{path}")


def _through(middlewares: list, hook: str, body: dict) -> dict:
    """``body`` passed through each middleware's ``hook`` in order: a refusal (LLMKitError) is a
    400, anything but a dict back is the middleware's bug (500)."""
    for m in middlewares:
        try:
            body = getattr(m, hook)(body)
        except LLMKitError as exc:
            raise refused(exc) from None
        if not isinstance(body, dict):
            raise APIError(500, f"middleware {type(m).__name__}.{hook} returned "
                                f"{type(body).__name__}, not a dict", code="internal_error")
    return body
