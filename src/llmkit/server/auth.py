"""The guard in front of every route: API key, and a bound on the request body's size.

A pure ASGI middleware (not FastAPI's ``@app.middleware``) so that an unauthorised or oversized
request is answered before anything reads its body.

The key is accepted as ``Authorization: Bearer KEY`` (OpenAI clients), ``X-Api-Key: KEY``, or HTTP
Basic with KEY as the password: a browser opening the chat page of a server started with
``--api-key`` gets the browser's own login prompt, and then sends the same credentials with the
page's API calls, so the page works without putting the key in the page.
"""

from __future__ import annotations

import base64
import hmac
import json

OPEN_PATHS = frozenset({"/health"})


def _error(status: int, message: str, code: str, extra_headers: list[tuple[bytes, bytes]] = ()) -> tuple:
    kind = {401: "authentication_error", 413: "invalid_request_error"}.get(status, "invalid_request_error")
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    return status, headers, body


async def _send_error(send, status, headers, body) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _same(given: str, key: str) -> bool:
    # constant time in the key's content: an attacker cannot find it byte by byte from timings
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), key.encode("utf-8"))


def key_matches(headers: dict[bytes, bytes], key: str) -> bool:
    auth = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, value = auth.partition(" ")
    value = value.strip()
    ok = False
    if scheme.lower() == "bearer":
        ok = _same(value, key)
    elif scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except Exception:
            password = ""
        ok = _same(password, key)
    x_key = headers.get(b"x-api-key")
    if x_key is not None:
        ok = _same(x_key.decode("latin-1").strip(), key) or ok
    return ok


class Guard:
    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key or None
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            if not key_matches(headers, self.api_key):
                wants_page = scope["method"] == "GET" and b"text/html" in headers.get(b"accept", b"")
                challenge = b'Basic realm="llmkit", charset="UTF-8"' if wants_page else b"Bearer"
                given = b"authorization" in headers or b"x-api-key" in headers
                message = ("The API key is wrong." if given else "This server needs an API key.") + (
                    " Send it as 'Authorization: Bearer KEY' (or 'X-Api-Key: KEY').")
                return await _send_error(send, *_error(401, message, "invalid_api_key",
                                                       [(b"www-authenticate", challenge)]))
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_large = _error(413, f"The request body is larger than this server accepts ({self.max_body} bytes).",
                           "request_too_large")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _send_error(send, *too_large)
        # Read the body here, counting (a chunked upload has no Content-Length), then replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _send_error(send, *too_large)
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
