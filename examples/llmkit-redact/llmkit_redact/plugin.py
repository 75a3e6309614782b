"""The plugin module named by the `llmkit` entry point. Each function marked ``@hookimpl`` is one
extension point; llmkit calls it with a ``register`` callback when it first needs that kind."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Callable

import click

from llmkit.plugins import hookimpl
from llmkit_redact.redact import PATTERNS, find, redact


def _redact_content(content: Any) -> Any:
    """Message content is a string, or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return redact(content)
    if isinstance(content, list):
        return [{**part, "text": redact(part["text"])} if isinstance(part, dict) and isinstance(part.get("text"), str)
                else part for part in content]
    return content


def _redact_tokens(tokens: list[str]) -> list[str]:
    """Tokens with the PII their joined text holds taken out: the token where a finding starts
    carries its placeholder, the other tokens it covers lose their part of it."""
    findings = find("".join(tokens))
    if not findings:
        return tokens
    out, start = [], 0
    for token in tokens:
        end = start + len(token)
        pieces, at = [], start
        for f in findings:
            if f.end <= start or f.start >= end:
                continue
            pieces.append(token[at - start:max(f.start, start) - start])
            if f.start >= start:
                pieces.append(f"[{f.kind}]")
            at = min(f.end, end)
        pieces.append(token[at - start:])
        out.append("".join(pieces))
        start = end
    return out


def _redact_chat_logprobs(entries: list) -> list:
    changed = _redact_tokens([e.get("token", "") for e in entries])
    out = []
    for entry, token in zip(entries, changed):
        if token != entry.get("token"):  # its alternatives could spell what was removed
            entry = {**entry, "token": token, "bytes": list(token.encode()), "top_logprobs": []}
        out.append(entry)
    return out


def _redact_completion_logprobs(logprobs: dict) -> dict:
    tokens = _redact_tokens(list(logprobs.get("tokens") or []))
    top = list(logprobs.get("top_logprobs") or [None] * len(tokens))
    top = [t if new == old else {} for t, new, old in zip(top, tokens, logprobs.get("tokens") or [])]
    return {**logprobs, "tokens": tokens, "top_logprobs": top}


def _redact_json_text(text: str) -> str:
    """Tool-call arguments: JSON text. Redact its strings and keep it valid JSON."""
    try:
        value = json.loads(text)
    except ValueError:
        return redact(text)

    def walk(v):
        if isinstance(v, str):
            return redact(v)
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    return json.dumps(walk(value), ensure_ascii=False)


def _redact_calls(message: dict) -> dict:
    if isinstance(message.get("tool_calls"), list):
        message = {**message, "tool_calls": [
            {**c, "function": {**c["function"], "arguments": _redact_json_text(c["function"]["arguments"])}}
            if isinstance(c, dict) and isinstance((c.get("function") or {}).get("arguments"), str) else c
            for c in message["tool_calls"]]}
    call = message.get("function_call")
    if isinstance(call, dict) and isinstance(call.get("arguments"), str):
        message = {**message, "function_call": {**call, "arguments": _redact_json_text(call["arguments"])}}
    return message


class RedactMiddleware:
    """Removes PII from what users send (before the model sees it) and from what the model
    answers (before the user sees it): text, logprob tokens and tool-call arguments, and the
    text /detokenize returns. Bodies are OpenAI-shaped; the input dicts are not changed. (While
    streaming, the server shows ``on_response`` the whole answer so far, so a finding split
    across chunks is still found.)"""

    def on_request(self, body: dict) -> dict:
        body = dict(body)
        if "messages" in body:
            body["messages"] = [{**m, "content": _redact_content(m.get("content"))} if isinstance(m, dict) else m
                                for m in body["messages"]]
        if isinstance(body.get("prompt"), str):
            body["prompt"] = redact(body["prompt"])
        elif isinstance(body.get("prompt"), list):
            body["prompt"] = [redact(p) if isinstance(p, str) else p for p in body["prompt"]]
        return body

    def on_response(self, body: dict) -> dict:
        body = dict(body)
        if isinstance(body.get("prompt"), str) and "choices" not in body:  # /detokenize
            body["prompt"] = redact(body["prompt"])
        choices = []
        for choice in body.get("choices", []):
            choice = dict(choice)
            for key in ("message", "delta"):
                if isinstance(choice.get(key), dict):
                    message = _redact_calls(choice[key])
                    if isinstance(message.get("content"), str):
                        message = {**message, "content": redact(message["content"])}
                    choice[key] = message
            if isinstance(choice.get("text"), str):
                choice["text"] = redact(choice["text"])
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                choice["logprobs"] = {**logprobs, "content": _redact_chat_logprobs(logprobs["content"])}
            elif isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
                choice["logprobs"] = _redact_completion_logprobs(logprobs)
            choices.append(choice)
        if "choices" in body:
            body["choices"] = choices
        return body


@dataclass
class Route:
    method: str
    path: str
    handler: Callable[[dict], dict]


def _redact_route(body: dict) -> dict:
    text = body.get("text", "")
    return {"text": redact(text), "found": [f.__dict__ for f in find(text)]}


@click.command(name="redact")
@click.argument("text", required=False)
@click.option("--show", is_flag=True, help="List what was found instead of printing the redacted text.")
def redact_command(text: str | None, show: bool) -> None:
    """Remove e-mail addresses, phone and card numbers, IBANs, IPs and SSNs from TEXT (or stdin)."""
    if text is None or text == "-":
        text = sys.stdin.read()
    if show:
        for f in find(text):
            click.echo(f"{f.kind:<6} {f.start:>5}-{f.end:<5} {f.text}")
        return
    click.echo(redact(text), nl=not text.endswith("\n"))


@hookimpl
def register_middleware(register):
    register("redact", RedactMiddleware())


@hookimpl
def register_commands(register):
    register("redact", redact_command)


@hookimpl
def register_cleaners(register):
    register("redact-pii", redact)  # llmkit's data preparation can strip PII from training text


@hookimpl
def register_routes(register):
    register("redact", Route("POST", "/v1/redact", _redact_route))


KINDS = [kind for kind, _, _ in PATTERNS]
