"""From a request to prompt token ids: chat messages through the model's chat template (with
tools), text or token-id prompts for completions, and the bounds that keep this work small.
Rendering and tokenizing run on a preparation worker (``ServerState.prep``), off the event loop."""

from __future__ import annotations

from llmkit.server import schemas, tools
from llmkit.server.config import ServerConfig
from llmkit.server.errors import bad_request


def encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each text. Through ``encode_batch``, which lets go of the GIL while it works:
    a long text tokenized with ``encode`` would hold the event loop still for as long."""
    return tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)


def check_messages(messages, config: ServerConfig) -> None:
    """A 400 naming the limit when a conversation has too many messages or too long a one."""
    if len(messages) > config.max_messages:
        raise bad_request(f"The conversation has {len(messages)} messages; this server takes at most "
                          f"{config.max_messages} (max_messages).", param="messages", code="too_many_messages")
    for i, m in enumerate(messages):
        size = _content_chars(m.content)
        for call in m.tool_calls or []:
            args = call.function.arguments
            size += len(args) if isinstance(args, str) else len(str(args))
        if size > config.max_message_chars:
            raise bad_request(f"messages[{i}] has {size} characters; this server takes at most "
                              f"{config.max_message_chars} per message (max_message_chars).", param="messages",
                              code="message_too_long")


def check_texts(texts: list[str], param: str, config: ServerConfig) -> None:
    """The same bound for a prompt or an input text as for a message."""
    for i, text in enumerate(texts):
        if len(text) > config.max_message_chars:
            where = param if len(texts) == 1 else f"{param}[{i}]"
            raise bad_request(f"{where} has {len(text)} characters; this server takes at most "
                              f"{config.max_message_chars} per text (max_message_chars).", param=param,
                              code="message_too_long")


def _content_chars(content) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    return sum(len(part.text or "") for part in content)


def _text_content(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type not in ("text", "input_text"):
            raise bad_request(f"{where}: content of type {part.type!r} is not supported; this server reads text only.",
                              param="messages")
        texts.append(part.text or "")
    return "\n".join(texts)


# apply_chat_template's own arguments: template variables may not stand in for them
_RESERVED = {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize",
             "chat_template"}


def chat_ids(tokenizer, messages, add_generation_prompt: bool, continue_final: bool,
             plan: tools.ToolPlan | None = None, template_kwargs: dict | None = None) -> list[int]:
    """The conversation rendered with the chat template (tools offered as the plan says), tokenized.
    ``template_kwargs``: extra template variables, e.g. ``{"enable_thinking": False}`` for templates
    that read it (Qwen3's closes the reasoning block at once)."""
    chat = []
    for i, m in enumerate(messages):
        extra = {k: v for k, v in (m.model_extra or {}).items() if v is not None}
        d = {**extra, "role": {"developer": "system", "function": "tool"}.get(m.role, m.role),
             "content": _text_content(m.content, f"messages[{i}]")}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        calls = m.tool_calls or ([schemas.ToolCall(function=m.function_call)] if m.function_call else [])
        if calls:
            d["tool_calls"] = [tools.template_call(c, f"call_{i}_{j}") for j, c in enumerate(calls)]
        chat.append(d)
    reserved = sorted(_RESERVED & set(template_kwargs or {}))
    if reserved:
        raise bad_request(f"chat_template_kwargs cannot set {', '.join(reserved)}: the server sets these itself; "
                          "use the request's own fields.", param="chat_template_kwargs")
    offered = plan.tools if plan is not None and plan.offered else None
    chat, offered = tools.prepare(chat, plan, tools.template_knows_tools(tokenizer._pick_template(None, offered)))
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt and not continue_final,
                                         continue_final_message=continue_final, tools=offered,
                                         **(template_kwargs or {}))
    return encode(tokenizer, [text], add_special_tokens=False)[0]


def check_ids(ids: list[int], vocab: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"{param} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}", param=param)


def completion_prompts(llm, prompt) -> list[list[int]]:
    """Token ids of each prompt of a text completion: a string, strings, token ids, or lists of them."""
    vocab = llm.config.vocab_size
    if isinstance(prompt, str):
        prompts = encode(llm.tokenizer, [prompt], add_special_tokens=True)
    elif not prompt:
        raise bad_request("prompt is empty.", param="prompt")
    elif isinstance(prompt[0], int):
        check_ids(prompt, vocab, "prompt")
        prompts = [list(prompt)]
    elif isinstance(prompt[0], str):
        prompts = encode(llm.tokenizer, list(prompt), add_special_tokens=True)
    else:
        for p in prompt:
            check_ids(p, vocab, "prompt")
        prompts = [list(p) for p in prompt]
    check_not_empty(prompts, "prompt")
    return prompts


def check_not_empty(prompts: list[list[int]], param: str) -> None:
    """An empty prompt is a bad request, not a context-length problem."""
    for i, ids in enumerate(prompts):
        if not ids:
            where = param if len(prompts) == 1 else f"{param}[{i}]"
            raise bad_request(f"{where} is empty (no tokens): give at least one token of text.", param=param,
                              code="empty_prompt")
