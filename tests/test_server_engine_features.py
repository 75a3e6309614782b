"""The server over the engine's prefix cache, speculation and LoRA adapters: a request names an
adapter as its model, usage reports cached prompt tokens, /metrics counts both."""

from __future__ import annotations

import threading

import httpx
import pytest
from test_adapters import make_adapter
from test_server import client, metric, poll, running_server

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


def test_echoed_prompt_logprobs_are_scored_on_the_adapter_asked_for(served):
    """echo + logprobs on an adapter: each prompt token's logprob and top alternatives are the
    adapter's (its weights merged into a model of their own, one full forward), not the base's."""
    import torch

    url, llm, folder = served
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = llm.tokenizer.encode(prompt, add_special_tokens=True)

    def reference(model) -> tuple[list[float], list[float]]:
        logprobs = torch.log_softmax(model.logits(ids).float(), dim=-1)
        rows = logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
        return rows, torch.topk(logprobs[:-1], 2).values.tolist()

    scores = {}
    for name, model in (("pirate", llmkit.load(folder)), ("tiny", llm)):
        got = client(url).completions.create(model=name, prompt=ids, max_tokens=0, echo=True, logprobs=2)
        lp = got.choices[0].logprobs
        want, tops = reference(model)
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
        assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4), name
        # the alternatives are keyed by their text (two tokens may share one, leaving one entry)
        for got_top, want_top in zip(lp.top_logprobs[1:], tops):
            assert got_top, name
            assert all(any(v == pytest.approx(w, abs=1e-4) for w in want_top) for v in got_top.values()), name
        scores[name] = lp.token_logprobs[1:]
    assert scores["pirate"] != pytest.approx(scores["tiny"], abs=1e-3)


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


def test_metrics_show_the_slots_free_and_the_queue(tiny_model_dir):
    """/metrics counts the batch's slots, those free now, the requests waiting and the queue's bound.
    A request of the test's own holds the engine inside its step (its logits processor waits), so
    that what the gauges show cannot change under the test."""
    from llmkit.sampling import SamplingParams

    llm = llmkit.load(tiny_model_dir("llama"))
    entered, release = threading.Event(), threading.Event()

    def hold(generated, logits):
        entered.set()
        assert release.wait(300), "never released"
        return logits

    app = create_app(llm, config=ServerConfig(model_name="tiny", max_batch=2, max_queue=5))
    with running_server(app) as url:
        assert (metric(url, "llmkit:num_slots"), metric(url, "llmkit:num_slots_free")) == (2, 2)
        assert metric(url, "llmkit:max_requests_waiting") == 5
        (held,) = llm.requests([llm.tokenizer.encode("Paris")], SamplingParams(max_tokens=2, logits_processors=[hold]))
        handle = llm.submit(held)
        try:
            assert entered.wait(300)  # the engine is inside a step: nothing is admitted until it returns
            ask = dict(model="tiny", prompt="The quick brown fox", max_tokens=3, temperature=0)
            answers = []
            posts = [threading.Thread(target=lambda: answers.append(client(url).completions.create(**ask)))
                     for _ in range(2)]
            for t in posts:
                t.start()
            poll(lambda: metric(url, "llmkit:num_requests_waiting") == 2, "two requests waiting", timeout=300)
            assert metric(url, "llmkit:num_requests_running") == 1
            assert metric(url, "llmkit:num_slots_free") == 1
        finally:
            release.set()
        for t in posts:
            t.join(300)
        assert len(answers) == 2 and handle.done
        poll(lambda: metric(url, "llmkit:num_slots_free") == 2, "every slot free again", timeout=300)
        assert metric(url, "llmkit:num_requests_waiting") == 0
    unbounded = create_app(llm, config=ServerConfig(model_name="tiny", max_queue=None))
    with running_server(unbounded) as url:
        assert metric(url, "llmkit:max_requests_waiting") == float("inf")


def test_serve_refuses_a_malformed_lora_flag(tiny_model_dir, tmp_path):
    from cli_helpers import run_llmkit

    base = str(tiny_model_dir("llama"))
    bad = run_llmkit("serve", "-m", base, "--lora", "pirate", home=tmp_path)
    assert bad.returncode == 2 and "NAME=PATH" in bad.stderr
    missing = run_llmkit("serve", "-m", base, "--lora", f"pirate={tmp_path}", home=tmp_path)
    assert missing.returncode == 2 and "adapter_config.json" in missing.stderr
