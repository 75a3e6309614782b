"""OpenAI's Responses API, the request side: its body as pydantic models, and its translation into
a chat completion request, which the chat route's pipeline then checks, renders and runs (tools
enforced while decoding, JSON schemas, limits, metrics) exactly as it does its own.

Input items become chat messages: ``message`` items keep their role (``developer`` reads as
``system``), ``function_call`` items become an assistant message's tool calls, and
``function_call_output`` items tool messages; ``reasoning`` items are left out (a model's earlier
thinking is not part of the conversation it continues). ``instructions`` are a system message
first; they are not carried into later turns, as OpenAI's API does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from llmkit.server import errors, schemas
from llmkit.server.errors import bad_request

_ALLOW = ConfigDict(extra="allow", populate_by_name=True)

# llmkit's sampling settings beyond the Responses API's own, taken as on the chat route
# (the openai SDK sends them with ``extra_body``)
# what the Responses API has no name of its own for
EXTENSIONS = (*schemas.SAMPLING_EXTENSIONS, "top_k", "stop", "max_thinking_tokens", "chat_template_kwargs")
_TEXT_PARTS = ("input_text", "output_text", "text")

# fields that would change the answer's meaning if they were ignored: refused, with what to do instead
UNSUPPORTED = {"conversation": "continue a conversation with previous_response_id, or send it whole as input.",
               "prompt": "send the prompt's text as instructions and input."}

# the chat request's parameters, as the Responses API names them (for the errors a client reads)
PARAMS = {"messages": "input", "prompt": "input", "response_format": "text", "max_tokens": "max_output_tokens",
          "functions": "tools", "n": "max_output_tokens", "reasoning_effort": "reasoning"}


class ContentPart(BaseModel):
    model_config = _ALLOW
    type: str
    text: Optional[str] = None


Content = Union[str, list[ContentPart]]


class MessageItem(BaseModel):
    model_config = _ALLOW
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class FunctionCallItem(BaseModel):
    model_config = _ALLOW
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = Field(description="The arguments as JSON text.")


class FunctionCallOutputItem(BaseModel):
    model_config = _ALLOW
    type: Literal["function_call_output"]
    call_id: str
    output: Content


class ReasoningItem(BaseModel):
    model_config = _ALLOW
    type: Literal["reasoning"]


def _item_type(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("type") or "message"
    return getattr(value, "type", "message")


InputItem = Annotated[Union[Annotated[MessageItem, Tag("message")], Annotated[FunctionCallItem, Tag("function_call")],
                            Annotated[FunctionCallOutputItem, Tag("function_call_output")],
                            Annotated[ReasoningItem, Tag("reasoning")]], Discriminator(_item_type)]


class FunctionTool(BaseModel):
    model_config = _ALLOW
    type: Literal["function"] = Field(description="Only function tools: this server runs no hosted tools.")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Letters, digits, _ and -; at most 64.")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class FunctionChoice(BaseModel):
    model_config = _ALLOW
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = _ALLOW
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class TextConfig(BaseModel):
    model_config = _ALLOW
    format: Optional[TextFormat] = None


class ReasoningConfig(BaseModel):
    model_config = _ALLOW
    effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = Field(
        default=None, description="For a model that thinks: how many tokens its reasoning may take "
        "(llmkit.reasoning.EFFORT_BUDGETS); none closes the block at once.")
    summary: Optional[str] = None


class ResponsesRequest(BaseModel):
    """POST /v1/responses (OpenAI's Responses API; fields it has that are not here are ignored)."""

    model_config = _ALLOW
    model: Optional[str] = None
    input: Union[str, list[InputItem]] = Field(description="A user message, or a list of input items: "
                                               "messages, function_call and function_call_output items.")
    instructions: Optional[str] = Field(default=None, description="A system message, for this turn only.")
    previous_response_id: Optional[str] = Field(default=None, description="Continue the conversation that a "
                                                "stored response closed.")
    store: bool = Field(default=True, description="Keep the response for GET and previous_response_id.")
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    stream: bool = False
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], FunctionChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextConfig] = None
    reasoning: Optional[ReasoningConfig] = None
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None


# ------------------------------------------------------------------------------------------ input


def input_items(req: ResponsesRequest) -> list[dict]:
    """This request's input as item dicts (a string is one user message)."""
    if isinstance(req.input, str):
        return [{"type": "message", "role": "user", "content": req.input}]
    return [item.model_dump(by_alias=True, exclude_none=True) for item in req.input]


def _text(content: str | list[dict], where: str) -> str:
    """A message's or a function output's text: its text parts, one per line."""
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        if part["type"] not in _TEXT_PARTS:
            raise bad_request(f"{where}.content[{j}] is of type {part['type']!r}; this server reads text only "
                              f"({', '.join(_TEXT_PARTS)}).", param="input", code="unsupported_content")
    return "\n".join(part.get("text") or "" for part in content)


def chat_messages(items: list[dict], instructions: str | None, first_new: int) -> list[dict]:
    """The conversation as chat messages. ``first_new``: where this request's own items begin in
    ``items`` (those before came from the previous response), for the errors' item numbers."""
    out: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    for i, item in enumerate(items):
        where = f"input[{i - first_new}]" if i >= first_new else "the previous response's input"
        kind = item.get("type") or "message"
        if kind == "message":
            out.append({"role": item["role"], "content": _text(item["content"], where)})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant":  # the text and the calls of one answer: one message
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text(item["output"], where)})
    return out


def _tool_choice(choice) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice.name}}


def _response_format(text: TextConfig | None) -> dict | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if not fmt.schema_:
        raise bad_request("text.format of type json_schema needs a schema.", param="text")
    return {"type": "json_schema", "json_schema": {"name": fmt.name or "answer", "schema": fmt.schema_,
                                                   "strict": fmt.strict}}


def chat_request(req: ResponsesRequest, items: list[dict], first_new: int) -> schemas.ChatCompletionRequest:
    """The chat completion request that this Responses request amounts to."""
    extra = req.model_extra or {}
    for name, instead in UNSUPPORTED.items():
        if extra.get(name) is not None:
            raise bad_request(f"{name} is not supported by this server; {instead}", param=name,
                              code="unsupported_parameter")
    messages = chat_messages(items, req.instructions, first_new)
    if not any(m["role"] != "system" for m in messages):
        raise bad_request("input is empty: give at least one message.", param="input", code="empty_input")
    body: dict[str, Any] = {
        "model": req.model, "messages": messages, "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "stream": req.stream, "user": req.user,
        "tools": [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                  for t in req.tools] if req.tools else None,
        "tool_choice": _tool_choice(req.tool_choice), "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": _response_format(req.text),
        "reasoning_effort": req.reasoning.effort if req.reasoning is not None else None,
    }
    body.update({k: extra[k] for k in EXTENSIONS if extra.get(k) is not None})
    try:
        return schemas.ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        raise errors.validation_error(exc.errors(include_url=False)) from None
