"""The guard in front of every route: who may call (Host, Origin, API key) and how much they may
send (body size, and the time to send it).

A pure ASGI middleware (not FastAPI's ``@app.middleware``) so that a refused request is answered
before anything reads its body. In order:

- Host: without an API key, a request must name this server in its Host header: its bound
  address, a loopback name, an IP address, or a name allowed with ``--allow-host``. A web page
  that points a DNS name of its own at 127.0.0.1 (DNS rebinding) is refused.
- Origin: a browser says which page sent a request. One from another origin is refused unless
  CORS allows it (``--allow-origin``), so a page the user visits cannot drive the server with the
  user's cached credentials.
- The API key, as ``Authorization: Bearer KEY`` (OpenAI clients), ``X-Api-Key: KEY`` (Anthropic's), or HTTP
  Basic with KEY as the password: a browser opening the chat page of a server started with a key
  gets the browser's own login prompt, and then sends the same credentials with the page's API
  calls, so the page works without putting the key in the page.
- The body: at most ``max_body_bytes``, sent within ``body_timeout`` seconds (a client trickling
  its body must not hold a connection indefinitely).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import socket
from urllib.parse import urlsplit

from llmkit.server.config import ServerConfig
from llmkit.server.errors import anthropic_body, speaks_anthropic

OPEN_PATHS = frozenset({"/health"})
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def _error(status: int, message: str, code: str, extra_headers: list[tuple[bytes, bytes]] = ()) -> tuple:
    kind = {401: "authentication_error", 403: "permission_error", 408: "timeout_error"}.get(
        status, "invalid_request_error")
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    return status, headers, body


async def _send_error(send, status, headers, body, path: str = "") -> None:
    if speaks_anthropic(path):  # that API's own error shape
        body = json.dumps(anthropic_body(status, json.loads(body)["error"]["message"])).encode()
        headers = [(k, str(len(body)).encode() if k == b"content-length" else v) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _same(given: bytes, key: bytes) -> bool:
    # constant time in the key's content: an attacker cannot find it byte by byte from timings
    return hmac.compare_digest(given, key)


def key_matches(headers: dict[bytes, bytes], key: str) -> bool:
    """Whether the request carries ``key``. Header bytes are compared as sent (UTF-8 for a key
    beyond ASCII), not decoded first."""
    want = key.encode("utf-8")
    scheme, _, value = headers.get(b"authorization", b"").strip().partition(b" ")
    value = value.strip()
    ok = False
    if scheme.lower() == b"bearer":
        ok = _same(value, want)
    elif scheme.lower() == b"basic":
        try:
            _, _, password = base64.b64decode(value, validate=True).partition(b":")
        except Exception:
            password = b""
        ok = _same(password, want)
    x_key = headers.get(b"x-api-key")
    if x_key is not None:
        ok = _same(x_key.strip(), want) or ok
    return ok


def _host_name(host: str) -> str:
    """The name in a Host header or an origin's authority, without the port and brackets."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    def __init__(self, app, *, config: ServerConfig):
        self.app = app
        self.api_key = config.api_key or None
        self.max_body = config.max_body_bytes
        self.body_timeout = config.body_timeout
        self.any_origin = "*" in config.allow_origins
        self.origins = {o.rstrip("/").lower() for o in config.allow_origins}
        self.any_host = "*" in config.allow_hosts
        self.hosts = {h.lower() for h in config.allow_hosts} | {_host_name(config.host)} | _LOOPBACK_NAMES
        if config.host in ("0.0.0.0", "::", ""):  # every address of this machine: its own name too
            self.hosts.add(socket.gethostname().lower())

    def host_allowed(self, host: str) -> bool:
        name = _host_name(host)
        return (self.any_host or name in self.hosts or name.endswith(".localhost") or _is_ip(name))

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if self.any_origin or origin in self.origins:
            return True
        # the page was served by this server (the chat page): same scheme-less authority
        return host is not None and urlsplit(origin).netloc == host.strip().lower()

    def refusal(self, scope, headers: dict[bytes, bytes]) -> tuple | None:
        """The error response for a request that may not be served at all, or None."""
        host = headers.get(b"host", b"").decode("latin-1") or None
        if self.api_key is None and host is not None and scope["path"] not in OPEN_PATHS \
                and not self.host_allowed(host):
            return _error(403, f"This server does not answer to the host name {host!r} (without an API key it "
                               "serves only its own address, loopback names and IP addresses). Start it with "
                               f"--allow-host {_host_name(host)} to serve that name.", "host_not_allowed")
        origin = headers.get(b"origin")
        if origin is not None and scope["method"] != "OPTIONS":
            origin_text = origin.decode("latin-1")
            if not self.origin_allowed(origin_text, host):
                return _error(403, f"Requests from web pages on {origin_text} are refused: that origin is not "
                                   "allowed to call this server. Start it with --allow-origin "
                                   f"{origin_text} to let that page call it.", "origin_not_allowed")
        if self.api_key and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            if not key_matches(headers, self.api_key):
                wants_page = scope["method"] == "GET" and b"text/html" in headers.get(b"accept", b"")
                challenge = b'Basic realm="llmkit", charset="UTF-8"' if wants_page else b"Bearer"
                given = b"authorization" in headers or b"x-api-key" in headers
                message = ("The API key is wrong." if given else "This server needs an API key.") + (
                    " Send it as 'Authorization: Bearer KEY' (or 'X-Api-Key: KEY').")
                return _error(401, message, "invalid_api_key", [(b"www-authenticate", challenge)])
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        refused = self.refusal(scope, headers)
        if refused is not None:
            return await _send_error(send, *refused, scope["path"])
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_large = _error(413, f"The request body is larger than this server accepts ({self.max_body} bytes).",
                           "request_too_large")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _send_error(send, *too_large, scope["path"])
        # Read the body here, counting (a chunked upload has no Content-Length), then replay it.
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await _send_error(send, *_error(
                    408, f"The request body did not arrive within {self.body_timeout:g} s.", "body_timeout",
                    [(b"connection", b"close")]), scope["path"])
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _send_error(send, *too_large, scope["path"])
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: http.disconnect, which cancels a generation

        return await self.app(scope, replay, send)
