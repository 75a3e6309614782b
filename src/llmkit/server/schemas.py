"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Requests are validated with these models (unknown fields are accepted and ignored, as OpenAI's
own clients and LangChain send fields a local server has no use for). Responses are built as
plain dicts for speed; their models here describe them in the OpenAPI document.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

_ALLOW = ConfigDict(extra="allow")


# llmkit's sampling settings beyond what a wire format names itself, read from the request body (an
# SDK's ``extra_body``) by the routes that translate another API into a chat request
SAMPLING_EXTENSIONS = ("seed", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                       "stop_token_ids", "ignore_eos", "logit_bias")

class StreamOptions(BaseModel):
    model_config = _ALLOW
    include_usage: bool = False


class JSONSchemaSpec(BaseModel):
    model_config = _ALLOW
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    model_config = _ALLOW
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaSpec] = None


class _Sampling(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: Optional[str] = Field(default=None, description="The served model's id (GET /v1/models); "
                                 "empty means the one model this server runs.")
    max_tokens: Optional[int] = Field(default=None, ge=0, description="Most tokens to generate; "
                                      "the default is what the context leaves, capped by the server's default.")
    temperature: Optional[float] = Field(default=None, ge=0, description="0 is greedy. Default 1.")
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=-1, description="0 or -1: off.")
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    seed: Optional[int] = Field(default=None, ge=-(2**63), le=2**63 - 1, description="A 64-bit signed integer: "
                                "the same seed gives the same draws (choice i of n uses seed + i).")
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=64)
    logit_bias: Optional[dict[str, float]] = Field(default=None, description="Token id -> bias in [-100, 100].")
    response_format: Optional[ResponseFormat] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None


class ContentPart(BaseModel):
    model_config = _ALLOW
    type: str
    text: Optional[str] = None


class FunctionDefinition(BaseModel):
    model_config = _ALLOW
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Letters, digits, _ and -; at most 64.")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(default=None, description="A JSON schema of the arguments "
                                                 "object; none means no arguments.")
    strict: Optional[bool] = None


class Tool(BaseModel):
    model_config = _ALLOW
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = _ALLOW
    name: str


class NamedToolChoice(BaseModel):
    model_config = _ALLOW
    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    model_config = _ALLOW
    name: str
    arguments: Union[str, dict[str, Any]] = Field(description="The arguments as JSON text (an object is accepted).")


class ToolCall(BaseModel):
    model_config = _ALLOW
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _ALLOW
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = Field(default=None, description="Calls an assistant message made.")
    tool_call_id: Optional[str] = Field(default=None, description="On a tool message: the call it answers.")
    function_call: Optional[FunctionCall] = Field(default=None, description="Legacy form of tool_calls.")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[Tool]] = Field(default=None, min_length=1, description="Functions the model may call.")
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = Field(
        default=None, description="none, auto (the default with tools), required (enforced while decoding), or "
        '{"type": "function", "function": {"name": ...}} (enforced while decoding).')
    parallel_tool_calls: Optional[bool] = Field(default=None, description="false: at most one call per answer.")
    functions: Optional[list[FunctionDefinition]] = Field(default=None, min_length=1, description="Legacy tools.")
    function_call: Optional[Union[Literal["none", "auto"], FunctionName]] = Field(
        default=None, description="Legacy tool_choice.")
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, description="Same as max_tokens.")
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = Field(
        default=None, description="For a model that thinks: a thinking-token budget by level (see max_thinking_tokens).")
    max_thinking_tokens: Optional[int] = Field(default=None, ge=0, description="For a model that thinks: close its "
                                               "reasoning block after this many tokens (overrides reasoning_effort).")
    chat_template_kwargs: Optional[dict[str, Any]] = Field(default=None, description="Extra chat-template "
                                                           'variables, e.g. {"enable_thinking": false}.')


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: Optional[str] = None


class TokenizeRequest(BaseModel):
    model_config = _ALLOW
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    tools: Optional[list[Tool]] = Field(default=None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = _ALLOW
    model: Optional[str] = None
    tokens: list[int]


# ------------------------------------------------------------------------------- responses (docs)


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = Field(description="Tokens the model wrote inside its reasoning block.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: Optional[CompletionTokensDetails] = Field(
        default=None, description="Only for a model whose chat template thinks.")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None


class OutputFunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class OutputToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: OutputFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = Field(default=None, description="Only for a model whose chat template "
                                             "thinks: its reasoning, apart from the answer.")
    tool_calls: Optional[list[OutputToolCall]] = None
    function_call: Optional[OutputFunctionCall] = None  # legacy requests (functions=)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "tool_calls", "function_call", "abort"]] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(BaseModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None


class ChatDelta(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None
    function_call: Optional[DeltaFunctionCall] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (``data: {...}``; the last is ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: Optional[list[Optional[dict[str, float]]]] = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmkit"
    max_model_len: Optional[int] = Field(description="The context window; null while the model loads.")
    parent: Optional[str] = Field(None, description="For a LoRA adapter: the base model it runs on.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class EmbeddingRequest(BaseModel):
    model_config = _ALLOW
    model: Optional[str] = None
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[str] = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]  # base64 of little-endian float32 with encoding_format=base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
