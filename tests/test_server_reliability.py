"""The server under careless or hostile clients: every bad request gets a 4xx that names what to
change, no request holds the server past its bounds, browsers on other sites cannot drive it, and
plugins' middleware sees what the client will see. Real uvicorn servers on free ports over tiny
random models (vocabulary 400, context 128)."""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import llmkit
from llmkit.server import ServerConfig, create_app, memory

from test_server import MODEL, USER, assert_error, client, free_port, metric, running_server

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "llmkit-redact"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return llmkit.load(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def url(tiny):
    app = create_app(tiny, config=ServerConfig(model_name=MODEL, default_max_tokens=16))
    with running_server(app) as base:
        yield base


class Gate:
    """A forward pre-hook on a model: counts full forwards (embeddings, prompt scoring; the
    engine's batched steps do not pass through it) and, while shut, holds each one until opened."""

    def __init__(self, model):
        self.calls = 0
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.opened.set()
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        self.entered.set()
        assert self.opened.wait(60), "the gate was never opened"

    def shut(self) -> None:
        self.opened.clear()
        self.entered.clear()
        self.calls = 0


@pytest.fixture(scope="module")
def gated_llm(tiny_model_dir):
    """A model of its own (its forward hook must not touch the other tests' model)."""
    llm = llmkit.load(tiny_model_dir("llama"))
    gate = Gate(llm.model)
    yield llm, gate
    gate.opened.set()
    gate.handle.remove()


@pytest.fixture
def gated(gated_llm):
    llm, gate = gated_llm
    gate.opened.set()
    gate.calls = 0
    yield llm, gate
    gate.opened.set()


def wait_until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def in_thread(fn, *args) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def long_texts(tiny, count: int, tokens: int = 100) -> list[str]:
    """``count`` texts of about ``tokens`` tokens each."""
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ids = tiny.tokenizer.encode(text)[:tokens]
    return [tiny.tokenizer.decode(ids)] * count


# ------------------------------------------------------------------------------------------ one door


def test_the_server_builds_no_engine_and_no_request_of_its_own(url, tiny):
    """Every engine request of the server is built by LLM.requests and runs on the LLM's engine."""
    made = []
    for path in (ROOT / "src" / "llmkit" / "server").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in ("Engine", "Request", "TorchExecutor"):
                    made.append(f"{path.name}:{node.lineno} {name}(...)")
    assert made == []
    before = tiny.engine.generation_tokens_total
    r = client(url).completions.create(model=MODEL, prompt="Paris", max_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert tiny.engine.generation_tokens_total - before == 3


def test_sampling_settings_come_from_the_sampling_dataclass():
    import dataclasses

    from llmkit.sampling import SamplingParams
    from llmkit.server import params, schemas

    shared = {f.name for f in dataclasses.fields(SamplingParams)} & set(schemas._Sampling.model_fields)
    assert set(params.SAMPLING_FIELDS) == shared
    assert {"temperature", "top_p", "seed", "stop", "logit_bias", "max_tokens"} <= shared


# ------------------------------------------------------------------------------------------ work beside the engine


def test_embeddings_wait_in_the_bounded_queue(gated):
    llm, gate = gated
    app = create_app(llm, config=ServerConfig(model_name=MODEL, max_queue=1))
    with running_server(app) as base:
        gate.shut()
        results: dict = {}
        answered = threading.Event()

        def post(name: str, text: str) -> None:
            # generous: on a machine loaded by other work the worker below the loop's priority waits
            results[name] = httpx.post(base + "/v1/embeddings", json={"input": text}, timeout=600)
            answered.set()

        first = in_thread(post, "running", "fox")
        assert gate.entered.wait(600)  # in its forward, held by the gate
        waiting = [in_thread(post, name, "dog") for name in ("second", "third")]
        # one of the two waits for the forward; the other finds the queue full, while the gate is still shut
        assert answered.wait(600), "no refusal while the queue is full"
        (refused,) = results.values()
        err = assert_error(refused, 429, "queue_full")
        assert "retry" in err["message"]
        gate.opened.set()
        for t in (first, *waiting):
            t.join()
        assert sorted(r.status_code for r in results.values()) == [200, 200, 429]
        assert metric(base, "llmkit:request_rejected_total", reason="queue_full") == 1


def test_embeddings_stop_when_the_client_leaves(gated):
    llm, gate = gated
    app = create_app(llm, config=ServerConfig(model_name=MODEL))
    texts = long_texts(llm, 25)  # three steps of the worker
    with running_server(app) as base:
        gate.shut()
        port = int(base.rsplit(":", 1)[1])
        body = json.dumps({"input": texts}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert gate.entered.wait(30)
        sock.close()  # the client leaves during the first step
        wait_until(lambda: metric(base, "llmkit:offload_abandoned_total", reason="client_gone") == 1,
                   "the server to notice the client left")
        gate.opened.set()
        # the worker does one job at a time: this answer comes after the abandoned job stopped
        r = httpx.post(base + "/v1/embeddings", json={"input": "fox"}, timeout=60)
        assert r.status_code == 200
        assert gate.calls == 2  # the abandoned job's first step, then this one: its other steps never ran


def test_embeddings_keep_the_time_limit(gated):
    llm, gate = gated
    app = create_app(llm, config=ServerConfig(model_name=MODEL, request_timeout=3.0))
    with running_server(app) as base:
        gate.shut()
        opener = threading.Timer(45, gate.opened.set)  # in case the time limit never comes
        opener.start()
        try:
            assert_error(httpx.post(base + "/v1/embeddings", json={"input": long_texts(llm, 25)}, timeout=90),
                         504, "timeout")
        finally:
            opener.cancel()
        gate.opened.set()
        r = httpx.post(base + "/v1/embeddings", json={"input": "fox"}, timeout=60)
        assert r.status_code == 200
        assert gate.calls == 2  # the late job stopped after the step it was in
        assert metric(base, "llmkit:offload_abandoned_total", reason="timeout") == 1


def test_echo_scoring_runs_in_the_engine_under_the_time_limit(tiny):
    """An echoed prompt's logprobs are scored by the engine: behind whatever holds it, the request
    ends at the time limit and its scoring leaves the engine (every slot free again)."""
    from llmkit.sampling import SamplingParams

    entered, release = threading.Event(), threading.Event()

    def hold(generated, logits):
        entered.set()
        assert release.wait(300), "never released"
        return logits

    app = create_app(tiny, config=ServerConfig(model_name=MODEL, request_timeout=3.0))
    with running_server(app) as base:
        params = SamplingParams(max_tokens=2, logits_processors=[hold])
        (held,) = tiny.requests([tiny.tokenizer.encode("Paris")], params)
        handle = tiny.submit(held)
        try:
            assert entered.wait(300)
            body = {"prompt": ["The quick brown fox", "Paris is the capital"], "max_tokens": 0, "echo": True,
                    "logprobs": 1}
            assert_error(httpx.post(base + "/v1/completions", json=body, timeout=300), 504, "timeout")
            assert tiny.engine.num_waiting == 2  # queued behind the held step, not run beside it
        finally:
            release.set()
        list(handle.events())
        wait_until(lambda: tiny.engine.num_waiting == tiny.engine.num_running == 0, "the engine idle", timeout=300)
        assert metric(base, "llmkit:request_success_total", finished_reason="abort") == 2


def test_one_request_cannot_ask_for_unbounded_work(tiny):
    app = create_app(tiny, config=ServerConfig(model_name=MODEL, max_request_tokens=600))
    with running_server(app) as base:
        chat = lambda **kw: httpx.post(base + "/v1/chat/completions", json={"messages": USER, **kw})
        err = assert_error(chat(n=63, max_tokens=100), 400, "request_too_large", "n")
        assert "600" in err["message"] and "max_request_tokens" in err["message"]
        assert chat(n=2, max_tokens=8).status_code == 200
        err = assert_error(chat(n=10, max_tokens=10, logprobs=True, top_logprobs=20), 400, "request_too_large",
                           "logprobs")
        assert "max_request_tokens" in err["message"]
        comp = httpx.post(base + "/v1/completions", json={"prompt": ["Paris"] * 8, "n": 8, "max_tokens": 20})
        assert_error(comp, 400, "request_too_large")
        emb = httpx.post(base + "/v1/embeddings", json={"input": long_texts(tiny, 7)})
        assert "max_request_tokens" in assert_error(emb, 400, "request_too_large", "input")["message"]
        assert httpx.post(base + "/v1/embeddings", json={"input": long_texts(tiny, 5)}).status_code == 200


# ------------------------------------------------------------------------------------------ the event loop


def test_chat_templates_render_off_the_event_loop(tiny):
    from llmkit.api import LLM
    from llmkit.tokenizer import Tokenizer

    entered, release = threading.Event(), threading.Event()

    class SlowTemplate(Tokenizer):
        def apply_chat_template(self, messages, *args, **kwargs):
            if any("BLOCK" in str(m.get("content")) for m in messages):
                entered.set()
                assert release.wait(60)
            return super().apply_chat_template(messages, *args, **kwargs)

    tok = SlowTemplate(tiny.tokenizer.backend, special_tokens=tiny.tokenizer.special_tokens,
                       chat_template=tiny.tokenizer.chat_template)
    app = create_app(LLM(tiny.model, tok, name="slow-template"), config=ServerConfig(model_name=MODEL))
    with running_server(app) as base:
        result: dict = {}

        def chat() -> None:
            result["r"] = httpx.post(base + "/v1/chat/completions", timeout=90, json={
                "messages": [{"role": "user", "content": "BLOCK"}], "max_tokens": 2})

        t = in_thread(chat)
        assert entered.wait(30)
        try:
            health = httpx.get(base + "/health", timeout=20)  # answered while the template renders
            assert health.json() == {"status": "ok"}
        finally:
            release.set()
        t.join(60)
        assert result["r"].status_code == 200


def test_conversations_have_bounds(tiny):
    app = create_app(tiny, config=ServerConfig(model_name=MODEL, max_messages=4, max_message_chars=100))
    with running_server(app) as base:
        post = lambda messages: httpx.post(base + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
        err = assert_error(post(USER * 5), 400, "too_many_messages", "messages")
        assert "max_messages" in err["message"] and "4" in err["message"]
        err = assert_error(post([{"role": "user", "content": "x" * 101}]), 400, "message_too_long", "messages")
        assert "max_message_chars" in err["message"]
        parts = [{"type": "text", "text": "x" * 60}, {"type": "text", "text": "y" * 60}]
        assert_error(post([{"role": "user", "content": parts}]), 400, "message_too_long")
        assert_error(httpx.post(base + "/tokenize", json={"messages": USER * 5}), 400, "too_many_messages")
        assert_error(httpx.post(base + "/v1/completions", json={"prompt": "x" * 101}), 400, "message_too_long")
        assert_error(httpx.post(base + "/v1/embeddings", json={"input": ["a", "x" * 101]}), 400, "message_too_long")
        assert post(USER * 4).status_code == 200


# ------------------------------------------------------------------------------------------ 400s, not 500s


def test_malformed_values_get_400s(url):
    post = lambda body, route="/v1/chat/completions": httpx.post(
        url + route, content=body if isinstance(body, bytes) else json.dumps(body).encode(),
        headers={"content-type": "application/json"})
    deep = b'{"messages": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    err = assert_error(post(deep), 400, "invalid_json")
    assert "nests" in err["message"]
    in_message = ('{"messages": [{"role": "user", "content": "hi", "x": ' + "[" * 900 + "]" * 900 + "}]}").encode()
    assert_error(post(in_message), 400, "invalid_json")
    assert_error(post(b'{"a": "' + b"[" * 5000 + b'"}', "/tokenize"), 400)  # brackets in a string are text
    for seed in (2**64, -(2**63) - 1, 10**30):
        assert_error(post({"messages": USER, "seed": seed, "max_tokens": 2}), 400, param="seed")
    assert post({"messages": USER, "seed": 2**63 - 1, "n": 2, "max_tokens": 2}).status_code == 200
    for key in ("\u00b2", "\u0663", "1e3", "-1", " ", "0x10"):
        assert_error(post({"messages": USER, "logit_bias": {key: 1}, "max_tokens": 2}), 400, param="logit_bias")
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1" * 5000):
        assert_error(post(b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + literal + b"}"), 400)
    # an empty conversation with tools (found by generated requests): its tools still render
    tool = {"type": "function", "function": {"name": "f"}}
    assert httpx.post(url + "/tokenize", json={"messages": [], "tools": [tool]}).status_code == 200
    # an empty prompt is an empty prompt, not a prompt too long for the context
    for body in ({"prompt": [[]]}, {"prompt": [[5], []]}, {"prompt": ""}):
        err = assert_error(post({**body, "max_tokens": 2}, "/v1/completions"), 400, "empty_prompt", "prompt")
        assert "context" not in err["message"]


def test_models_are_listed_while_the_model_loads(tiny):
    gate = threading.Event()

    def loader():
        gate.wait(30)
        return tiny

    app = create_app(config=ServerConfig(model_name=MODEL), loader=loader)
    with running_server(app) as base:
        try:
            r = httpx.get(base + "/v1/models")
            assert r.status_code == 200, r.text
            assert r.json()["data"][0]["id"] == MODEL and r.json()["data"][0]["max_model_len"] is None
        finally:
            gate.set()
        wait_until(lambda: httpx.get(base + "/ready").status_code == 200, "the model to load")
        assert httpx.get(base + "/v1/models").json()["data"][0]["max_model_len"] == tiny.context_length


# ------------------------------------------------------------------------------------------ other web sites


def test_json_routes_take_json_only(url):
    body = json.dumps({"prompt": "Paris", "max_tokens": 2})
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"},
                    {"content-type": "multipart/form-data; boundary=x"}, {}):
        for route in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize"):
            r = httpx.post(url + route, content=body, headers=headers)
            err = assert_error(r, 415, "unsupported_media_type")
            assert "application/json" in err["message"]
    ok = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200


def test_host_names_other_than_the_servers_are_refused_without_a_key(tiny):
    app = create_app(tiny, config=ServerConfig(model_name=MODEL, allow_hosts=("llm.internal",)))
    with running_server(app) as base:
        # a page on rebind.example that pointed its name at 127.0.0.1
        err = assert_error(httpx.get(base + "/v1/models", headers={"host": "rebind.example:8000"}), 403,
                           "host_not_allowed")
        assert "--allow-host rebind.example" in err["message"]
        assert_error(httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                headers={"host": "rebind.example"}), 403)
        for host in ("localhost:1234", "127.0.0.1", "[::1]:80", "llm.internal:8000", "app.localhost", "10.1.2.3"):
            assert httpx.get(base + "/v1/models", headers={"host": host}).status_code == 200, host
        assert httpx.get(base + "/health", headers={"host": "rebind.example"}).status_code == 200
    keyed = create_app(tiny, config=ServerConfig(model_name=MODEL, api_key="k"))
    with running_server(keyed) as base:  # a key protects the server whatever name reaches it
        assert httpx.get(base + "/v1/models", headers={"host": "rebind.example", "x-api-key": "k"}).status_code == 200
    anyone = create_app(tiny, config=ServerConfig(model_name=MODEL, allow_hosts=("*",)))
    with running_server(anyone) as base:
        assert httpx.get(base + "/v1/models", headers={"host": "rebind.example"}).status_code == 200


def test_pages_on_other_origins_are_refused_unless_cors_allows_them(tiny):
    app = create_app(tiny, config=ServerConfig(model_name=MODEL, allow_origins=("https://app.example",),
                                               api_key="s3cret"))
    body = {"prompt": "Paris", "max_tokens": 2}
    key = {"authorization": "Bearer s3cret"}
    with running_server(app) as base:
        r = httpx.post(base + "/v1/completions", json=body, headers={**key, "origin": "https://evil.example"})
        assert "--allow-origin" in assert_error(r, 403, "origin_not_allowed")["message"]
        assert "access-control-allow-origin" not in r.headers
        assert_error(httpx.post(base + "/v1/completions", json=body, headers={**key, "origin": "null"}), 403)
        allowed = httpx.post(base + "/v1/completions", json=body, headers={**key, "origin": "https://app.example"})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        same = httpx.post(base + "/v1/completions", json=body, headers={**key, "origin": base})  # the chat page
        assert same.status_code == 200
        # refusals carry CORS headers for an allowed origin, so that its page can read them
        for r, status in ((httpx.post(base + "/v1/completions", json=body, headers={"origin": "https://app.example"}),
                           401),
                          (httpx.post(base + "/v1/completions", content=b"x" * (9 * 1024 * 1024),
                                      headers={**key, "origin": "https://app.example"}), 413)):
            assert_error(r, status)
            assert r.headers["access-control-allow-origin"] == "https://app.example"
        preflight = httpx.options(base + "/v1/completions", headers={
            "origin": "https://app.example", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        assert preflight.status_code == 200


# ------------------------------------------------------------------------------------------ keys, bodies, the page


def test_keys_beyond_ascii_match(tiny):
    key = "cl\u00e9-\u5bc6\u94a5"
    app = create_app(tiny, config=ServerConfig(model_name=MODEL, api_key=key))
    with running_server(app) as base:
        raw = key.encode()
        assert httpx.get(base + "/v1/models", headers={"authorization": b"Bearer " + raw}).status_code == 200
        assert httpx.get(base + "/v1/models", headers={"x-api-key": raw}).status_code == 200
        assert httpx.get(base + "/v1/models", auth=("me", key)).status_code == 200
        assert_error(httpx.get(base + "/v1/models", headers={"authorization": b"Bearer " + raw[:-1]}), 401)
        assert_error(httpx.get(base + "/v1/models", headers={"x-api-key": key.encode("latin-1", "replace")}), 401)


def test_a_body_sent_too_slowly_is_cut_off(tiny):
    app = create_app(tiny, config=ServerConfig(model_name=MODEL, body_timeout=1.0))
    with running_server(app) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")
            stop = threading.Event()

            def trickle():  # one byte now and then, never the whole body
                while not stop.wait(0.3):
                    try:
                        sock.sendall(b" ")
                    except OSError:
                        return

            t = in_thread(trickle)
            reply = b""
            try:
                while b"\r\n\r\n" not in reply:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
            finally:
                stop.set()
                t.join(5)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert httpx.get(base + "/health").status_code == 200


def test_the_chat_page_forbids_framing_and_foreign_scripts(url):
    import base64
    import hashlib
    import re

    page = httpx.get(url + "/")
    assert page.headers["x-frame-options"] == "DENY"
    policy = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy and "unsafe-inline" not in policy
    # the page's own script and style are allowed by their hashes, and nothing else is inline
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        (block,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page.text, re.S)
        digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in policy.split(directive, 1)[1].split(";", 1)[0]
    assert ' style="' not in page.text and " onclick=" not in page.text


def test_serve_steers_the_key_to_the_environment(tmp_path):
    from click.testing import CliRunner

    from llmkit.cli import main

    runner = CliRunner()
    missing = str(tmp_path / "no-such-model.gguf")
    result = runner.invoke(main, ["serve", "-m", missing, "--api-key", "abc"])
    assert result.exit_code != 0 and "LLMKIT_API_KEY" in result.output and "ps" in result.output
    quiet = runner.invoke(main, ["serve", "-m", missing], env={"LLMKIT_API_KEY": "abc"})
    assert quiet.exit_code != 0 and "LLMKIT_API_KEY" not in quiet.output
    assert "LLMKIT_API_KEY" in runner.invoke(main, ["serve", "--help"]).output


def test_llmkit_serve_limits_connections_and_reads_the_key_from_the_environment(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMKIT_PLUGINS": "", "LLMKIT_API_KEY": "from-env"}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "llmkit.cli", "serve", "-m", str(tiny_model_dir("llama")),
                             "--port", str(port), "--max-connections", "2", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    idle = []
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(base + "/ready", headers={"x-api-key": "from-env"}).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, "llmkit serve to load the tiny model", timeout=120)
        assert_error(httpx.get(base + "/v1/models"), 401)
        # two clients hold connections open, each in the middle of a request
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n\r\n{")
            idle.append(s)
        # once the server holds both, a third client is turned away at once
        wait_until(lambda: httpx.get(base + "/health", timeout=30).status_code == 503, "a 503 at the limit")
        for s in idle:
            s.close()
        wait_until(lambda: httpx.get(base + "/health").status_code == 200, "the connections to close")
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(30)
        log.close()


# ------------------------------------------------------------------------------------------ middleware


@pytest.fixture
def redacting(monkeypatch):
    """The example redaction plugin, registered the way its entry point would register it."""
    from llmkit import plugins

    monkeypatch.syspath_prepend(str(EXAMPLE))
    import llmkit_redact.plugin as module

    plugins.reset()
    plugins.manager().register(module, name="redact-under-test")
    yield module
    plugins.reset()


# longer than what a stream holds back, so that parts of it go out before the end
EMAIL_TEXT = ("Part of this goes out early. Write to jane.doe@example.com today and copy "
              "john.smith@example.org too, thanks.")
REDACTED = json.dumps("Part of this goes out early. Write to [EMAIL] today and copy [EMAIL] too, thanks.")


def forced(text: str) -> dict:
    """A response_format whose only valid output is the JSON string ``text``: the tiny random model
    then writes exactly that, token by token."""
    return {"type": "json_schema", "json_schema": {"name": "fixed", "schema": {"enum": [text]}}}


def sse_events(response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.iter_lines()
            if line.startswith("data:") and line.strip() != "data: [DONE]"]


def test_redaction_sees_a_streamed_answer_whole(tiny, redacting):
    app = create_app(tiny, config=ServerConfig(model_name=MODEL))
    with running_server(app) as base:
        body = {"messages": USER, "max_tokens": 100, "temperature": 0, "response_format": forced(EMAIL_TEXT),
                "logprobs": True, "top_logprobs": 2}
        whole = httpx.post(base + "/v1/chat/completions", json=body).json()["choices"][0]
        assert whole["message"]["content"] == REDACTED
        with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = sse_events(r)
        deltas = [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]
        tokens = [t["token"] for e in events if e["choices"] and e["choices"][0]["logprobs"]
                  for t in e["choices"][0]["logprobs"]["content"]]
        assert "".join(deltas) == REDACTED
        assert len([d for d in deltas if d]) >= 2  # sent as it became final, not all at the end
        assert "jane" not in "".join(tokens) and "example" not in "".join(tokens)
        assert "".join(tokens).count("[EMAIL]") == 2
        assert [t["token"] for t in whole["logprobs"]["content"]] == tokens
        # unredacted, the address really is split across chunks: what the middleware had to catch
        plain = tiny.tokenizer.encode(json.dumps(EMAIL_TEXT))
        assert len(plain) > 5
        assert not any("jane.doe@example.com" in tiny.tokenizer.decode([t]) for t in plain)
        # text completions stream the same way
        comp = {"prompt": "Paris", "max_tokens": 100, "temperature": 0, "response_format": forced(EMAIL_TEXT),
                "logprobs": 1, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=comp) as r:
            events = sse_events(r)
        texts = [e["choices"][0]["text"] for e in events if e["choices"]]
        assert "".join(texts) == REDACTED and len([t for t in texts if t]) >= 2
        lp_tokens = "".join(t for e in events if e["choices"] and e["choices"][0]["logprobs"]
                            for t in e["choices"][0]["logprobs"]["tokens"])
        assert "jane" not in lp_tokens and "[EMAIL]" in lp_tokens


def test_redaction_reaches_tool_call_arguments(tiny, redacting):
    from llmkit.api import LLM

    from test_server import TOOLS_TEMPLATE
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer(tiny.tokenizer.backend, special_tokens=tiny.tokenizer.special_tokens, chat_template=TOOLS_TEMPLATE)
    mail = {"type": "function", "function": {"name": "send", "parameters": {
        "type": "object", "properties": {"to": {"enum": ["jane.doe@example.com"]}}, "required": ["to"],
        "additionalProperties": False}}}
    app = create_app(LLM(tiny.model, tok, name="tools"), config=ServerConfig(model_name=MODEL))
    with running_server(app) as base:
        body = {"messages": USER, "tools": [mail], "tool_choice": "required", "temperature": 0}
        whole = httpx.post(base + "/v1/chat/completions", json=body).json()["choices"][0]
        (call,) = whole["message"]["tool_calls"]
        assert json.loads(call["function"]["arguments"]) == {"to": "[EMAIL]"}
        with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = sse_events(r)
        arguments = "".join(d["function"].get("arguments") or "" for e in events if e["choices"]
                            for d in e["choices"][0]["delta"].get("tool_calls") or [])
        assert json.loads(arguments) == {"to": "[EMAIL]"}
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]] \
            == ["tool_calls"]


def test_middleware_sees_tokenize_detokenize_and_embeddings(tiny, redacting):
    from llmkit import plugins

    seen = []

    class Record:
        def on_response(self, body):
            seen.append(sorted(body))
            return body

    class Plugin:
        @plugins.hookimpl
        def register_middleware(self, register):
            register("record", Record())

    plugins.manager().register(Plugin(), name="record-under-test")
    app = create_app(tiny, config=ServerConfig(model_name=MODEL))
    with running_server(app) as base:
        ids = tiny.tokenizer.encode("mail jane.doe@example.com now")
        detok = httpx.post(base + "/detokenize", json={"tokens": ids}).json()
        assert detok == {"prompt": "mail [EMAIL] now"}
        assert httpx.post(base + "/tokenize", json={"prompt": "hello"}).status_code == 200
        assert httpx.post(base + "/v1/embeddings", json={"input": "hello"}).status_code == 200
    assert seen == [["prompt"], ["count", "max_model_len", "tokens"], ["data", "model", "object", "usage"]]


def test_stream_view_holds_back_only_what_may_still_change():
    from llmkit.server.hooks import HOLD_BACK_CHARS, final_upto

    assert final_upto("short text") == 0
    text = "word " * 40 + "jane.doe@exa"
    cut = final_upto(text)
    assert text[cut:].startswith(" ") and len(text) - cut >= HOLD_BACK_CHARS and "jane" not in text[:cut]
    assert final_upto("x" * 500) == 0  # no space: nothing is final until more text or the end


# ------------------------------------------------------------------------------------------ resident memory


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


glibc_only = pytest.mark.skipif(memory._libc() is None, reason="glibc's allocator controls only")


@glibc_only
def test_the_allocator_settings_leave_the_users_own_alone(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert memory.tune_allocator() == {"MALLOC_MMAP_THRESHOLD_": memory.MMAP_THRESHOLD,
                                       "MALLOC_ARENA_MAX": memory.arena_max()}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "1")
    assert memory.tune_allocator() == {"MALLOC_MMAP_THRESHOLD_": memory.MMAP_THRESHOLD}


@glibc_only
def test_trimming_gives_freed_pages_back_to_the_system():
    """Blocks freed in the middle of a thread's arena stay resident until trimmed."""
    import ctypes

    libc = memory._libc()
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 * 1024, 3200  # under the mmap threshold: carved from the arena
    kept: list = []

    def fill() -> None:
        for _ in range(count):
            p = libc.malloc(size)
            ctypes.memset(p, 1, size)  # touched: resident
            kept.append(p)
        for p in kept[:-1]:  # the last block stays: the arena's top cannot shrink past it
            libc.free(p)

    before = _rss()
    thread = in_thread(fill)
    thread.join(300)
    held = _rss()
    assert memory.release_free_memory()
    after = _rss()
    libc.free(kept[-1])
    freed = size * (count - 1)
    assert held - before > freed // 2, "the freed blocks were not resident to begin with"
    assert held - after > freed // 2


def test_trims_come_after_work_once_the_engine_is_idle(tiny):
    from llmkit.sampling import SamplingParams

    trim = memory.IdleTrim(lambda: tiny.engine)
    assert not trim.due()  # nothing ran yet
    tiny.generate("Paris", max_tokens=2, temperature=0)
    assert trim.due() and not trim.due()  # once per stretch of work
    entered, release = threading.Event(), threading.Event()

    def hold(generated, logits):
        entered.set()
        assert release.wait(300), "never released"
        return logits

    (held,) = tiny.requests([tiny.tokenizer.encode("Paris")], SamplingParams(max_tokens=3, logits_processors=[hold]))
    handle = tiny.submit(held)
    try:
        assert entered.wait(300)
        wait_until(lambda: tiny.engine.prompt_tokens_total != trim._seen[0], "the prompt counted", timeout=300)
        assert not trim.due()  # busy, and the last trim is recent
        trim._last -= memory.BUSY_TRIM_S
        assert trim.due()  # busy for that long: trimmed anyway
    finally:
        release.set()
    list(handle.events())
