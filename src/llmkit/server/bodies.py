"""Reading a request's JSON body: media type, nesting depth, JSON, then the route's pydantic model.

Routes parse their own bodies (rather than letting FastAPI do it) so that plugins' middleware
sees a generation request before validation, and so that each check answers in OpenAI's error
shape. A body larger than ``_INLINE_BYTES`` is parsed on a preparation worker, off the event loop.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError

from llmkit.server import errors
from llmkit.server.errors import APIError, bad_request
from llmkit.server.state import ServerState, state_of

_INLINE_BYTES = 64 * 1024
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text (strings skipped), without recursing:
    ``json.loads`` itself fails with RecursionError somewhere past a thousand levels."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def check_media_type(request: Request) -> None:
    """JSON routes take JSON only: a web page can send text/plain or a form to any address
    without the browser asking the server first, but not application/json."""
    given = request.headers.get("content-type")
    media = (given or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        said = f"the request says {given!r}" if given else "the request gives no Content-Type"
        raise APIError(415, f"The body must be JSON sent with 'Content-Type: application/json'; {said}.",
                       code="unsupported_media_type")


def decode(raw: bytes, max_depth: int) -> dict:
    depth = json_depth(raw)
    if depth > max_depth:
        raise bad_request(f"The JSON body nests {depth} levels deep; this server accepts at most {max_depth}.",
                          code="invalid_json")
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise bad_request(f"The body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The body must be a JSON object.", code="invalid_json")
    return data


async def _off_loop(state: ServerState, raw: bytes, fn, *args):
    return await state.prep(fn, *args) if len(raw) > _INLINE_BYTES else fn(*args)


async def read_json(request: Request) -> dict:
    """The body as a JSON object ({} when empty), or a 415/400 that says what is wrong with it."""
    check_media_type(request)
    state = state_of(request)
    raw = await request.body()
    if not raw.strip():
        return {}
    return await _off_loop(state, raw, decode, raw, state.config.max_json_depth)


async def parse(request: Request, model: type[BaseModel], generation: bool = False) -> Any:
    """The body validated as ``model``; a generation request passes plugins' ``on_request`` first."""
    check_media_type(request)
    state = state_of(request)
    raw = await request.body()

    def work():
        data = decode(raw, state.config.max_json_depth)
        if generation:  # plugins' middleware sees the body before the model does
            data = state.middleware.on_request(data)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise errors.validation_error(exc.errors(include_url=False)) from None

    return await _off_loop(state, raw, work)
