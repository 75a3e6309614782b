"""Anthropic's Messages API on the server, driven by the official ``anthropic`` client against a real
uvicorn server on a free port, over a tiny random model (vocabulary 400, context 512)."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest
from test_server import MODEL, TOOLS_TEMPLATE, metric, running_server

import llmkit
from llmkit.server import ServerConfig, create_app

FIND = {"name": "find", "description": "Find a place.", "input_schema": {
    "type": "object", "properties": {"at": {"type": "string", "maxLength": 3}, "n": {"type": "integer",
                                     "minimum": 0, "maximum": 9}}, "required": ["at", "n"],
    "additionalProperties": False}}
FLAG = {"name": "flag", "input_schema": {"type": "object", "properties": {"on": {"type": "boolean"}},
                                         "required": ["on"]}}
TOOLS = [FIND, FLAG]
SCHEMAS = {t["name"]: t["input_schema"] for t in TOOLS}
USER = [{"role": "user", "content": "The quick brown fox"}]
T0 = {"temperature": 0}  # sampling settings beyond what the SDK names go in the body as they are
TURNS = [{"role": "user", "content": "fox"}, {"role": "assistant", "content": "Paris"},
         {"role": "user", "content": [{"type": "text", "text": "capital"}]}]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny random llama with a 512-token context (room for a tool call and its result), under a
    chat template that renders tools itself, with the prefix cache on."""
    import shutil

    import torch
    import transformers as tf

    from llmkit.api import LLM
    from llmkit.tokenizer import Tokenizer

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=400, bos_token_id=1, eos_token_id=2, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=512)
    folder = tmp_path_factory.mktemp("tiny-messages")
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    base = llmkit.load(folder)
    tok = Tokenizer(base.tokenizer.backend, special_tokens=base.tokenizer.special_tokens,
                    chat_template=TOOLS_TEMPLATE)
    return LLM(base.model, tok, name="tiny-messages", prefix_cache=True)


@pytest.fixture(scope="module")
def url(tiny):
    app = create_app(tiny, config=ServerConfig(model_name=MODEL, default_max_tokens=16))
    with running_server(app) as base:
        yield base


def client(url: str, key: str = "none", **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=60, **kw)


@pytest.fixture(scope="module")
def claude(url):
    return client(url)


def prompt_ids(tiny, chat: list[dict], tools: list[dict] | None = None, **kw) -> list[int]:
    """The templated prompt of an OpenAI-shaped conversation, as the tokenizer counts it."""
    functions = [{"type": "function", "function": {"name": t["name"], "description": t.get("description"),
                                                   "parameters": t["input_schema"]}} for t in tools or []]
    text = tiny.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tools=functions or None, **kw)
    return tiny.tokenizer.encode(text)


def blocks(content) -> list[tuple]:
    """Content blocks as plain values (the stream's final message holds its own block classes)."""
    return [(b.type, getattr(b, "text", None), getattr(b, "input", None), getattr(b, "thinking", None))
            for b in content]


def assert_anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind and body["error"]["message"], body
    return body["error"]["message"]


# ------------------------------------------------------------------------------------------ messages


def test_create_matches_the_library(claude, tiny):
    r = claude.messages.create(model=MODEL, max_tokens=12, extra_body=T0, system="Be brief.", messages=TURNS,
                               metadata={"user_id": "u1"})
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "fox"},
            {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "capital"}]
    ids = prompt_ids(tiny, chat)
    expected = tiny.generate_ids(ids, max_tokens=12, temperature=0)
    assert r.id.startswith("msg_") and r.type == "message" and r.role == "assistant" and r.model == MODEL
    text = tiny.chat(chat, max_tokens=12, temperature=0)
    assert [b.type for b in r.content] == (["text"] if text else [])
    assert "".join(b.text for b in r.content) == text
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == len(ids)
    assert r.usage.output_tokens == len(expected)
    assert r.stop_reason == ("max_tokens" if len(expected) == 12 else "end_turn") and r.stop_sequence is None
    # system as text blocks: the same prompt
    again = claude.messages.create(model=MODEL, max_tokens=12, extra_body=T0, messages=TURNS,
                                    system=[{"type": "text", "text": "Be brief."}])
    assert blocks(again.content) == blocks(r.content)


def test_a_repeated_prompt_reads_the_prefix_cache(claude, tiny):
    system = "Language models predict the next token from the ones before it. " * 3  # over one cache block
    kw = dict(model=MODEL, max_tokens=4, extra_body=T0, system=system, messages=[{"role": "user", "content": "Hi"}])
    total = claude.messages.count_tokens(model=MODEL, system=system, messages=kw["messages"]).input_tokens
    assert total > tiny.engine.prefix_cache.block
    first = claude.messages.create(**kw)
    again = claude.messages.create(**kw)
    assert first.usage.input_tokens == total and first.usage.cache_read_input_tokens == 0
    assert again.usage.cache_read_input_tokens > 0
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == total


def test_stream_sends_anthropics_event_sequence_and_the_same_message(claude, url):
    kw = dict(model=MODEL, max_tokens=20, extra_body=T0, messages=USER)
    whole = claude.messages.create(**kw)
    assert whole.content and whole.content[0].text  # a random model: something to stream
    with claude.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    raw = [e.type for e in events if e.type in ("message_start", "content_block_start", "content_block_delta",
                                                "content_block_stop", "message_delta", "message_stop")]
    deltas = raw.count("content_block_delta")
    assert raw == ["message_start", "content_block_start", *["content_block_delta"] * deltas,
                   "content_block_stop", "message_delta", "message_stop"] and deltas >= 1
    assert blocks(final.content) == blocks(whole.content) and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    assert "".join(e.text for e in events if e.type == "text") == whole.content[0].text
    # on the wire: each event named as its data's type, a ping after the first block opens
    raw_body = {"model": MODEL, "max_tokens": 20, "messages": USER, **T0, "stream": True}
    with httpx.stream("POST", url + "/v1/messages", json=raw_body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    names = [line[len("event: "):] for line in lines[0::2]]
    datas = [json.loads(line[len("data: "):]) for line in lines[1::2]]
    assert names == [d["type"] for d in datas]
    assert names[:3] == ["message_start", "content_block_start", "ping"] and names[-2:] == ["message_delta",
                                                                                            "message_stop"]
    start = datas[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert datas[1]["content_block"] == {"type": "text", "text": ""}
    assert all(d["delta"]["type"] == "text_delta" for d in datas if d["type"] == "content_block_delta")


def test_stop_sequences(claude):
    kw = dict(model=MODEL, max_tokens=20, extra_body=T0, messages=USER)
    full = claude.messages.create(**kw).content[0].text
    assert len(full) > 4
    stop = full[2:4]
    cut = claude.messages.create(**kw, stop_sequences=["zzzz-never", stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert "".join(b.text for b in cut.content) == full[: full.index(stop)]
    with claude.messages.stream(**kw, stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop
    assert blocks(final.content) == blocks(cut.content)
    # a stop sequence that never comes: the answer ends as it would without it
    free = claude.messages.create(**kw, stop_sequences=["zzzz-never"])
    assert free.stop_reason in ("end_turn", "max_tokens") and free.stop_sequence is None


def test_a_final_assistant_turn_is_continued(claude, tiny, url):
    prefill = [*USER, {"role": "assistant", "content": "Paris is"}]
    r = claude.messages.create(model=MODEL, max_tokens=8, messages=prefill, extra_body=T0)
    text = tiny.tokenizer.apply_chat_template(prefill, continue_final_message=True)
    assert text.endswith("Paris is")  # the turn left open, no end-of-turn after it
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == len(tiny.tokenizer.encode(text))
    # the same as the chat route's continue_final_message
    chat = httpx.post(url + "/v1/chat/completions", json={"messages": prefill, "max_tokens": 8, "temperature": 0,
                                                          "add_generation_prompt": False,
                                                          "continue_final_message": True}).json()
    assert "".join(b.text for b in r.content) == chat["choices"][0]["message"]["content"]
    assert r.usage.output_tokens == chat["usage"]["completion_tokens"]


def test_output_config_format_makes_json_that_matches_the_schema(claude):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 4},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["city", "n"], "additionalProperties": False}
    kw = dict(model=MODEL, max_tokens=80, messages=USER, output_config={"format": {"type": "json_schema",
                                                                                   "schema": schema}})
    for seed in range(2):  # a random model: only the mask makes this JSON
        r = claude.messages.create(**kw, extra_body={"temperature": 1.0, "seed": seed})
        assert r.stop_reason == "end_turn", r
        jsonschema.validate(json.loads(r.content[0].text), schema)
    with claude.messages.stream(**kw, extra_body={"temperature": 1.0, "seed": 1}) as stream:
        assert blocks(stream.get_final_message().content) == blocks(r.content)


# ------------------------------------------------------------------------------------------ tools


def assert_valid_use(block, names=("find", "flag")):
    assert block.type == "tool_use" and block.id.startswith("toolu_") and block.name in names
    jsonschema.validate(block.input, SCHEMAS[block.name])


def test_a_forced_tool_use_is_valid_streamed_or_not(claude):
    for seed in range(3):  # a random model: only the mask makes these calls
        for choice, names in (({"type": "tool", "name": "find"}, ("find",)), ({"type": "any"}, ("find", "flag"))):
            r = claude.messages.create(model=MODEL, max_tokens=80, messages=USER, tools=TOOLS, tool_choice=choice,
                                       extra_body={"temperature": 1.0, "seed": seed})
            assert r.stop_reason == "tool_use", r
            assert [b.type for b in r.content] == ["tool_use"]
            assert_valid_use(r.content[0], names)
    kw = dict(model=MODEL, max_tokens=80, messages=USER, tools=TOOLS, tool_choice={"type": "any"},
              extra_body={"temperature": 1.0, "seed": 5})
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].name == whole.content[0].name
    assert final.content[0].input == whole.content[0].input
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [b.type for b in starts] == ["tool_use"] and starts[0].input == {}
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta")
    assert json.loads(partial) == whole.content[0].input


def test_a_tool_result_goes_back_to_the_model(claude, tiny):
    first = claude.messages.create(model=MODEL, max_tokens=80, messages=USER, tools=[FLAG],
                                   tool_choice={"type": "tool", "name": "flag"}, extra_body=T0)
    use = first.content[0]
    assert_valid_use(use, ("flag",))
    for result, rendered in (("sunny", "sunny"), ([{"type": "text", "text": "no such"}], "no such")):
        turn = [*USER, {"role": "assistant", "content": first.content},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": result,
                                              "is_error": result != "sunny"}]}]
        answer = claude.messages.create(model=MODEL, max_tokens=4, messages=turn, tools=[FLAG], extra_body=T0)
        assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
        # the call and its result reached the chat template as the chat route passes them
        chat = [*USER, {"role": "assistant", "content": None, "tool_calls": [
            {"id": use.id, "type": "function", "function": {"name": "flag", "arguments": use.input}}]},
            {"role": "tool", "tool_call_id": use.id, "content": ("" if result == "sunny" else "Error: ") + rendered}]
        counted = claude.messages.count_tokens(model=MODEL, messages=turn, tools=[FLAG]).input_tokens
        assert counted == len(prompt_ids(tiny, chat, [FLAG]))
        assert answer.usage.input_tokens + answer.usage.cache_read_input_tokens == counted
    # tool_choice none: no tools in the prompt, and the answer is not read for calls
    none = claude.messages.create(model=MODEL, max_tokens=4, messages=USER, tools=TOOLS, tool_choice={"type": "none"},
                                  extra_body=T0)
    assert none.usage.input_tokens + none.usage.cache_read_input_tokens == len(prompt_ids(tiny, USER))
    assert all(b.type == "text" for b in none.content) and none.stop_reason != "tool_use"


def test_a_conversation_becomes_the_chat_requests_messages():
    from llmkit.server import anthropic as wire

    req = wire.AnthropicMessagesRequest.model_validate({
        "model": MODEL, "max_tokens": 8, "system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
        "tools": [FLAG], "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": ""},
                                              {"type": "text", "text": "Let me see."},
                                              {"type": "tool_use", "id": "toolu_1", "name": "flag",
                                               "input": {"on": True}},
                                              {"type": "tool_use", "id": "toolu_2", "name": "flag", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "done"},
                                         {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                                          "content": [{"type": "text", "text": "no"}, {"type": "text", "text": "way"}]},
                                         {"type": "text", "text": "next?"}]}]})
    chat = wire.chat_request(req)
    got = [m.model_dump(exclude_none=True) for m in chat.messages]
    assert got == [
        {"role": "system", "content": "A\nB"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Let me see.", "reasoning_content": "hm", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "flag", "arguments": '{"on": true}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "flag", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "done"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no\nway"},
        {"role": "user", "content": "next?"}]
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False and chat.max_tokens == 8
    assert chat.tools[0].function.parameters == FLAG["input_schema"]
    choice = wire.AnthropicToolChoice(type="tool", name="flag")
    named = wire.chat_request(req.model_copy(update={"tool_choice": choice}))
    assert named.tool_choice.function.name == "flag" and named.parallel_tool_calls is None


# ------------------------------------------------------------------------------------------ count_tokens


def test_count_tokens_is_the_templated_prompts_length(claude, tiny):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "fox"},
            {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "capital"}]
    r = claude.messages.count_tokens(model=MODEL, system="Be brief.", messages=TURNS)
    assert r.input_tokens == len(prompt_ids(tiny, chat))
    with_tools = claude.messages.count_tokens(model=MODEL, messages=USER, tools=TOOLS)
    assert with_tools.input_tokens == len(prompt_ids(tiny, USER, TOOLS)) > len(prompt_ids(tiny, USER))


# ------------------------------------------------------------------------------------------ keys, errors, the rest


def test_the_api_key_as_x_api_key(tiny):
    app = create_app(tiny, config=ServerConfig(model_name=MODEL, api_key="s3cret"))
    with running_server(app) as base:
        r = client(base, key="s3cret").messages.create(model=MODEL, max_tokens=2, messages=USER,
                                                       extra_headers={"anthropic-beta": "anything-2025"})
        assert r.type == "message"
        assert client(base, key="s3cret").messages.count_tokens(model=MODEL, messages=USER).input_tokens > 0
        with pytest.raises(anthropic.AuthenticationError) as err:
            client(base, key="wrong").messages.create(model=MODEL, max_tokens=2, messages=USER)
        assert err.value.type == "authentication_error" and "wrong" in err.value.api_message
        assert_anthropic_error(httpx.post(base + "/v1/messages", json={"model": MODEL, "max_tokens": 2,
                                                                       "messages": USER}), 401, "authentication_error")
        # a bearer token (the SDK's auth_token) passes too
        bearer = anthropic.Anthropic(base_url=base, auth_token="s3cret", max_retries=0, timeout=60)
        assert bearer.messages.create(model=MODEL, max_tokens=2, messages=USER).type == "message"


def test_bad_input_gets_anthropic_shaped_errors(claude, url):
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=MODEL, max_tokens=2, messages=USER, extra_body={"temperature": 2})
    assert err.value.type == "invalid_request_error" and "temperature" in err.value.api_message
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=MODEL, max_tokens=2, messages=USER, tools=TOOLS,
                               tool_choice={"type": "tool", "name": "nope"})
    assert "nope" in err.value.api_message
    with pytest.raises(anthropic.BadRequestError) as err:  # max_tokens past the context: refused
        claude.messages.create(model=MODEL, max_tokens=5000, messages=USER)
    assert "context" in err.value.api_message
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.create(model="claude-unknown", max_tokens=2, messages=USER)
    assert err.value.type == "not_found_error"
    post = lambda body, path="/v1/messages": httpx.post(url + path, json=body)
    ok = {"model": MODEL, "max_tokens": 2, "messages": USER}
    bad = [
        {"model": MODEL, "messages": USER},  # max_tokens is required
        {**ok, "max_tokens": 0},
        {**ok, "messages": []},
        {**ok, "messages": [{"role": "system", "content": "hi"}]},
        {**ok, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}]},
        {**ok, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
        {**ok, "stop_sequences": [""]},
        {**ok, "top_k": -1},
        {**ok, "tools": [{"name": "web_search", "type": "web_search_20250305", "input_schema": {}}]},
        {**ok, "tools": [{"name": "bad name!", "input_schema": {"type": "object"}}]},
        {**ok, "tool_choice": {"type": "any"}},  # no tools to call
        {**ok, "thinking": {"type": "enabled", "budget_tokens": 5}},  # not less than max_tokens
        {**ok, "system": [{"type": "image"}]},
    ]
    for body in bad:
        assert_anthropic_error(post(body), 400, "invalid_request_error")
    assert_anthropic_error(post({"messages": USER}, "/v1/messages/count_tokens"), 400, "invalid_request_error")
    message = assert_anthropic_error(httpx.post(url + "/v1/messages", content=b"{not json",
                                                headers={"content-type": "application/json"}), 400,
                                     "invalid_request_error")
    assert "JSON" in message
    assert_anthropic_error(httpx.get(url + "/v1/messages"), 405, "invalid_request_error")
    assert_anthropic_error(httpx.get(url + "/v1/messages/batches"), 404, "not_found_error")
    assert_anthropic_error(httpx.post(url + "/v1/messages", content=b"x" * (9 * 1024 * 1024)), 413,
                           "invalid_request_error")
    # the OpenAI routes keep OpenAI's shape
    assert set(httpx.post(url + "/v1/chat/completions", json={"messages": []}).json()["error"]) == \
        {"message", "type", "param", "code"}
    assert post(ok).status_code == 200


def test_the_time_limit_is_a_timeout_error_whole_or_streamed(tiny):
    from test_server import Slow

    from llmkit.api import LLM

    slow = LLM(Slow(tiny.model, 0.02), tiny.tokenizer, name="slow")
    app = create_app(slow, config=ServerConfig(model_name=MODEL, request_timeout=0.4))
    kw = dict(model=MODEL, max_tokens=200, messages=USER, extra_body={"ignore_eos": True})
    with running_server(app) as base:
        claude = client(base)
        with pytest.raises(anthropic.InternalServerError) as err:
            claude.messages.create(**kw)
        assert err.value.status_code == 504 and err.value.type == "timeout_error"
        with pytest.raises(anthropic.APIStatusError) as err:  # the error event ends the stream
            with claude.messages.stream(**kw) as stream:
                for _ in stream:
                    pass
        assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "timeout_error"


def test_routes_are_documented_and_counted(claude, url):
    doc = httpx.get(url + "/openapi.json").json()
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        schema = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
        assert {"model", "messages", "system", "tools"} <= set(schema["properties"])
    assert "max_tokens" in doc["components"]["schemas"]["AnthropicMessagesRequest"]["required"]
    before = metric(url, "llmkit:generation_tokens_total")
    done = metric(url, "llmkit:request_success_total", finished_reason="length")
    r = claude.messages.create(model=MODEL, max_tokens=3, messages=USER,
                               extra_body={"temperature": 0, "ignore_eos": True})
    assert r.usage.output_tokens == 3 and r.stop_reason == "max_tokens"
    assert metric(url, "llmkit:generation_tokens_total") == before + 3
    assert metric(url, "llmkit:request_success_total", finished_reason="length") == done + 1


def test_plugin_middleware_sees_messages(tiny):
    from llmkit import plugins
    from llmkit.errors import LLMKitError

    class Shout:
        def on_request(self, body):
            if "darn" in json.dumps(body):
                raise LLMKitError("Please keep it polite.")
            return body

        def on_response(self, body):
            choices = [{**c, "message": {**c["message"], "content": (c["message"]["content"] or "").upper()}}
                       if "message" in c else {**c, "delta": {**c["delta"], "content": (c["delta"].get("content")
                                                                                        or "").upper()}}
                       for c in body.get("choices", [])]
            return {**body, "choices": choices}

    class Plugin:
        @plugins.hookimpl
        def register_middleware(self, register):
            register("shout", Shout())

    plugins.reset()
    plugins.manager().register(Plugin(), name="test-messages-plugin")
    try:
        app = create_app(tiny, config=ServerConfig(model_name=MODEL))
    finally:
        plugins.reset()
    with running_server(app) as base:
        claude = client(base)
        kw = dict(model=MODEL, max_tokens=12, extra_body=T0, messages=USER)
        expected = tiny.chat([{"role": "user", "content": USER[0]["content"]}], max_tokens=12, temperature=0)
        r = claude.messages.create(**kw)
        assert "".join(b.text for b in r.content) == expected.upper()
        with claude.messages.stream(**kw) as stream:
            assert blocks(stream.get_final_message().content) == blocks(r.content)
        with pytest.raises(anthropic.BadRequestError) as err:
            claude.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "darn"}])
        assert "polite" in err.value.api_message and err.value.type == "invalid_request_error"


# ------------------------------------------------------------------------------------------ thinking


@pytest.fixture(scope="module")
def thinking_url(thinking_model):
    app = create_app(llmkit.load(thinking_model), config=ServerConfig(model_name=MODEL))
    with running_server(app) as base:
        yield base


def test_thinking_comes_apart_in_thinking_blocks(thinking_url):
    claude = client(thinking_url)
    # random weights never close the block: the budget does, after that many tokens
    kw = dict(model=MODEL, max_tokens=12, messages=[{"role": "user", "content": "fox"}],
              thinking={"type": "enabled", "budget_tokens": 4}, extra_body={"temperature": 0, "ignore_eos": True})
    r = claude.messages.create(**kw)
    assert [b.type for b in r.content] == ["thinking", "text"]
    thought, answer = r.content
    assert thought.thinking and thought.signature == "" and "</think>" not in answer.text
    assert r.usage.output_tokens_details.thinking_tokens == 4 and r.usage.output_tokens == 12
    chat = httpx.post(thinking_url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "fox"}], "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        "max_thinking_tokens": 4}).json()["choices"][0]["message"]
    assert thought.thinking == chat["reasoning_content"] and answer.text == chat["content"]

    with claude.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert blocks(final.content) == blocks(r.content)
    starts = [(e.index, e.content_block.type) for e in events if e.type == "content_block_start"]
    assert starts == [(0, "thinking"), (1, "text")]
    kinds = [(e.index, e.delta.type) for e in events if e.type == "content_block_delta"]
    first_text = kinds.index((1, "text_delta"))
    assert set(kinds[:first_text]) == {(0, "thinking_delta"), (0, "signature_delta")}
    assert kinds[first_text - 1] == (0, "signature_delta") and set(kinds[first_text:]) == {(1, "text_delta")}
    stops = [e.index for e in events if e.type == "content_block_stop"]
    assert stops == [0, 1]
    assert "".join(e.delta.thinking for e in events if e.type == "content_block_delta"
                   and e.delta.type == "thinking_delta") == thought.thinking

    # the budget holds at each size; display "omitted" sends the blocks empty
    for budget in (1, 6):
        r = claude.messages.create(**{**kw, "thinking": {"type": "enabled", "budget_tokens": budget}})
        assert r.usage.output_tokens_details.thinking_tokens == budget
    hidden = claude.messages.create(**{**kw, "thinking": {"type": "enabled", "budget_tokens": 4, "display": "omitted"}})
    assert [(b.type, b.thinking) for b in hidden.content[:1]] == [("thinking", "")]
    assert hidden.content[1].text == answer.text

    # thinking disabled: the template closes the block at once, and only the answer comes back
    off = claude.messages.create(**{**kw, "thinking": {"type": "disabled"}})
    assert [b.type for b in off.content] == ["text"] and off.usage.output_tokens_details.thinking_tokens == 0
    on_count = claude.messages.count_tokens(model=MODEL, messages=kw["messages"]).input_tokens
    off_count = claude.messages.count_tokens(model=MODEL, messages=kw["messages"],
                                             thinking={"type": "disabled"}).input_tokens
    assert off_count > on_count
    # an earlier turn's thinking block is accepted back
    again = claude.messages.create(**{**kw, "messages": [*kw["messages"], {"role": "assistant", "content": r.content},
                                                         {"role": "user", "content": "and?"}]})
    assert [b.type for b in again.content] == ["thinking", "text"]
