"""The plugin module named by the `llmkit` entry point. Each function marked ``@hookimpl`` is one
extension point; llmkit calls it with a ``register`` callback when it first needs that kind."""

from __future__ import annotations

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


class RedactMiddleware:
    """Removes PII from what users send (before the model sees it) and from what the model
    answers (before the user sees it). Bodies are OpenAI-shaped; the input dicts are not changed."""

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
        choices = []
        for choice in body.get("choices", []):
            choice = dict(choice)
            for key in ("message", "delta"):
                if isinstance(choice.get(key), dict) and isinstance(choice[key].get("content"), str):
                    choice[key] = {**choice[key], "content": redact(choice[key]["content"])}
            if isinstance(choice.get("text"), str):
                choice["text"] = redact(choice["text"])
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
