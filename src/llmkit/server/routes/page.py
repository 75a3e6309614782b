"""The chat page at ``/``: one static HTML file, sent with a content security policy that lets
only its own inline script and style run, and only same-origin requests leave it."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

STATIC = Path(__file__).resolve().parent.parent / "static"


def _hashes(html: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


@lru_cache(maxsize=1)
def _page() -> tuple[str, dict[str, str]]:
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    policy = (f"default-src 'none'; script-src {_hashes(html, 'script')}; style-src {_hashes(html, 'style')}; "
              "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'")
    headers = {"Content-Security-Policy": policy, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer"}
    return html, headers


@router.get("/", include_in_schema=False)
async def chat_page() -> HTMLResponse:
    html, headers = _page()
    return HTMLResponse(html, headers=headers)
