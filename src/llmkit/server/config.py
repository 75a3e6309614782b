"""``ServerConfig``: how the server behaves. ``llmkit serve`` flags map onto these fields."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    """How the server behaves; ``llmkit serve`` flags map onto these fields."""

    model_name: str = "llmkit"  # the id clients pass as "model" (GET /v1/models)
    aliases: tuple[str, ...] = ()  # other ids accepted for the same model
    api_key: str | None = None
    max_batch: int = 16  # requests decoded together
    max_queue: int | None = 256  # requests waiting for a slot; more get 429
    # When a request gives no max_tokens (and the context allows it). The engine sizes its KV cache
    # for prompt + max_tokens, and a longer cache slows every decode step while it is that long.
    default_max_tokens: int = 512
    request_timeout: float = 600.0  # seconds from arrival to the last token
    max_body_bytes: int = 8 * 1024 * 1024
    drain_timeout: float = 30.0  # on shutdown: how long requests in flight may take to finish
    allow_origins: tuple[str, ...] = ()  # CORS origins for browser clients on other origins
    # The work one request may ask for, in tokens: its choices' prompt and max_tokens together,
    # the logprob entries it returns (tokens x (1 + top alternatives)), the texts it embeds.
    max_request_tokens: int = 16384
    max_messages: int = 1024  # messages in one chat request
    max_message_chars: int = 262144  # characters in one message, prompt or input text
    max_json_depth: int = 128  # nesting of the request's JSON (arrays and objects)
    body_timeout: float = 60.0  # seconds a client has to send its whole request body (408 beyond)
    max_connections: int = 1024  # open connections; more are answered 503 at once
    # Responses (POST /v1/responses) kept for GET, DELETE and previous_response_id: the most
    # recently used ones, in memory; 0 keeps none
    max_stored_responses: int = 256
    # Without an API key, only requests whose Host header names this server are served (a web
    # page cannot then reach it through a DNS name of its own). Loopback names and IP addresses
    # always pass; "*" lets any Host through.
    host: str = "127.0.0.1"  # the address the server is bound to
    allow_hosts: tuple[str, ...] = ()
