"""OpenAI's Responses API, the answer side: the Response object, and its stream of typed events.

Both are translated from the chat route's answer after plugins' middleware has seen it (a
``chat.completion`` body, or its chunks through ``Middleware.stream``): middleware filters the
text of every wire format in one shape, and the Responses answer carries what it let through.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

from fastapi.responses import StreamingResponse

from llmkit.errors import LLMKitError
from llmkit.server import errors
from llmkit.server.errors import APIError
from llmkit.server.responses_api import ResponsesRequest


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(chat_usage: dict | None) -> dict | None:
    """Chat usage in the Responses API's names."""
    if chat_usage is None:
        return None
    details = chat_usage.get("completion_tokens_details") or {}
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": (chat_usage.get("prompt_tokens_details") or {}).get(
                "cached_tokens", 0)},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": details.get("reasoning_tokens") or 0},
            "total_tokens": chat_usage["total_tokens"]}


def _status(finish_reason: str | None) -> tuple[str, dict | None]:
    """The response's status and incomplete_details, from the chat answer's finish reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "abort":  # cancelled by a shutdown whose drain time ran out
        return "cancelled", None
    return "completed", None


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    content = [] if status == "in_progress" else [_text_part(text)]
    return {"id": item_id or _id("msg"), "type": "message", "role": "assistant", "status": status,
            "content": content}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def reasoning_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    content = [] if status == "in_progress" else [{"type": "reasoning_text", "text": text}]
    return {"id": item_id or _id("rs"), "type": "reasoning", "summary": [], "content": content, "status": status}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed", item_id: str | None = None) -> dict:
    return {"id": item_id or _id("fc"), "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


class Turn:
    """One answer to a Responses request: its id, and the Response object around its output."""

    def __init__(self, req: ResponsesRequest, model: str):
        self.req = req
        self.model = model
        self.id = _id("resp")
        self.created_at = int(time.time())

    def response(self, status: str, output: list[dict], usage: dict | None = None,
                 incomplete: dict | None = None, error: dict | None = None) -> dict:
        req = self.req
        tools = [t.model_dump(by_alias=True, exclude_none=True) for t in req.tools or []]
        for t in tools:
            t.setdefault("parameters", None)
            t.setdefault("strict", None)
        fmt = (req.text.format.model_dump(by_alias=True, exclude_none=True)
               if req.text is not None and req.text.format is not None else {"type": "text"})
        choice = req.tool_choice if isinstance(req.tool_choice, str) or req.tool_choice is None \
            else req.tool_choice.model_dump(exclude_none=True)
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": False, "error": error, "incomplete_details": incomplete,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None,
                          "summary": req.reasoning.summary if req.reasoning else None},
            "store": req.store, "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt}, "tool_choice": choice or "auto", "tools": tools,
            "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled", "usage": usage,
            "user": req.user, "metadata": req.metadata or {},
        }

    def from_chat(self, body: dict) -> dict:
        """The Response object for a whole chat.completion body."""
        choice = body["choices"][0]
        message = choice["message"]
        status, incomplete = _status(choice.get("finish_reason"))
        output = []
        if message.get("reasoning_content"):
            output.append(reasoning_item(message["reasoning_content"]))
        calls = message.get("tool_calls") or []
        if message.get("content") or not (output or calls):  # an empty message only when nothing else came
            output.append(message_item(message.get("content") or "", "incomplete" if incomplete else "completed"))
        for call in calls:
            output.append(call_item(call["id"], call["function"]["name"], call["function"]["arguments"]))
        return self.response(status, output, usage(body.get("usage")), incomplete)


# ------------------------------------------------------------------------------------------ stream


class _Open:
    """The output item being streamed: its index, its kind, and what it has said so far."""

    def __init__(self, index: int, kind: str, item: dict):
        self.index, self.kind, self.item = index, kind, item
        self.text = ""


class EventStream:
    """Chat chunks in, the Responses API's typed events out, numbered by ``sequence_number``.

    ``done`` receives the final Response object once the stream completed (to store it)."""

    def __init__(self, turn: Turn, done=None):
        self.turn = turn
        self.done = done
        self.seq = 0
        self.output: list[dict] = []
        self.open: _Open | None = None
        self.usage: dict | None = None
        self.finish: str | None = None

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def _begin(self, kind: str, item: dict) -> list[dict]:
        out = self._end()
        self.open = _Open(len(self.output), kind, item)
        self.output.append(item)
        index, item_id = self.open.index, item["id"]
        out.append(self._event("response.output_item.added", output_index=index, item=dict(item)))
        if kind == "message":
            out.append(self._event("response.content_part.added", item_id=item_id, output_index=index,
                                   content_index=0, part=_text_part("")))
        elif kind == "reasoning":
            out.append(self._event("response.content_part.added", item_id=item_id, output_index=index,
                                   content_index=0, part={"type": "reasoning_text", "text": ""}))
        return out

    def _delta(self, kind: str, text: str) -> list[dict]:
        out = [] if self.open is not None and self.open.kind == kind else self._begin(kind, _new_item(kind))
        o = self.open
        o.text += text
        names = {"message": "response.output_text.delta", "reasoning": "response.reasoning_text.delta",
                 "call": "response.function_call_arguments.delta"}
        extra = {"content_index": 0} if kind != "call" else {}
        if kind == "message":
            extra["logprobs"] = []
        out.append(self._event(names[kind], item_id=o.item["id"], output_index=o.index, delta=text, **extra))
        return out

    def _end(self) -> list[dict]:
        o, self.open = self.open, None
        if o is None:
            return []
        item_id, index, out = o.item["id"], o.index, []
        status = "incomplete" if self.finish == "length" and o.kind == "message" else "completed"
        if o.kind == "message":
            part = _text_part(o.text)
            out.append(self._event("response.output_text.done", item_id=item_id, output_index=index,
                                   content_index=0, text=o.text, logprobs=[]))
            out.append(self._event("response.content_part.done", item_id=item_id, output_index=index,
                                   content_index=0, part=part))
            final = message_item(o.text, status, item_id)
        elif o.kind == "reasoning":
            part = {"type": "reasoning_text", "text": o.text}
            out.append(self._event("response.reasoning_text.done", item_id=item_id, output_index=index,
                                   content_index=0, text=o.text))
            out.append(self._event("response.content_part.done", item_id=item_id, output_index=index,
                                   content_index=0, part=part))
            final = reasoning_item(o.text, "completed", item_id)
        else:
            final = call_item(o.item["call_id"], o.item["name"], o.text, "completed", item_id)
            out.append(self._event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                                   name=o.item["name"], arguments=o.text))
        self.output[index] = final
        out.append(self._event("response.output_item.done", output_index=index, item=final))
        return out

    def _chunk(self, chunk: dict) -> list[dict]:
        if chunk.get("usage"):
            self.usage = usage(chunk["usage"])
        out: list[dict] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                out += self._delta("reasoning", delta["reasoning_content"])
            if delta.get("content"):
                out += self._delta("message", delta["content"])
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                if call.get("id"):  # a new call: its id and name first, then its arguments
                    out += self._begin("call", call_item(call["id"], function.get("name") or "", "", "in_progress"))
                if function.get("arguments"):
                    out += self._delta("call", function["arguments"])
            if choice.get("finish_reason") is not None:
                self.finish = choice["finish_reason"]
        return out

    def _close(self) -> list[dict]:
        out = self._end()
        if not self.output:  # the model said nothing: still one (empty) message, as a whole answer has
            out += self._begin("message", _new_item("message")) + self._end()
        status, incomplete = _status(self.finish)
        final = self.turn.response(status, self.output, self.usage, incomplete)
        if self.done is not None:
            self.done(final)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        out.append(self._event(kind, response=final))
        return out

    async def events(self, chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
        yield self._event("response.created", response=self.turn.response("in_progress", []))
        yield self._event("response.in_progress", response=self.turn.response("in_progress", []))
        try:
            async for chunk in chunks:
                for event in self._chunk(chunk):
                    yield event
            for event in self._close():
                yield event
        except (APIError, LLMKitError) as exc:  # the response has started: the error goes into the stream
            error = exc if isinstance(exc, APIError) else errors.from_llmkit_error(exc)
            yield self._event("error", code=error.code, message=error.message, param=error.param)
            failed = self.turn.response("failed", self.output, self.usage,
                                        error={"code": error.code or "server_error", "message": error.message})
            yield self._event("response.failed", response=failed)


def _new_item(kind: str) -> dict:
    return message_item("", "in_progress") if kind == "message" else reasoning_item("", "in_progress")


def typed_sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events as the Responses API sends them: ``event: <type>`` and ``data: {json}``."""

    async def body() -> AsyncIterator[bytes]:
        async for event in events:
            data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
            yield f"event: {event['type']}\ndata: {data}\n\n".encode()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def stored_history(items: list[dict], response: dict) -> list[dict]:
    """The conversation a response closes: its input items, then its output items."""
    return [*items, *response["output"]]

