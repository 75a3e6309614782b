"""The server over the engine's prefix cache, speculation and LoRA adapters: a request names an
adapter as its model, usage reports cached prompt tokens, /metrics counts both."""

from __future__ import annotations

import httpx
import pytest
from test_adapters import make_adapter
from test_server import client, metric, running_server

import llmkit
from llmkit.server import ServerConfig, create_app

SYSTEM = "You are a careful assistant. You answer briefly and you never make things up."


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    base = tiny_model_dir("llama")
    folder = make_adapter(tmp_path_factory.mktemp("server-adapters") / "pirate", base, seed=3)
    llm = llmkit.load(base, adapters={"pirate": folder})
    with running_server(create_app(llm, config=ServerConfig(model_name="tiny", default_max_tokens=8))) as url:
        yield url, llm, folder


def test_a_request_names_an_adapter_as_its_model(served):
    url, llm, folder = served
    ids = [m.id for m in client(url).models.list().data]
    assert ids == ["tiny", "pirate"]
    ask = dict(prompt="The quick brown fox", max_tokens=8, temperature=0)
    pirate = client(url).completions.create(model="pirate", **ask).choices[0].text
    base = client(url).completions.create(model="tiny", **ask).choices[0].text
    assert pirate == llmkit.load(folder).generate(ask["prompt"], max_tokens=8, temperature=0)
    assert pirate != base
    with pytest.raises(Exception) as err:
        client(url).completions.create(model="parrot", **ask)
    assert "404" in str(err.value) and "pirate" in str(err.value)


def test_echoed_prompt_logprobs_on_an_adapter_are_refused_not_scored_on_the_base(served):
    url = served[0]
    ask = dict(prompt="The quick brown fox", max_tokens=0, echo=True, logprobs=1)
    with pytest.raises(Exception) as err:
        client(url).completions.create(model="pirate", **ask)
    assert "400" in str(err.value) and "base model" in str(err.value)
    assert client(url).completions.create(model="tiny", **ask).choices[0].logprobs.token_logprobs[1] is not None


def test_usage_reports_prompt_tokens_taken_from_the_cache(served):
    url, llm, _ = served
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    first = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    again = client(url).chat.completions.create(model="tiny", messages=messages[:1] + [{"role": "user", "content": "Hello"}],
                                                max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens >= llm.engine.prefix_cache.block
    assert metric(url, "llmkit:prefix_cache_tokens_reused") >= again.usage.prompt_tokens_details.cached_tokens
    assert metric(url, "llmkit:prefix_cache_hit_rate") > 0
    assert "llmkit:spec_decode_num_draft_tokens" in httpx.get(url + "/metrics").text


def test_serve_refuses_a_malformed_lora_flag(tiny_model_dir, tmp_path):
    from cli_helpers import run_llmkit

    base = str(tiny_model_dir("llama"))
    bad = run_llmkit("serve", "-m", base, "--lora", "pirate", home=tmp_path)
    assert bad.returncode == 2 and "NAME=PATH" in bad.stderr
    missing = run_llmkit("serve", "-m", base, "--lora", f"pirate={tmp_path}", home=tmp_path)
    assert missing.returncode == 2 and "adapter_config.json" in missing.stderr
