"""The OpenAI-compatible server, tested with the official ``openai`` client against a real uvicorn
server on a free port, over a tiny random model (vocabulary 400, context 128)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import jsonschema
import openai
import pytest
import torch

import llmkit
from llmkit.server import ServerConfig, create_app

MODEL = "tiny"


# ------------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app):
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yield the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def poll(predicate, what: str, timeout: float = 30.0) -> None:
    """Wait until ``predicate()`` holds; a generous deadline, so that a busy machine cannot fail it."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def client(url: str, key: str = "none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(url + "/metrics").text
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{want} not in /metrics")


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return llmkit.load(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def url(tiny):
    app = create_app(tiny, config=ServerConfig(model_name=MODEL, max_batch=16, default_max_tokens=16))
    with running_server(app) as base:
        yield base


@pytest.fixture(scope="module")
def oai(url):
    return client(url)


class Slow(torch.nn.Module):
    """The tiny model, slowed to ``delay`` s per forward: a request then holds its slot long enough
    to test what happens meanwhile (queueing, disconnects)."""

    def __init__(self, inner, delay: float):
        super().__init__()
        self.inner, self.config, self.delay = inner, inner.config, delay

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def forward_many(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner.forward_many(*args, **kwargs)


@pytest.fixture(scope="module")
def slow(tiny):
    from llmkit.api import LLM

    return LLM(Slow(tiny.model, 0.02), tiny.tokenizer, name="slow")


def chat_ids(tiny, messages):
    return tiny.tokenizer.encode(tiny.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


USER = [{"role": "user", "content": "The quick brown fox"}]


# ------------------------------------------------------------------------------------------ routes


def test_models_health_ready_and_openapi(url, oai, tiny):
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == tiny.context_length
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/ready").status_code == 200
    doc = httpx.get(url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize",
                 "/health", "/ready", "/metrics"):
        assert path in doc["paths"], path
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    assert {"messages", "max_tokens", "temperature", "response_format", "stream", "logprobs"} <= set(schema["properties"])
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "<title>llmkit chat</title>" in page.text


def test_chat_completion_matches_the_library(oai, tiny):
    r = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0, user="u1")
    expected_ids = tiny.generate_ids(chat_ids(tiny, USER), max_tokens=12, temperature=0)
    assert r.choices[0].message.content == tiny.chat(USER, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.usage.prompt_tokens == len(chat_ids(tiny, USER))
    assert r.usage.completion_tokens == len(expected_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if len(expected_ids) == 12 else "stop")


def test_chat_stream_equals_the_whole_answer(oai):
    whole = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=20, temperature=0)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=20, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_plain_streamed_and_batched(oai, tiny):
    r = oai.completions.create(model=MODEL, prompt="Paris is the", max_tokens=10, temperature=0)
    assert r.choices[0].text == tiny.generate("Paris is the", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.usage.prompt_tokens == len(tiny.tokenizer.encode("Paris is the", True))
    pieces = list(oai.completions.create(model=MODEL, prompt="Paris is the", max_tokens=10, temperature=0,
                                         stream=True))
    assert "".join(p.choices[0].text for p in pieces) == r.choices[0].text
    assert pieces[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # a list of prompts: one choice each, in order; token ids work as prompts too
    prompts = ["Paris is the", "def add(a, b):"]
    many = oai.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == [
        tiny.generate(p, max_tokens=6, temperature=0) for p in prompts]
    ids = tiny.tokenizer.encode("Paris is the", add_special_tokens=True)
    by_ids = oai.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text


def test_n_choices_with_a_seed_are_distinct_and_reproducible(oai):
    kw = dict(model=MODEL, messages=USER, max_tokens=8, temperature=1.0, seed=7, n=3)
    a = oai.chat.completions.create(**kw)
    b = oai.chat.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    texts = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1
    counted = oai.chat.completions.create(**kw, logprobs=True)  # one logprob per generated token
    assert counted.usage.completion_tokens == sum(len(c.logprobs.content) for c in counted.choices)
    streamed = list(oai.chat.completions.create(**kw, stream=True))
    got = {}
    for chunk in streamed:
        for c in chunk.choices:
            got[c.index] = got.get(c.index, "") + (c.delta.content or "")
    assert [got[i] for i in range(3)] == texts


def test_chat_logprobs(oai, tiny):
    r = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0, logprobs=True,
                                    top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    ids = chat_ids(tiny, USER)
    generated = tiny.generate_ids(ids, max_tokens=8, temperature=0)
    logits = tiny.logits(ids + generated)
    for i, entry in enumerate(content):
        expected = torch.log_softmax(logits[len(ids) - 1 + i], -1)[generated[i]].item()
        assert entry.logprob == pytest.approx(expected, abs=1e-3)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy: the top one
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    streamed = list(oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=True))
    lps = [c.choices[0].logprobs.content[0].logprob for c in streamed if c.choices and c.choices[0].logprobs]
    assert lps == pytest.approx([e.logprob for e in content], abs=1e-6)


def test_completion_logprobs_and_echo_score_the_prompt(oai, tiny):
    prompt = "The quick brown fox jumps"
    ids = tiny.tokenizer.encode(prompt, add_special_tokens=True)
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text == tiny.tokenizer.decode(ids)
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.tokens) == len(ids)
    expected = torch.log_softmax(tiny.logits(ids), -1)
    for pos in range(1, len(ids)):
        assert choice.logprobs.token_logprobs[pos] == pytest.approx(expected[pos - 1, ids[pos]].item(), abs=1e-4)
        assert len(choice.logprobs.top_logprobs[pos]) <= 2
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    # echo with generation: the prompt's text, then the completion, logprobs for both
    g = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=5, echo=True, logprobs=1, temperature=0)
    plain = tiny.generate(prompt, max_tokens=5, temperature=0)
    assert g.choices[0].text == tiny.tokenizer.decode(ids) + plain
    assert len(g.choices[0].logprobs.tokens) == len(ids) + g.usage.completion_tokens


def test_stop_strings_and_logit_bias(oai, tiny):
    full = oai.completions.create(model=MODEL, prompt="Paris is the", max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) > 4
    stop = full[2:4]
    cut = oai.completions.create(model=MODEL, prompt="Paris is the", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    token = tiny.tokenizer.encode(" fox")[0]
    forced = oai.completions.create(model=MODEL, prompt="Paris", max_tokens=4, temperature=0,
                                    logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == tiny.tokenizer.decode([token] * 4)


def test_response_format_json_schema_output_validates(oai):
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["a", "b"]}}, "required": ["city", "ok", "size", "kind"], "additionalProperties": False}
    for seed in range(3):
        r = oai.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=60, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=100, temperature=0,
                                    response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    json.loads(r.choices[0].message.content)
    with pytest.raises(openai.BadRequestError) as err:  # a keyword the mask cannot enforce is refused
        oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}})
    assert err.value.body["param"] == "response_format"


def test_embeddings_match_the_library(url, oai, tiny):
    import numpy as np

    from llmkit.tasks import embed

    texts = ["The quick brown fox", "Paris is the capital of France."]
    got = oai.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in got.data] == [0, 1] and got.usage.prompt_tokens > 0
    vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
    assert np.allclose(vectors, embed(tiny, texts), atol=1e-5)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    one = oai.embeddings.create(model=MODEL, input="The quick brown fox")
    assert np.allclose(one.data[0].embedding, vectors[0], atol=1e-5)
    assert httpx.post(url + "/v1/embeddings", json={"input": ""}).status_code == 400
    assert httpx.post(url + "/v1/embeddings", json={"input": "word " * 500}).json()["error"]["code"] \
        == "context_length_exceeded"


def test_tokenize_and_detokenize(url, tiny):
    r = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": "Paris is the"}).json()
    assert r["tokens"] == tiny.tokenizer.encode("Paris is the", add_special_tokens=True)
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == tiny.context_length
    chat = httpx.post(url + "/tokenize", json={"messages": USER}).json()
    assert chat["tokens"] == chat_ids(tiny, USER)
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == \
        tiny.tokenizer.decode(r["tokens"])
    assert httpx.post(url + "/detokenize", json={"tokens": [10**6]}).status_code == 400


# ------------------------------------------------------------------------------------------ tools

# A chat template that knows tools, as Hermes/Qwen templates do (short: the tiny model's context is 128)
TOOLS_TEMPLATE = (
    "{% if tools %}<|tools|>{% for t in tools %}{{ t.function.name }};{% endfor %}{{ eos_token }}{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% for c in m.tool_calls or [] %}"
    "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PLACE = {"type": "function", "function": {"name": "find", "description": "Find a place.", "parameters": {
    "type": "object", "properties": {"at": {"type": "string", "maxLength": 3}, "n": {"type": "integer",
                                     "minimum": 0, "maximum": 9}}, "required": ["at", "n"],
    "additionalProperties": False}}}
FLAG = {"type": "function", "function": {"name": "flag", "parameters": {
    "type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}}}
TOOLS = [PLACE, FLAG]


def assert_valid_call(call, names=("find", "flag")):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), params)


@pytest.fixture(scope="module")
def tools_url(tiny):
    """The tiny model under a chat template that renders tools itself."""
    from llmkit.api import LLM
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer(tiny.tokenizer.backend, special_tokens=tiny.tokenizer.special_tokens, chat_template=TOOLS_TEMPLATE)
    app = create_app(LLM(tiny.model, tok, name="tiny-tools"), config=ServerConfig(model_name=MODEL))
    with running_server(app) as base:
        yield base


def test_a_forced_tool_call_always_parses_and_validates(tools_url):
    oai = client(tools_url)
    named = {"type": "function", "function": {"name": "find"}}
    for seed in range(3):  # a random model: only the mask makes these calls
        for choice, names in ((named, ("find",)), ("required", ("find", "flag"))):
            r = oai.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=choice,
                                            temperature=1.0, seed=seed)  # max_tokens: what the context leaves
            c = r.choices[0]
            assert c.finish_reason == "tool_calls" and c.message.content is None, c.message
            assert len(c.message.tool_calls) == 1
            assert_valid_call(c.message.tool_calls[0], names)
    # streamed: the same call (same seed, so the same tokens), as id and name, then the arguments
    kw = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", temperature=1.0, seed=5)
    whole = oai.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = [c for c in oai.chat.completions.create(**kw, stream=True) if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].index == 0 and deltas[0].id.startswith("call_") and deltas[0].function.name == whole.function.name
    assert "".join(d.function.arguments or "" for d in deltas) == whole.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    assert not any(c.choices[0].delta.content for c in chunks)
    # the legacy form: functions and function_call in, message.function_call out
    legacy = oai.chat.completions.create(model=MODEL, messages=USER, functions=[PLACE["function"]],
                                         function_call={"name": "find"}, temperature=1.0, seed=1)
    assert legacy.choices[0].finish_reason == "function_call"
    jsonschema.validate(json.loads(legacy.choices[0].message.function_call.arguments), PLACE["function"]["parameters"])


def test_tools_and_earlier_calls_render_through_the_chat_template(tools_url, tiny):
    turn = [{"role": "user", "content": "fox"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "find", "arguments": '{"at": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    ids = httpx.post(tools_url + "/tokenize", json={"messages": turn, "tools": TOOLS}).json()["tokens"]
    text = tiny.tokenizer.decode(ids)
    # the template got tools=, and the call's arguments as an object, as transformers passes them
    assert text.startswith("<|tools|>find;flag;</s><|user|>fox</s>")
    assert '<|assistant|><tool_call>{"name": "find", "arguments": {"at": "Rome"}}</tool_call></s>' in text
    assert text.endswith("<|tool|>sunny</s><|assistant|>")
    r = client(tools_url).chat.completions.create(model=MODEL, messages=turn, tools=TOOLS, max_tokens=2,
                                                  temperature=0)
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # tool_choice "none": no tools in the prompt, and the output is not read for calls
    none = client(tools_url).chat.completions.create(model=MODEL, messages=turn, tools=TOOLS, tool_choice="none",
                                                     max_tokens=2, temperature=0)
    assert none.usage.prompt_tokens == len(httpx.post(tools_url + "/tokenize", json={"messages": turn}).json()["tokens"])
    assert none.choices[0].message.tool_calls is None


def test_tool_calls_are_read_from_text_and_streamed_text_is_held_back_only_where_a_call_may_start():
    from llmkit.server import schemas, tools

    def plan(**kw):
        return tools.plan_for(schemas.ChatCompletionRequest.model_validate({"messages": USER, "tools": TOOLS, **kw}))

    text = ('Let me look.\n<tool_call>\n{"name": "find", "arguments": {"at": "Rome", "n": 1}}\n</tool_call>\n'
            '<tool_call>{"name": "flag", "arguments": {"on": true}}')  # the second left open at the end
    content, calls = tools.parse(text, plan())
    assert content == "Let me look." and [c["function"]["name"] for c in calls] == ["find", "flag"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"at": "Rome", "n": 1}
    assert len(tools.parse(text, plan(parallel_tool_calls=False))[1]) == 1
    for not_a_call in ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', "<tool_call>{broken",
                       "a < b, <tool_ x"):
        assert tools.parse(not_a_call, plan()) == (not_a_call, [])
    for whole in (text, "a < b, <tool_ x", "Plain text, <tool_call>{broken"):
        expected_content, expected_calls = tools.parse(whole, plan())
        splitter, sent = tools.StreamSplitter(plan()), ""
        for ch in whole:  # one character at a time: nothing that turns out to be a call goes out as content
            sent += splitter.feed(ch)
            assert (expected_content or "").startswith(sent)
        if "<tool_call>" not in whole:
            assert sent == whole
        rest, calls = splitter.finish()
        assert sent + rest == (expected_content or "")
        assert [c["function"] for c in calls] == [c["function"] for c in expected_calls]
    # held back: only what could begin a tag, and the space before it
    assert tools.StreamSplitter(plan()).feed("a < b, <tool_") == "a < b,"


def test_bad_tools_get_400s_that_name_the_param(url):
    post = lambda body: httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2, **body})
    forced = {"type": "function", "function": {"name": "find"}}
    cases = [
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has spaces"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}]}, "tools"),
        ({"tools": []}, "tools"),
        ({"tools": [PLACE, PLACE]}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": forced}, "tool_choice"),
        ({"tools": TOOLS, "functions": [PLACE["function"]]}, "functions"),
        ({"functions": [PLACE["function"]], "function_call": {"name": "other"}}, "function_call"),
        ({"tools": TOOLS, "tool_choice": forced, "response_format": {"type": "json_object"}}, "response_format"),
    ]
    for body, param in cases:
        assert_error(post(body), 400, param=param)
    # parameters the mask cannot enforce: refused when a call is forced, fine when the model chooses
    unique = {"type": "function", "function": {"name": "find", "parameters": {
        "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}}
    outside = {"type": "function", "function": {"name": "find", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}}}
    for tool in (unique, outside):
        err = assert_error(post({"tools": [tool], "tool_choice": "required"}), 400, "unsupported_schema", "tools")
        assert "find" in err["message"] or "uniqueItems" in err["message"]
    assert httpx.post(url + "/tokenize", json={"messages": USER, "tools": [unique]}).status_code == 200


# ------------------------------------------------------------------------------------------ errors


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def test_errors_surface_as_the_clients_exception_types(oai, tiny):
    long_prompt = "fox " * 200
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=MODEL, prompt=long_prompt, max_tokens=5)
    assert err.value.code == "context_length_exceeded"
    assert str(tiny.context_length) in err.value.message and "tokens" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # max_tokens past the context: refused, not truncated
        oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=500)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=2)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=USER, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=[], max_tokens=2)


def test_bad_input_gets_400s_never_500s(url):
    post = lambda body, **kw: httpx.post(url + "/v1/chat/completions", **({"json": body} if body is not None else kw))
    assert_error(post(None, content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json")
    assert_error(post(None, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    assert_error(post(None, content=b"\xff\xfe", headers={"content-type": "application/json"}), 400)
    bad = [
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12},
        {"messages": [{"role": "user", "content": "hi"}], "n": 10**6},
        {"messages": [{"role": "user", "content": "hi"}], "top_p": 7},
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 500, "logprobs": True},
        {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"abc": 1}},
        {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 1000}},
        {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999": 1}},
        {"messages": [{"role": "user", "content": "hi"}], "stop": [""]},
        {"messages": [{"role": "user", "content": "hi"}], "seed": "x"},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "yaml"}},
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}},
    ]
    for body in bad:
        assert_error(post(body), 400)
    err = assert_error(post({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}), 400)
    assert err["param"] == "temperature"
    comp = lambda body: httpx.post(url + "/v1/completions", json=body)
    for body in ({"prompt": []}, {"prompt": [10**7]}, {"prompt": "x", "max_tokens": 0}, {"prompt": "x", "suffix": "y"},
                 {"prompt": {"a": 1}}, {}):
        assert_error(comp(body), 400)
    assert_error(httpx.get(url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(url + "/v1/chat/completions"), 405)
    # an oversized body: 413, with and without Content-Length
    assert_error(httpx.post(url + "/v1/completions", content=b"x" * (9 * 1024 * 1024)), 413)
    assert_error(httpx.post(url + "/v1/completions", content=iter([b"x" * (1 << 20)] * 9)), 413)
    # and the server still answers
    assert httpx.post(url + "/v1/completions", json={"prompt": "Paris", "max_tokens": 2}).status_code == 200


# ------------------------------------------------------------------------------------------ auth, queue


def test_api_key(tiny):
    app = create_app(tiny, config=ServerConfig(model_name=MODEL, api_key="s3cret"))
    with running_server(app) as base:
        with pytest.raises(openai.AuthenticationError):
            client(base, key="wrong").chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
        assert_error(httpx.get(base + "/v1/models"), 401, "invalid_api_key")
        assert_error(httpx.get(base + "/metrics"), 401)
        assert_error(httpx.get(base + "/", headers={"accept": "text/html"}), 401)
        assert httpx.get(base + "/health").status_code == 200
        r = client(base, key="s3cret").chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
        assert r.choices[0].message.content is not None
        assert httpx.get(base + "/v1/models", headers={"X-Api-Key": "s3cret"}).status_code == 200
        assert httpx.get(base + "/", auth=("anyone", "s3cret")).status_code == 200  # the browser's login prompt


def test_a_full_queue_answers_429_with_retry_after(tiny, slow):
    app = create_app(slow, config=ServerConfig(model_name=MODEL, max_batch=1, max_queue=1))
    body = {"model": MODEL, "prompt": "Paris", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with running_server(app) as base:
        with httpx.Client(base_url=base, timeout=60) as h:
            with h.stream("POST", "/v1/completions", json=body) as running:  # takes the one slot
                lines = running.iter_lines()
                next(line for line in lines if line.startswith("data:"))
                with h.stream("POST", "/v1/completions", json=body) as waiting:  # waits
                    poll(lambda: metric(base, "llmkit:num_requests_waiting") == 1, "the second request to wait")
                    for _ in range(3):
                        refused = h.post("/v1/completions", json={**body, "stream": False})
                        err = assert_error(refused, 429, "queue_full")
                        assert int(refused.headers["retry-after"]) >= 1 and "retry" in err["message"]
                    with pytest.raises(openai.RateLimitError):
                        client(base).completions.create(model=MODEL, prompt="Paris", max_tokens=3)
                    waited = [json.loads(x[5:]) for x in waiting.iter_lines()
                              if x.startswith("data:") and x != "data: [DONE]"]
                    assert waited[-1]["choices"][0]["finish_reason"] == "length"
                done = [x for x in lines if x.startswith("data:")]
                assert done[-1] == "data: [DONE]"
            assert metric(base, "llmkit:request_rejected_total", reason="queue_full") == 4
            # nothing else broke
            ok = client(base).completions.create(model=MODEL, prompt="Paris", max_tokens=3, temperature=0)
            assert ok.choices[0].text == tiny.generate("Paris", max_tokens=3, temperature=0)


# ------------------------------------------------------------------------------------------ concurrency


def test_32_concurrent_streaming_clients_are_interleaved_and_exact(url, oai, tiny):
    words = ["fox", "Paris", "def add", "Numbers", "Caf\u00e9", "The lazy dog", "capital of", "tokens"]
    prompts = [f"{words[i % 8]} {i}" for i in range(32)]
    alone = {}
    for p in prompts:  # each answer alone, one request at a time
        r = oai.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0,
                                   extra_body={"ignore_eos": True})
        alone[p] = r.choices[0].text

    async def one(c: openai.AsyncOpenAI, prompt: str):
        times, text = [], []
        stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
                text.append(chunk.choices[0].text)
        return "".join(text), times

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120,
                                      http_client=openai.DefaultAsyncHttpxClient(
                                          limits=httpx.Limits(max_connections=64))) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    before = metric(url, "llmkit:request_success_total", finished_reason="length")
    results = asyncio.run(all_at_once())
    for p, (text, times) in zip(prompts, results):
        assert text == alone[p], p
    # interleaved: while one stream was producing tokens, many others were too
    spans = [(t[0], t[-1]) for _, t in results]
    overlapping = max(sum(1 for s, e in spans if s <= (s0 + e0) / 2 <= e) for s0, e0 in spans)
    assert overlapping >= 8, spans
    assert metric(url, "llmkit:request_success_total", finished_reason="length") == before + 32
    assert metric(url, "llmkit:num_requests_running") == 0
    assert metric(url, "llmkit:num_requests_waiting") == 0


def test_metrics_are_prometheus_with_vllm_names(url, oai, tiny):
    oai.completions.create(model=MODEL, prompt="Paris", max_tokens=4, temperature=0)
    text = httpx.get(url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_sum", "prompt_tokens_total",
                 "generation_tokens_total", "request_success_total"):
        assert f"llmkit:{name}" in text, name
    assert metric(url, "llmkit:time_to_first_token_seconds_count") >= 1
    assert metric(url, "llmkit:generation_tokens_total") >= 4
    # the running requests' key/value cache, kept while idle for the next ones
    k = tiny.engine.executor.cache.k
    assert metric(url, "llmkit:kv_cache_bytes") == 2 * k.numel() * k.element_size() > 0


def test_readiness_is_503_while_the_model_loads(tiny):
    gate = threading.Event()

    def loader():
        gate.wait(20)
        return tiny

    app = create_app(config=ServerConfig(model_name=MODEL), loader=loader)
    with running_server(app) as base:
        assert httpx.get(base + "/health").status_code == 200
        assert_error(httpx.get(base + "/ready"), 503, "model_loading")
        r = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert_error(r, 503, "model_loading")
        assert "retry-after" in r.headers
        gate.set()
        deadline = time.monotonic() + 10
        while httpx.get(base + "/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # built off the event loop while loading, before anyone asks for it
        assert app.openapi_schema is not None
        assert httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_the_openapi_document_is_built_at_startup(tiny):
    app = create_app(tiny, config=ServerConfig(model_name=MODEL))
    assert app.openapi_schema is None
    with running_server(app):
        assert app.openapi_schema is not None and "/v1/chat/completions" in app.openapi_schema["paths"]


def test_a_client_that_disconnects_frees_its_slot_at_once(slow):
    app = create_app(slow, config=ServerConfig(model_name=MODEL, max_batch=2))
    body = {"model": MODEL, "prompt": "Paris", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    with running_server(app) as base:
        for stream in (True, False):
            with httpx.Client(base_url=base, timeout=60) as h:
                if stream:
                    with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        lines = r.iter_lines()  # (dropping this iterator would close the response)
                        assert next(lines).startswith("data:")
                        assert metric(base, "llmkit:num_requests_running") == 1
                else:
                    with pytest.raises(httpx.ReadTimeout):
                        h.post("/v1/completions", json=body, timeout=0.3)
            poll(lambda: metric(base, "llmkit:num_requests_running") == 0, "the slot to be freed")
        assert metric(base, "llmkit:request_success_total", finished_reason="abort") == 2
        assert metric(base, "llmkit:generation_tokens_total") < 100
        assert slow.engine.num_running == 0  # the LLM's own engine, which the server runs on, is idle again


def test_plugin_middleware_and_routes(tiny):
    from types import SimpleNamespace

    from llmkit import plugins
    from llmkit.errors import LLMKitError

    class Shout:
        def on_request(self, body):
            if "darn" in json.dumps(body):
                raise LLMKitError("Please keep it polite.")
            return {**body, "prompt": body["prompt"].replace("SECRET", "Paris")} if "prompt" in body else body

        def on_response(self, body):
            choices = [{**c, "text": c["text"].upper()} if "text" in c else c for c in body.get("choices", [])]
            return {**body, "choices": choices}

    class Plugin:
        @plugins.hookimpl
        def register_middleware(self, register):
            register("shout", Shout())

        @plugins.hookimpl
        def register_routes(self, register):
            register("echo", SimpleNamespace(method="POST", path="/v1/echo", handler=lambda body: {"got": body}))
            register("shadow", SimpleNamespace(method="GET", path="/health", handler=lambda body: {"status": "hijacked"}))

    plugins.reset()
    plugins.manager().register(Plugin(), name="test-server-plugin")
    try:
        app = create_app(tiny, config=ServerConfig(model_name=MODEL))
    finally:
        plugins.reset()
    with running_server(app) as base:
        oai = client(base)
        r = oai.completions.create(model=MODEL, prompt="SECRET is the", max_tokens=6, temperature=0)
        assert r.choices[0].text == tiny.generate("Paris is the", max_tokens=6, temperature=0).upper()
        streamed = list(oai.completions.create(model=MODEL, prompt="SECRET is the", max_tokens=6, temperature=0,
                                               stream=True))
        assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "darn"}], max_tokens=2)
        assert "polite" in err.value.message
        assert httpx.post(base + "/v1/echo", json={"a": 1}).json() == {"got": {"a": 1}}
        assert httpx.get(base + "/health").json() == {"status": "ok"}  # built-in routes win
        # tokenize is not a generation request: middleware does not touch it
        ids = httpx.post(base + "/tokenize", json={"prompt": "SECRET"}).json()["tokens"]
        assert ids == tiny.tokenizer.encode("SECRET", add_special_tokens=True)


def test_the_request_time_limit_cancels_and_answers_504(slow):
    app = create_app(slow, config=ServerConfig(model_name=MODEL, request_timeout=0.4))
    body = {"model": MODEL, "prompt": "Paris", "max_tokens": 100, "ignore_eos": True}
    with running_server(app) as base:
        assert_error(httpx.post(base + "/v1/completions", json=body), 504, "timeout")
        with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}) as r:
            events = [x[5:].strip() for x in r.iter_lines() if x.startswith("data:")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
        poll(lambda: metric(base, "llmkit:num_requests_running") == 0, "the slots to be freed")
        assert metric(base, "llmkit:request_success_total", finished_reason="abort") == 2


def test_serving_runs_the_same_default_as_load():
    from llmkit.server import serving_executor

    assert serving_executor("llama.cpp", None) == ("llama.cpp", None)
    assert serving_executor("auto", "float32") == ("auto", "float32")
    assert serving_executor("auto", None) == ("auto", None)  # what llmkit.load picks by itself

def test_engine_events_cross_into_the_event_loop_in_batches():
    # Events that the engine thread hands over while the loop is busy reach every run complete
    # and in order, with one wake-up of the loop for all of them (not one per event).
    from llmkit.server.running import Inbox

    class Counting(Inbox):
        drains = 0

        def _drain(self):
            self.drains += 1
            super()._drain()

    class Receiver:  # what Inbox hands events on to: Run._arrive's signature
        def __init__(self):
            self.got = []

        def _arrive(self, i, event, at):
            self.got.append((i, event))

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        inbox, busy, release = Counting(loop), threading.Event(), threading.Event()
        loop.call_soon_threadsafe(lambda: (busy.set(), release.wait(30)))  # the loop is busy elsewhere
        assert busy.wait(30)
        runs = [Receiver() for _ in range(16)]
        for step in range(20):  # from this thread, as from the engine's: 20 steps of 16 streams
            for run in runs:
                inbox.deliver(run, step % 2, step)
        release.set()
        poll(lambda: all(len(r.got) == 20 for r in runs), "every event to arrive")
        assert all(r.got == [(s % 2, s) for s in range(20)] for r in runs)
        assert inbox.drains == 1
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
