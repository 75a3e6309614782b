"""Anthropic's Messages API in llmkit's terms: its request bodies (as pydantic models), the
translation of a request into a chat completion request (so that it runs through the same prompt,
tool and sampling code as OpenAI's chat route), and of the chat answer back into a Message, whole
or as Anthropic's stream of server-sent events.

A request becomes a chat request as follows: ``system`` is the first message; ``tool_use`` blocks
of an assistant turn are its tool calls, ``tool_result`` blocks of a user turn are tool messages
(an ``is_error`` result is marked "Error:"); ``thinking`` blocks of earlier turns go to the chat
template as the message's ``reasoning_content``; a conversation that ends with an assistant turn
is continued (Anthropic's prefill). ``tool_choice`` any is OpenAI's "required" and tool a named
function: both are enforced while decoding, as on the chat route; so is ``output_config.format``
(a JSON schema, OpenAI's ``response_format``). ``thinking`` and ``output_config.effort`` become
the chat request's thinking budget or ``enable_thinking=False``.

Back, the chat answer's reasoning is a ``thinking`` block (with an empty signature), its text a
``text`` block and each tool call a ``tool_use`` block, in that order. Usage counts the prompt
tokens read from the prefix cache as ``cache_read_input_tokens`` and the rest as ``input_tokens``.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, AsyncIterator, Literal, Optional, Union

from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llmkit.errors import LLMKitError
from llmkit.server import errors, schemas
from llmkit.server.errors import APIError, bad_request

_ALLOW = ConfigDict(extra="allow")

# ------------------------------------------------------------------------------------------ requests


class AnthropicContentBlock(BaseModel):
    """One content block. Read here: text, tool_use, tool_result and thinking (redacted_thinking
    is accepted and skipped); other kinds (images, documents) are refused with a 400."""

    model_config = _ALLOW
    type: str
    text: Optional[str] = None
    id: Optional[str] = Field(default=None, description="tool_use: the call's id.")
    name: Optional[str] = Field(default=None, description="tool_use: the tool called.")
    input: Optional[dict[str, Any]] = Field(default=None, description="tool_use: the call's arguments.")
    tool_use_id: Optional[str] = Field(default=None, description="tool_result: the call it answers.")
    content: Optional[Union[str, list[AnthropicContentBlock]]] = Field(
        default=None, description="tool_result: the result, as text or text blocks.")
    is_error: Optional[bool] = Field(default=None, description="tool_result: the call failed.")
    thinking: Optional[str] = None
    signature: Optional[str] = None


class AnthropicMessage(BaseModel):
    model_config = _ALLOW
    role: Literal["user", "assistant"]
    content: Union[str, list[AnthropicContentBlock]]


class AnthropicTool(BaseModel):
    model_config = _ALLOW
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Letters, digits, _ and -; at most 64.")
    description: Optional[str] = None
    input_schema: dict[str, Any] = Field(description="A JSON schema of the tool's input object.")
    type: Optional[str] = Field(default=None, description='"custom" or absent: server tools are not run here.')


class AnthropicToolChoice(BaseModel):
    model_config = _ALLOW
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = Field(default=None, description="type tool: the tool to call.")
    disable_parallel_tool_use: Optional[bool] = None


class AnthropicThinking(BaseModel):
    """For a model whose chat template thinks. enabled: with budget_tokens, the thinking block is
    closed after that many tokens; disabled: the template is asked not to think
    (``enable_thinking=False``); adaptive and between_tools: the model thinks as its template says."""

    model_config = _ALLOW
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: Optional[int] = Field(default=None, ge=0, description="Most tokens to think; then the "
                                         "thinking block is closed and the answer begins.")
    display: Optional[Literal["summarized", "omitted"]] = Field(default=None, description="omitted: thinking "
                                                                "blocks come back empty.")


class AnthropicOutputFormat(BaseModel):
    model_config = _ALLOW
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema", description="The answer is JSON that matches this schema "
                                    "(enforced while decoding).")


class AnthropicOutputConfig(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    effort: Optional[Literal["low", "medium", "high", "xhigh", "max"]] = Field(
        default=None, description="For a model that thinks: low, medium and high set a thinking-token budget; "
        "xhigh and max set none.")
    format: Optional[AnthropicOutputFormat] = None


class AnthropicCountTokensRequest(BaseModel):
    model_config = _ALLOW
    model: str = Field(description="The served model's id (GET /v1/models).")
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Optional[Union[str, list[AnthropicContentBlock]]] = None
    tools: Optional[list[AnthropicTool]] = None
    tool_choice: Optional[AnthropicToolChoice] = None
    thinking: Optional[AnthropicThinking] = None
    output_config: Optional[AnthropicOutputConfig] = None


class AnthropicMessagesRequest(AnthropicCountTokensRequest):
    max_tokens: int = Field(ge=1, description="Most tokens to generate (required, as Anthropic requires it).")
    stop_sequences: Optional[list[Annotated[str, Field(min_length=1)]]] = None
    temperature: Optional[float] = Field(default=None, ge=0, le=1, description="0 is greedy. Default 1.")
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    metadata: Optional[dict[str, Any]] = Field(default=None, description="Accepted and ignored.")
    stream: bool = False


# ------------------------------------------------------------------------------------------ responses (docs)


class AnthropicUsage(BaseModel):
    input_tokens: int = Field(description="Prompt tokens computed (not read from the prefix cache).")
    output_tokens: int
    cache_read_input_tokens: int = Field(description="Prompt tokens read from the prefix cache.")
    cache_creation_input_tokens: int = 0


class AnthropicResponseBlock(BaseModel):
    type: Literal["text", "tool_use", "thinking"]
    text: Optional[str] = None
    id: Optional[str] = None
    name: Optional[str] = None
    input: Optional[dict[str, Any]] = None
    thinking: Optional[str] = None
    signature: Optional[str] = None


class AnthropicMessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[AnthropicResponseBlock]
    stop_reason: Optional[Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn"]]
    stop_sequence: Optional[str] = None
    usage: AnthropicUsage


class AnthropicStreamEvent(BaseModel):
    """One server-sent event (``event: <type>`` then ``data: {...}``): message_start,
    content_block_start, ping, content_block_delta (text_delta, input_json_delta, thinking_delta,
    signature_delta), content_block_stop, message_delta, message_stop; or error."""

    model_config = _ALLOW
    type: str


class AnthropicCountTokensResponse(BaseModel):
    input_tokens: int


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


# ------------------------------------------------------------------------------------------ request -> chat


def _blocks(content) -> list[AnthropicContentBlock]:
    return [AnthropicContentBlock(type="text", text=content)] if isinstance(content, str) else content


def _text(blocks, where: str) -> str:
    """The text of text blocks (a string is one text block); a 400 for any other kind."""
    texts = []
    for j, block in enumerate(_blocks(blocks)):
        if block.type != "text":
            raise bad_request(f"{where}[{j}]: blocks of type {block.type!r} are not supported here; give text "
                              "blocks.", param=where.split("[", 1)[0])
        texts.append(block.text or "")
    return "\n".join(texts)


def _user_turn(i: int, message: AnthropicMessage) -> list[dict]:
    """A user turn: its tool results as tool messages, its text as user messages, in their order."""
    out: list[dict] = []
    for j, block in enumerate(_blocks(message.content)):
        where = f"messages[{i}].content[{j}]"
        if block.type == "tool_result":
            if not block.tool_use_id:
                raise bad_request(f"{where}: a tool_result needs tool_use_id.", param="messages")
            result = _text(block.content if block.content is not None else "", f"{where}.content")
            if block.is_error:
                result = f"Error: {result}"
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": result})
        elif block.type == "text":
            if out and out[-1]["role"] == "user":
                out[-1]["content"] += "\n" + (block.text or "")
            else:
                out.append({"role": "user", "content": block.text or ""})
        else:
            raise bad_request(f"{where}: blocks of type {block.type!r} are not supported in a user turn; this server "
                              "reads text and tool_result blocks.", param="messages")
    return out or [{"role": "user", "content": ""}]


def _assistant_turn(i: int, message: AnthropicMessage) -> dict:
    """An assistant turn: text, tool calls, and its thinking for templates that render it."""
    texts, calls, thinking = [], [], []
    for j, block in enumerate(_blocks(message.content)):
        where = f"messages[{i}].content[{j}]"
        if block.type == "text":
            texts.append(block.text or "")
        elif block.type == "tool_use":
            if not block.id or not block.name:
                raise bad_request(f"{where}: a tool_use block needs id and name.", param="messages")
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": json.dumps(block.input or {})}})
        elif block.type == "thinking":
            thinking.append(block.thinking or "")
        elif block.type != "redacted_thinking":
            raise bad_request(f"{where}: blocks of type {block.type!r} are not supported in an assistant turn; this "
                              "server reads text, tool_use and thinking blocks.", param="messages")
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        out["tool_calls"] = calls
    if thinking:
        out["reasoning_content"] = "\n".join(thinking)
    return out


def _tools(req: AnthropicCountTokensRequest) -> dict:
    """tools and tool_choice in OpenAI's terms."""
    out: dict[str, Any] = {}
    if req.tools:
        for k, tool in enumerate(req.tools):
            if tool.type not in (None, "custom"):
                raise bad_request(f"tools[{k}] is a server tool of type {tool.type!r}, which this server does not run; "
                                  "give custom tools (name, description, input_schema).", param="tools")
        out["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                          "parameters": t.input_schema}} for t in req.tools]
    choice = req.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise bad_request("tool_choice of type tool needs the tool's name.", param="tool_choice")
            out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            out["tool_choice"] = {"any": "required"}.get(choice.type, choice.type)
        if choice.disable_parallel_tool_use:
            out["parallel_tool_calls"] = False
    return out


def chat_request(req: AnthropicCountTokensRequest) -> schemas.ChatCompletionRequest:
    """The request as a chat completion request (messages, tools, sampling settings)."""
    messages: list[dict] = []
    if req.system:
        messages.append({"role": "system", "content": _text(req.system, "system")})
    for i, message in enumerate(req.messages):
        if message.role == "user":
            messages.extend(_user_turn(i, message))
        else:
            messages.append(_assistant_turn(i, message))
    body: dict[str, Any] = {"model": req.model, "messages": messages, **_tools(req), **_thinking_settings(req)}
    if req.messages[-1].role == "assistant":  # prefill: the model continues the last turn
        body.update(add_generation_prompt=False, continue_final_message=True)
    output = req.output_config
    if output is not None and output.format is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output",
                                                                          "schema": output.format.schema_}}
    if isinstance(req, AnthropicMessagesRequest):
        extra = req.model_extra or {}
        body.update({k: extra[k] for k in schemas.SAMPLING_EXTENSIONS if k in extra})
        body.update(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                    stop=req.stop_sequences)
        budget = body.get("max_thinking_tokens")
        if budget is not None and budget >= req.max_tokens:
            raise bad_request(f"thinking.budget_tokens ({budget}) must be less than max_tokens ({req.max_tokens}): "
                              "the answer comes after the thinking.", param="thinking")
    return schemas.ChatCompletionRequest.model_validate(body)


def _thinking_settings(req: AnthropicCountTokensRequest) -> dict:
    """thinking and output_config.effort as the chat request's reasoning settings."""
    out: dict[str, Any] = {}
    thinking = req.thinking
    if thinking is not None and thinking.type == "disabled":
        out["chat_template_kwargs"] = {"enable_thinking": False}
    elif thinking is not None and thinking.type == "enabled" and thinking.budget_tokens is not None:
        out["max_thinking_tokens"] = thinking.budget_tokens
    effort = req.output_config.effort if req.output_config is not None else None
    if effort in ("low", "medium", "high") and "max_thinking_tokens" not in out:
        out["reasoning_effort"] = effort
    return out


# ------------------------------------------------------------------------------------------ chat -> message


def outcome(gen, tokenizer, req: AnthropicMessagesRequest) -> Outcome:
    show = req.thinking is None or req.thinking.display != "omitted"
    return Outcome(gen, tokenizer, req.stop_sequences, show_thinking=show)


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def _tool_use(call: dict) -> dict:
    call_id = call["id"]
    call_id = "toolu_" + call_id[len("call_"):] if call_id.startswith("call_") else call_id
    return {"type": "tool_use", "id": call_id, "name": call["function"]["name"],
            "input": json.loads(call["function"]["arguments"] or "{}")}


def _thinking(text: str) -> dict:
    return {"type": "thinking", "thinking": text, "signature": ""}


class Outcome:
    """How a generation ended, in Anthropic's words, and what it cost."""

    def __init__(self, gen, tokenizer, stops: list[str] | None, show_thinking: bool = True):
        self.gen = gen
        self.tokenizer = tokenizer
        self.stops = stops or []
        self.show_thinking = show_thinking  # False: thinking blocks come back empty (display "omitted")

    def thinking(self, text: str) -> str:
        return text if self.show_thinking else ""

    def stop(self, finish: str | None) -> tuple[str | None, str | None]:
        """(stop_reason, stop_sequence) from the chat finish reason."""
        if finish == "tool_calls":
            return "tool_use", None
        if finish == "length":
            return "max_tokens", None
        if finish == "abort":  # cut short by the server's shutdown: sent back, the turn is continued
            return "pause_turn", None
        matched = self._matched_stop()
        return ("stop_sequence", matched) if matched is not None else ("end_turn", None)

    def _matched_stop(self) -> str | None:
        """The stop sequence that ended the answer, if one did. The engine emits the text cut just
        before it; the tokens it generated go on through it."""
        handles = getattr(self.gen, "handles", None)
        if not self.stops or not handles:
            return None
        emitted = "".join(self.gen.texts[0])
        generated = self.tokenizer.decode(handles[0].tokens)
        if not generated.startswith(emitted):
            return None
        rest = generated[len(emitted):]
        return next((s for s in self.stops if rest.startswith(s)), None)

    def usage(self) -> dict:
        """Anthropic's usage: input_tokens are the prompt tokens computed, the rest were read from the cache."""
        usage = self.gen.usage()
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        out = {"input_tokens": usage["prompt_tokens"] - cached, "output_tokens": usage["completion_tokens"],
               "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}
        thinking = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
        if thinking is not None:
            out["output_tokens_details"] = {"thinking_tokens": thinking}
        return out


def message_body(chat: dict, outcome: Outcome, msg_id: str, model: str) -> dict:
    """A whole chat completion (after middleware) as a Message."""
    choice = chat["choices"][0]
    message = choice["message"]
    content = []
    if message.get("reasoning_content"):
        content.append(_thinking(outcome.thinking(message["reasoning_content"])))
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    content += [_tool_use(call) for call in message.get("tool_calls") or []]
    reason, sequence = outcome.stop(choice["finish_reason"])
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": sequence, "usage": outcome.usage()}


class EventWriter:
    """Chat completion chunks (after middleware) as Anthropic's stream events: one content block at
    a time (thinking, text, then each tool call), each opened, filled by deltas and closed."""

    def __init__(self, outcome: Outcome, msg_id: str, model: str):
        self.outcome = outcome
        self.id, self.model = msg_id, model
        self.index = -1  # the open block's index
        self.kind: str | None = None  # the open block's type
        self.pinged = False

    def _open(self, block: dict) -> list[dict]:
        out = self._close()
        self.index += 1
        self.kind = block["type"]
        out.append({"type": "content_block_start", "index": self.index, "content_block": block})
        if not self.pinged:
            self.pinged = True
            out.append({"type": "ping"})
        return out

    def _close(self) -> list[dict]:
        if self.kind is None:
            return []
        out = []
        if self.kind == "thinking":
            out.append({"type": "content_block_delta", "index": self.index,
                        "delta": {"type": "signature_delta", "signature": ""}})
        self.kind = None
        return out + [{"type": "content_block_stop", "index": self.index}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}

    def start(self) -> dict:
        usage = {**self.outcome.usage(), "output_tokens": 0}
        return {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": usage}}

    def chunk(self, delta: dict) -> list[dict]:
        """The events for one chunk's delta."""
        out = []
        if delta.get("reasoning_content"):
            if self.kind != "thinking":
                out += self._open(_thinking(""))
            thought = self.outcome.thinking(delta["reasoning_content"])
            if thought:
                out.append(self._delta({"type": "thinking_delta", "thinking": thought}))
        if delta.get("content"):
            if self.kind != "text":
                out += self._open({"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls") or []:
            if call.get("id"):  # a new call: its id and name first
                block = _tool_use({**call, "function": {**call["function"], "arguments": "{}"}})
                out += self._open({**block, "input": {}})
            arguments = (call.get("function") or {}).get("arguments")
            if arguments and self.kind == "tool_use":
                out.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        return out

    def finish(self, finish_reason: str | None) -> list[dict]:
        out = self._close()
        if not self.pinged:
            out.append({"type": "ping"})
        reason, sequence = self.outcome.stop(finish_reason)
        return out + [{"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                       "usage": self.outcome.usage()},
                      {"type": "message_stop"}]

    async def events(self, chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
        yield self.start()
        finish = None
        async for chunk in chunks:
            for choice in chunk.get("choices") or []:
                for event in self.chunk(choice.get("delta") or {}):
                    yield event
                finish = choice.get("finish_reason") or finish
        for event in self.finish(finish):
            yield event


def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events as Anthropic sends them: ``event: <type>`` and ``data: {json}``. An error
    after the response started is an ``error`` event, the last one."""

    def frame(event: dict) -> bytes:
        data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        return f"event: {event['type']}\ndata: {data}\n\n".encode()

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield frame(event)
        except APIError as exc:  # the response has started: the error goes into the stream
            yield frame(errors.anthropic_body(exc.status, exc.message))
        except LLMKitError as exc:
            error = errors.from_llmkit_error(exc)
            yield frame(errors.anthropic_body(error.status, error.message))

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
