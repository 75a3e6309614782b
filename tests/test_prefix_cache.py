"""The prefix cache: a prompt that begins like an earlier prompt or conversation reuses its keys
and values, with the same results as computing them again."""

from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit.engine import prefix_cache
from llmkit.engine.prefix_cache import PrefixCache
from llmkit.sampling import SamplingParams

SYSTEM = "You are a careful assistant. " * 2


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    """The tiny model with and without a prefix cache."""
    path = tiny_model_dir("llama")
    return llmkit.load(path, prefix_cache=True), llmkit.load(path, prefix_cache=False)


def run(llm, prompt_ids, n=12):
    (request,) = llm.requests([prompt_ids], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), logprobs=0)
    handle = llm.submit(request)
    events = list(handle.events())
    return handle, [e.token for e in events if e.token is not None], [e.logprob for e in events if e.token is not None]


def test_a_shared_beginning_is_reused_with_the_same_numbers(pair):
    cached, plain = pair
    tok = cached.tokenizer
    first = tok.encode(SYSTEM + "Tell me about foxes.")
    second = tok.encode(SYSTEM + "Tell me about dogs and cats.")
    h1, _, _ = run(cached, first)
    assert h1.cached_tokens == 0
    h2, tokens, logprobs = run(cached, second)
    assert h2.cached_tokens >= cached.engine.prefix_cache.block  # the system prompt came from the cache
    assert h2.cached_tokens % cached.engine.prefix_cache.block == 0 and h2.cached_tokens < len(second)
    _, want_tokens, want_logprobs = run(plain, second)
    assert tokens == want_tokens
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(want_logprobs), rtol=1e-4, atol=1e-4)


def test_a_conversation_reuses_its_history_answer_included(pair):
    cached, plain = pair
    tok = cached.tokenizer
    turn1 = tok.encode(SYSTEM + "Question one?")
    h1, answer, _ = run(cached, turn1, n=40)
    turn2 = turn1 + answer + tok.encode(" And question two?")
    h2, tokens, _ = run(cached, turn2)
    # everything computed before (prompt and answer, but the last answer token) up to a block edge
    assert h2.cached_tokens >= (len(turn1) + len(answer) - 1) // 32 * 32 > len(turn1) - 32
    assert tokens == run(plain, turn2)[1]


def test_the_default_bound_follows_the_model(pair):
    """Two whole context windows of this model's keys and values (what its blocks really take),
    never more than the share of memory."""
    cached, _ = pair
    cache = cached.engine.prefix_cache
    run(cached, cached.tokenizer.encode(SYSTEM + "Tell me about owls and their nests in winter."))
    (entry, *_) = cache._entries.values()
    per_token = entry.nbytes // cache.block
    assert per_token == prefix_cache.kv_bytes_per_token(cached.config, torch.float32)
    want = prefix_cache.DEFAULT_CONTEXTS * cached.context_length * per_token
    assert want < prefix_cache.memory_budget()  # a tiny model: its own size rules, not the machine's
    assert cache.budget == want
    assert prefix_cache.default_budget(10**9, 10**6) == prefix_cache.memory_budget()


def test_the_cache_stays_within_its_bound_and_eviction_loses_no_request(tiny_model_dir):
    path = tiny_model_dir("llama")
    plain = llmkit.load(path, prefix_cache=False)
    small = llmkit.load(path, prefix_cache=1)  # placeholder, resized below once a block's size is known
    cache = small.engine.prefix_cache
    prompts = [small.tokenizer.encode(f"{SYSTEM} Variant {i}: " + "more words here " * (i % 3 + 1)) for i in range(8)]
    run(small, prompts[0])  # an entry larger than the bound is never kept
    assert len(cache) == 0 and cache.bytes == 0
    cache.budget = 3 * 2 * small.config.num_layers * small.config.num_kv_heads * 32 * small.config.head_dim * 4
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    handles = [small.submit(r) for r in small.requests(prompts * 2, params)]  # all at once: evicting meanwhile
    for h, p in zip(handles, prompts * 2):
        list(h.events())
        assert h.finish_reason == "length"
        assert h.tokens == plain.generate_ids(p, max_tokens=10, temperature=0, ignore_eos=True)
        assert cache.bytes <= cache.budget
    assert 0 < len(cache) <= 3


def test_blocks_of_one_adapter_never_serve_another():
    cache = PrefixCache(1 << 20, block=4)
    k = torch.zeros(2, 1, 8, 4)
    cache.insert(list(range(8)), lambda a, b: (k[:, :, a:b], k[:, :, a:b]))
    assert len(cache.match(list(range(8)), 8)) == 2
    assert cache.match(list(range(8)), 8, adapter="french") == []
    assert cache.match([9] + list(range(1, 8)), 8) == []  # a different first token: nothing matches
    assert len(cache.match(list(range(6)), 6)) == 1  # only whole blocks


def test_without_the_cache_nothing_is_reused(pair):
    _, plain = pair
    assert plain.engine.prefix_cache is None
    ids = plain.tokenizer.encode(SYSTEM + "again")
    assert run(plain, ids)[0].cached_tokens == 0 and run(plain, ids)[0].cached_tokens == 0


def test_blocks_live_in_one_slab_whose_places_are_reused():
    """The cache's memory is one slab as large as its bound: evicted blocks' places hold the next
    ones, and each block keeps the keys and values it was given."""
    block_bytes = 2 * 2 * 1 * 4 * 4 * 4  # keys and values, (layers 2, Hk 1, block 4, D 4), float32
    cache = PrefixCache(3 * block_bytes + block_bytes // 2, block=4)
    kv = {}
    for i in range(5):
        tokens = [100 * i + j for j in range(4)]
        kv[i] = torch.full((2, 1, 4, 4), float(i))
        cache.insert(tokens, lambda a, b, i=i: (kv[i][:, :, a:b], -kv[i][:, :, a:b]))
        if i == 0:
            slab = cache._slab.k
        assert cache._slab.k is slab and slab.shape[0] == 3  # the same three places throughout
        assert len(cache) == min(i + 1, 3) and cache.bytes <= cache.budget
    assert cache.match([0, 1, 2, 3], 4) == [] and cache.match([100, 101, 102, 103], 4) == []  # evicted
    for i in (2, 3, 4):
        (entry,) = cache.match([100 * i + j for j in range(4)], 4)
        assert torch.equal(entry.k, kv[i]) and torch.equal(entry.v, -kv[i])
    cache.clear()
    assert cache._slab is None and len(cache) == 0 and cache.bytes == 0
