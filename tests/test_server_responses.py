"""OpenAI's Responses API (POST /v1/responses, GET/DELETE /v1/responses/{id}) on a real
``llmkit serve``, driven by the official ``openai`` SDK unchanged, over a tiny random model
(vocabulary 400, context 128) whose chat template renders tools itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import jsonschema
import openai
import pytest
from test_server import PLACE, TOOLS_TEMPLATE, client, free_port, running_server

from llmkit.server import ServerConfig, create_app

MODEL = "tiny"
FIND = {"type": "function", "name": "find", "description": "Find a place.",
        "parameters": PLACE["function"]["parameters"], "strict": True}
FLAG = {"type": "function", "name": "flag", "parameters": {
    "type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"], "additionalProperties": False}}
SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
    "size": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["city", "ok", "size"],
    "additionalProperties": False}
FOX = "The quick brown fox"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tools_dir(tiny_model_dir, tmp_path_factory):
    """The tiny llama folder with a chat template that knows tools (short: the context is 128)."""
    out = tmp_path_factory.mktemp("tiny-tools") / "model"
    shutil.copytree(tiny_model_dir("llama"), out)
    (out / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def url(tools_dir, tmp_path_factory):
    """A real ``llmkit serve`` of that folder, on a free port."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMKIT_PLUGINS": ""}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llmkit.cli", "serve", "-m", str(tools_dir), "--port", str(port),
                                 "--served-model-name", MODEL, "--log-level", "warning"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if httpx.get(base + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)
    assert "Traceback" not in log_path.read_text()


@pytest.fixture(scope="module")
def oai(url):
    return client(url)


def tokens(url: str, messages: list[dict], tools: list[dict] | None = None) -> int:
    """How many prompt tokens these chat messages make on this server (its /tokenize)."""
    body = {"messages": messages, **({"tools": tools} if tools else {})}
    return httpx.post(url + "/tokenize", json=body).json()["count"]


def chat_tools(*tools: dict) -> list[dict]:
    return [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in tools]


# ------------------------------------------------------------------------------------------ answers


def test_text_input_answers_as_the_chat_route_does(url, oai):
    r = oai.responses.create(model=MODEL, input=FOX, max_output_tokens=6, temperature=0,
                             extra_body={"ignore_eos": True})
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": FOX}], max_tokens=6,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert [item.type for item in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens == tokens(url, [{"role": "user", "content": FOX}])
    assert r.usage.output_tokens == 6 and r.usage.total_tokens == r.usage.input_tokens + 6
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.usage.input_tokens_details.cached_tokens >= 0
    # cut by max_output_tokens: incomplete, and it says why
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete"
    assert r.max_output_tokens == 6 and r.temperature == 0 and r.store is True


def test_item_input_with_roles_parts_and_instructions(url, oai):
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Paris is"},
                                                        {"type": "input_text", "text": "the capital"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "of France."}]},
        {"role": "user", "content": FOX},
    ]
    r = oai.responses.create(model=MODEL, input=items, instructions="Answer in English.", max_output_tokens=2,
                             temperature=0)
    expected = [{"role": "system", "content": "Answer in English."}, {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Paris is\nthe capital"}, {"role": "assistant", "content": "of France."},
                {"role": "user", "content": FOX}]
    assert r.usage.input_tokens == tokens(url, expected)
    assert r.instructions == "Answer in English."
    same = oai.responses.create(model=MODEL, input=FOX, max_output_tokens=2, temperature=0)
    assert same.usage.input_tokens == tokens(url, [{"role": "user", "content": FOX}]) < r.usage.input_tokens


def test_stream_events_come_in_order_and_make_the_final_response(oai):
    kw = dict(model=MODEL, input=FOX, temperature=0, max_output_tokens=12)
    probe = oai.responses.create(**kw, extra_body={"ignore_eos": True}).output_text
    stop = probe[len(probe) // 2:][:3]  # a stop string the answer reaches: the stream completes
    whole = oai.responses.create(**kw, extra_body={"stop": [stop]})
    assert whole.status == "completed" and whole.incomplete_details is None
    with oai.responses.stream(**kw, extra_body={"stop": [stop]}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[4:4 + len(deltas)] == ["response.output_text.delta"] * len(deltas) and deltas
    assert kinds[4 + len(deltas):] == ["response.output_text.done", "response.content_part.done",
                                       "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(d.delta for d in deltas) == final.output_text == whole.output_text
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in deltas) and final.output[0].id == item_id
    assert final.status == "completed" and final.usage.output_tokens == whole.usage.output_tokens
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    # cut by max_output_tokens, the stream ends with response.incomplete
    with oai.responses.stream(model=MODEL, input=FOX, max_output_tokens=3, extra_body={"ignore_eos": True}) as s:
        last = list(s)[-1]
    assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.usage.output_tokens == 3


# ------------------------------------------------------------------------------------------ tools, formats


def test_a_forced_function_call_validates_and_its_output_continues_by_previous_response_id(url, oai):
    for seed in range(3):  # a random model: only the mask makes these calls
        for choice, names in (({"type": "function", "name": "find"}, ("find",)), ("required", ("find", "flag"))):
            r = oai.responses.create(model=MODEL, input=FOX, tools=[FIND, FLAG], tool_choice=choice,
                                     temperature=1.0, extra_body={"seed": seed})
            assert r.status == "completed" and [item.type for item in r.output] == ["function_call"], r.output
            call = r.output[0]
            assert call.name in names and call.call_id.startswith("call_") and call.id.startswith("fc_")
            jsonschema.validate(json.loads(call.arguments), {"find": FIND, "flag": FLAG}[call.name]["parameters"])
    # a short call (the context is 128 tokens), then its result, by previous_response_id
    r = oai.responses.create(model=MODEL, input=FOX, tools=[FLAG], tool_choice={"type": "function", "name": "flag"},
                             temperature=1.0, extra_body={"seed": 7})
    call = r.output[0]
    follow = oai.responses.create(model=MODEL, previous_response_id=r.id, tools=[FLAG], max_output_tokens=2,
                                  input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    # the prompt is the whole conversation: the question, the call, its result
    turn = [{"role": "user", "content": FOX},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.call_id, "type": "function", "function": {"name": "flag", "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    assert follow.usage.input_tokens == tokens(url, turn, chat_tools(FLAG))
    assert follow.previous_response_id == r.id
    # the same conversation sent whole, the earlier output items as the SDK gives them
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    whole = oai.responses.create(model=MODEL, input=[{"role": "user", "content": FOX}, *r.output, result],
                                 tools=[FLAG], max_output_tokens=2)
    assert whole.usage.input_tokens == follow.usage.input_tokens
    # the SDK's typed helper reads strict tools' arguments
    strict = {**FLAG, "strict": True}
    parsed = oai.responses.parse(model=MODEL, input=FOX, tools=[strict], tool_choice="required", temperature=1.0,
                                 extra_body={"seed": 7})
    assert parsed.output[0].parsed_arguments == json.loads(call.arguments)


def test_a_streamed_function_call_equals_the_whole_one(oai):
    kw = dict(model=MODEL, input=FOX, tools=[FIND, FLAG], tool_choice="required", temperature=1.0,
              extra_body={"seed": 5})
    whole = oai.responses.create(**kw).output[0]
    with oai.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert events[2].item.type == "function_call" and events[2].item.name == whole.name
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == events[-3].arguments == whole.arguments == final.output[0].arguments
    assert "response.output_text.delta" not in kinds


def test_text_format_json_schema_and_json_object(oai):
    fmt = {"type": "json_schema", "name": "place", "schema": SCHEMA, "strict": True}
    for seed in range(3):
        r = oai.responses.create(model=MODEL, input=FOX, text={"format": fmt}, temperature=1.0, max_output_tokens=60,
                                 extra_body={"seed": seed})
        assert r.status == "completed", r.output_text
        jsonschema.validate(json.loads(r.output_text), SCHEMA)
    assert r.text.format.type == "json_schema"
    r = oai.responses.create(model=MODEL, input="Paris", text={"format": {"type": "json_object"}}, temperature=0)
    assert r.status == "completed", r.output_text
    json.loads(r.output_text)

    from pydantic import BaseModel, Field

    class Place(BaseModel):
        city: str = Field(max_length=6)
        ok: bool

    parsed = oai.responses.parse(model=MODEL, input=FOX, text_format=Place, temperature=1.0, max_output_tokens=60)
    assert isinstance(parsed.output_parsed, Place)


# ------------------------------------------------------------------------------------------ the store


def test_previous_response_id_carries_the_history_but_not_the_instructions(url, oai):
    first = oai.responses.create(model=MODEL, input=FOX, instructions="Be brief.", max_output_tokens=4,
                                 temperature=0)
    second = oai.responses.create(model=MODEL, input="Paris", previous_response_id=first.id, max_output_tokens=4,
                                  temperature=0)
    history = [{"role": "user", "content": FOX}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "Paris"}]
    assert second.usage.input_tokens == tokens(url, history)
    assert second.usage.input_tokens > tokens(url, [{"role": "user", "content": "Paris"}]) + 4
    third = oai.responses.create(model=MODEL, input="fox", previous_response_id=second.id, max_output_tokens=2)
    history += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "fox"}]
    assert third.usage.input_tokens == tokens(url, history)


def test_store_false_get_and_delete(oai):
    kept = oai.responses.create(model=MODEL, input=FOX, max_output_tokens=2)
    got = oai.responses.retrieve(kept.id)
    assert got.id == kept.id and got.output_text == kept.output_text and got.usage == kept.usage
    oai.responses.delete(kept.id)
    for gone in (kept.id, oai.responses.create(model=MODEL, input=FOX, max_output_tokens=2, store=False).id):
        with pytest.raises(openai.NotFoundError) as err:
            oai.responses.retrieve(gone)
        assert err.value.body["code"] == "response_not_found"
        with pytest.raises(openai.NotFoundError) as err:
            oai.responses.create(model=MODEL, input="Paris", previous_response_id=gone, max_output_tokens=2)
        assert err.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        oai.responses.delete(kept.id)
    # a streamed response is kept too, as it ended
    with oai.responses.stream(model=MODEL, input=FOX, max_output_tokens=2) as stream:
        last = list(stream)[-1].response
    assert oai.responses.retrieve(last.id).output_text == last.output_text


def test_the_store_keeps_the_most_recently_used(tiny_llm_for):
    app = create_app(tiny_llm_for("llama"), config=ServerConfig(model_name=MODEL, max_stored_responses=2))
    with running_server(app) as base:
        oai = client(base)

        def new() -> str:
            return oai.responses.create(model=MODEL, input=FOX, max_output_tokens=1).id

        def kept() -> set[str]:
            out = set()
            for rid in ids:
                try:
                    out.add(oai.responses.retrieve(rid).id)
                except openai.NotFoundError:
                    pass
            return out

        ids = [new(), new(), new()]
        assert kept() == {ids[1], ids[2]}  # the oldest left
        oai.responses.retrieve(ids[1])  # used: now the most recent
        ids.append(new())
        assert kept() == {ids[1], ids[3]}


# ------------------------------------------------------------------------------------------ errors, guard


def assert_400(oai, param: str | None, **kw):
    with pytest.raises(openai.BadRequestError) as err:
        oai.responses.create(model=MODEL, **kw)
    assert err.value.body["param"] == param, err.value.body
    return err.value.body


def test_bad_input_gets_openai_shaped_400s(url, oai):
    assert_400(oai, "input", input=[])
    assert "empty" in assert_400(oai, "input", input=[{"role": "system", "content": "x"}])["message"]
    assert_400(oai, "input", input=[{"type": "web_search_call", "id": "ws_1"}])
    body = assert_400(oai, "input", input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}])
    assert "input[0].content[0]" in body["message"] and "text only" in body["message"]
    assert_400(oai, "input", input=[{"role": "tool", "content": "x"}])
    assert_400(oai, "tools", input=FOX, tools=[{"type": "web_search"}])
    assert_400(oai, "tool_choice", input=FOX, tools=[FIND], tool_choice={"type": "function", "name": "nope"})
    assert_400(oai, "tool_choice", input=FOX, tool_choice="required")
    assert_400(oai, "text", input=FOX, text={"format": {"type": "json_schema", "name": "x"}})
    assert_400(oai, "text", input=FOX, text={"format": {"type": "json_schema", "name": "x",
                                                         "schema": {"type": "array", "uniqueItems": True}}})
    assert_400(oai, "text", input=FOX, tools=[FIND], tool_choice="required", text={"format": {"type": "json_object"}})
    assert_400(oai, "max_output_tokens", input=FOX, max_output_tokens=0)
    assert_400(oai, "temperature", input=FOX, temperature=3)
    assert assert_400(oai, "input", input="word " * 500)["code"] == "context_length_exceeded"
    assert_400(oai, "reasoning", input=FOX, reasoning={"effort": "extreme"})
    assert_400(oai, "conversation", input=FOX, conversation="conv_1")
    with pytest.raises(openai.NotFoundError) as err:
        oai.responses.create(model="no-such-model", input=FOX)
    assert err.value.body["param"] == "model"
    r = httpx.post(url + "/v1/responses", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert httpx.post(url + "/v1/responses", json={"input": FOX, "max_output_tokens": 1}).status_code == 200


def test_the_routes_are_guarded_documented_and_counted(tiny_llm_for):
    app = create_app(tiny_llm_for("llama"), config=ServerConfig(model_name=MODEL, api_key="s3cret"))
    with running_server(app) as base:
        with pytest.raises(openai.AuthenticationError):
            client(base, key="wrong").responses.create(model=MODEL, input=FOX, max_output_tokens=1)
        assert httpx.get(base + "/v1/responses/resp_x").status_code == 401
        assert httpx.delete(base + "/v1/responses/resp_x").status_code == 401
        oai = client(base, key="s3cret")
        paths = httpx.get(base + "/openapi.json", headers={"X-Api-Key": "s3cret"}).json()["paths"]
        assert set(paths["/v1/responses"]) == {"post"}
        assert set(paths["/v1/responses/{response_id}"]) == {"get", "delete"}
        before = metric_with_key(base, "llmkit:generation_tokens_total")
        oai.responses.create(model=MODEL, input=FOX, max_output_tokens=3, extra_body={"ignore_eos": True})
        assert metric_with_key(base, "llmkit:generation_tokens_total") == before + 3


def metric_with_key(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", headers={"X-Api-Key": "s3cret"}).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_plugin_middleware_sees_the_request_and_the_answer(tiny_llm_for):
    from llmkit import plugins
    from llmkit.errors import LLMKitError

    seen: list[dict] = []

    class Redact:
        def on_request(self, body):
            seen.append(body)
            if "darn" in json.dumps(body):
                raise LLMKitError("Please keep it polite.")
            return body

        def on_response(self, body):  # the answer in the chat shape every generation route shares
            def redact(d):
                return {**d, "content": "[redacted]"} if d.get("content") else d

            choices = [{**c, **({"message": redact(c["message"])} if "message" in c else {}),
                        **({"delta": redact(c["delta"])} if "delta" in c else {})} for c in body.get("choices", [])]
            return {**body, "choices": choices}

    class Plugin:
        @plugins.hookimpl
        def register_middleware(self, register):
            register("redact", Redact())

    plugins.reset()
    plugins.manager().register(Plugin(), name="test-responses-plugin")
    try:
        app = create_app(tiny_llm_for("llama"), config=ServerConfig(model_name=MODEL))
    finally:
        plugins.reset()
    with running_server(app) as base:
        oai = client(base)
        r = oai.responses.create(model=MODEL, input=FOX, max_output_tokens=4, extra_body={"ignore_eos": True})
        assert seen[-1]["input"] == FOX and r.output_text == "[redacted]"
        with oai.responses.stream(model=MODEL, input=FOX, max_output_tokens=4, extra_body={"ignore_eos": True}) as s:
            events = list(s)
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == "[redacted]" == events[-1].response.output[0].content[0].text
        with pytest.raises(openai.BadRequestError) as err:
            oai.responses.create(model=MODEL, input="darn", max_output_tokens=2)
        assert "polite" in err.value.message


# ------------------------------------------------------------------------------------------ reasoning


def test_reasoning_comes_apart_as_a_reasoning_item(thinking_model):
    import llmkit

    app = create_app(llmkit.load(thinking_model), config=ServerConfig(model_name=MODEL))
    with running_server(app) as base:
        oai = client(base)
        # random weights never close the block: the budget does, after 4 tokens
        kw = dict(model=MODEL, input="fox", max_output_tokens=12, temperature=0,
                  extra_body={"max_thinking_tokens": 4, "ignore_eos": True})
        r = oai.responses.create(**kw)
        assert [item.type for item in r.output] == ["reasoning", "message"]
        thought = r.output[0]
        assert thought.summary == [] and [c.type for c in thought.content] == ["reasoning_text"]
        assert r.usage.output_tokens_details.reasoning_tokens == 4 and r.usage.output_tokens == 12
        chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "fox"}], max_tokens=12,
                                           temperature=0, extra_body={"max_thinking_tokens": 4, "ignore_eos": True})
        message = chat.choices[0].message
        assert thought.content[0].text == message.model_extra["reasoning_content"] and thought.content[0].text
        assert r.output_text == message.content and "</think>" not in r.output_text

        with oai.responses.stream(**kw) as stream:
            events = list(stream)
        kinds = [e.type for e in events]
        thinking = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
        answer = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
        assert events[2].item.type == "reasoning"
        assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
        assert [e.item.type for e in events if e.type == "response.output_item.added"] == ["reasoning", "message"]
        assert "".join(thinking) == thought.content[0].text and "".join(answer) == r.output_text
        final = events[-1].response
        assert final.output[0].content[0].text == thought.content[0].text
        assert final.usage.output_tokens_details.reasoning_tokens == 4

        # reasoning.effort "none": the block closes at once
        r = oai.responses.create(model=MODEL, input="fox", max_output_tokens=4, reasoning={"effort": "none"},
                                 extra_body={"ignore_eos": True})
        assert [item.type for item in r.output] == ["message"] and r.output_text
        assert r.usage.output_tokens_details.reasoning_tokens == 0 and r.reasoning.effort == "none"


# ------------------------------------------------------------------------------------------ failures


def test_the_time_limit_ends_a_stream_with_an_error_event(tiny_llm_for):
    from test_server import Slow

    from llmkit.api import LLM

    tiny = tiny_llm_for("llama")
    slow = LLM(Slow(tiny.model, 0.02), tiny.tokenizer, name="slow")
    app = create_app(slow, config=ServerConfig(model_name=MODEL, request_timeout=0.4))
    kw = dict(model=MODEL, input=FOX, max_output_tokens=100, extra_body={"ignore_eos": True})
    with running_server(app) as base:
        oai = client(base)
        with pytest.raises(openai.APIStatusError) as err:
            oai.responses.create(**kw)
        assert err.value.status_code == 504 and err.value.body["code"] == "timeout"
        with oai.responses.stream(**kw) as stream:
            events = list(stream)
        assert [e.type for e in events[-2:]] == ["error", "response.failed"]
        assert events[-2].code == "timeout" and events[-1].response.error.code == "timeout"
        assert events[-1].response.status == "failed"
        assert [e.sequence_number for e in events] == list(range(len(events)))
        with pytest.raises(openai.NotFoundError):  # a failed response is not kept
            oai.responses.retrieve(events[-1].response.id)
