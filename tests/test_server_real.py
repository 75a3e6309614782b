"""The server over the real default model (SmolLM2-135M-Instruct): a real answer, JSON-schema output,
the chat page in headless Chromium, and `llmkit serve` draining requests in flight on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

from test_server import client, free_port, running_server

from llmkit.server import ServerConfig, create_app

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def url(smollm2):
    app = create_app(smollm2, config=ServerConfig(model_name="smollm2-135m-instruct", default_max_tokens=64))
    with running_server(app) as base:
        yield base


def test_a_real_answer_equals_the_librarys(url, smollm2):
    r = client(url).chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=20,
                                            temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.content == smollm2.chat(QUESTION, max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason == "stop"


def test_json_schema_output_from_the_real_model_validates(url):
    schema = {"type": "object", "properties": {"country": {"type": "string", "maxLength": 30},
                                               "capital": {"type": "string", "maxLength": 30},
                                               "is_capital": {"type": "boolean"}},
              "required": ["country", "capital", "is_capital"], "additionalProperties": False}
    r = client(url).chat.completions.create(
        model="smollm2-135m-instruct", max_tokens=80, temperature=0,
        messages=[{"role": "user", "content": "Describe France's capital as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, schema)
    assert r.choices[0].finish_reason == "stop"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time now in a timezone.",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
                   "required": ["timezone"]}}}
WEATHER_Q = [{"role": "user", "content": "What's the weather like in Paris?"}]


def valid_call(name: str, arguments: str) -> dict:
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}[name]
    value = json.loads(arguments)
    jsonschema.validate(value, schema)
    return value


def test_the_real_model_calls_a_tool_when_it_must(url):
    oai = client(url)
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = oai.chat.completions.create(model="smollm2-135m-instruct", messages=WEATHER_Q, tools=[WEATHER, CLOCK],
                                        tool_choice=choice, temperature=0, max_tokens=60)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        # the mask makes the call well-formed; the model fills it in sensibly
        assert call.function.name == "get_weather"
        assert valid_call(call.function.name, call.function.arguments)["city"] == "Paris"


def test_the_real_model_answers_a_tool_result(url, smollm2):
    turn = WEATHER_Q + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    # SmolLM2's template knows nothing of tools: llmkit describes them in the system prompt and writes
    # the earlier call and its result as text
    ids = httpx.post(url + "/tokenize", json={"messages": turn, "tools": [WEATHER, CLOCK]}).json()["tokens"]
    prompt = smollm2.tokenizer.decode(ids)
    assert prompt.startswith("<|im_start|>system\nYou can call functions") and '"name": "get_time"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' \
        in prompt
    assert prompt.endswith('<|im_start|>user\n<tool_response>\n{"temperature": 21, "sky": "sunny"}\n'
                           "</tool_response><|im_end|>\n<|im_start|>assistant\n")
    kw = dict(model="smollm2-135m-instruct", messages=turn, tools=[WEATHER, CLOCK], temperature=0, max_tokens=24)
    whole = client(url).chat.completions.create(**kw)
    assert whole.usage.prompt_tokens == len(ids) and whole.choices[0].message.content
    # streamed with tools on "auto" (text is held back only where a call may begin): the same answer
    chunks = [c for c in client(url).chat.completions.create(**kw, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (whole.choices[0].message.content or "")
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_the_chat_page_streams_an_answer_in_a_browser(url, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(url + "/")
            expect(page.locator("#status")).to_have_text("ready", timeout=10_000)
            expect(page.locator("#model")).to_contain_text("smollm2-135m-instruct")
            page.locator("#temperature").fill("0")
            page.locator("#max-tokens").fill("40")
            page.locator("#input").fill("What is the capital of France?")
            page.locator("#input").press("Enter")
            answer = page.locator(".msg.assistant").first
            # streamed: the answer shows tokens while it is still being generated
            expect(answer).to_have_class("msg assistant streaming", timeout=10_000)
            expect(answer.locator(".tok").first).to_be_visible(timeout=20_000)
            partial = answer.locator(".content").inner_text()
            expect(answer.locator(".meta")).to_be_visible(timeout=60_000)
            final = answer.locator(".content").inner_text()
            assert "Paris" in final and len(final) >= len(partial)
            assert page.locator(".msg.user").inner_text() == "What is the capital of France?"
            # each token's probability shows on hover
            answer.locator(".tok").nth(3).hover()
            expect(page.locator("#tip")).to_be_visible()
            assert "p = " in page.locator("#tip").inner_text()
            shot = tmp_path / "chat-page.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            page.mouse.move(5, 5)
            expect(page.locator("#tip")).to_be_hidden()
            # the conversation is kept: a second turn sends both
            page.locator("#input").fill("And of Germany?")
            page.locator("#input").press("Enter")
            expect(page.locator(".msg.assistant .meta")).to_have_count(2, timeout=60_000)
            assert page.locator(".msg.user").count() == 2
            page.screenshot(path=str(tmp_path / "chat-page-2.png"))
            print(f"screenshots in {tmp_path}")
        finally:
            browser.close()


def test_serve_drains_requests_in_flight_on_sigterm(smollm2_gguf, tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMKIT_PLUGINS": ""}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "llmkit.cli", "serve", "-m", str(smollm2_gguf), "--port", str(port),
                             "--drain-timeout", "30", "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if httpx.get(base + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        result: dict = {}
        first = threading.Event()

        def stream():
            body = {"messages": QUESTION, "max_tokens": 30, "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
                lines = []
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        lines.append(line[5:].strip())
                        first.set()
                result["lines"] = lines

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no new connections once draining
            httpx.get(base + "/ready", timeout=2)
        reader.join(60)
        lines = result["lines"]
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(x) for x in lines[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == 30  # the request in flight finished in full
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        # uvicorn re-raises the signal once drained, so the exit status says "ended by SIGTERM"
        assert proc.wait(30) in (0, -signal.SIGTERM)
        log.seek(0)
        assert "Traceback" not in log.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_serve_refuses_an_unknown_model_before_binding():
    r = subprocess.run([sys.executable, "-m", "llmkit.cli", "serve", "-m", "/no/such/model.gguf", "--port",
                        str(free_port())], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and "error:" in r.stderr and "Traceback" not in r.stderr
