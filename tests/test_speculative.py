"""Speculative decoding by prompt lookup: the same greedy text as decoding one token at a time, and
for sampling the same distribution, with tokens proposed from the prompt and checked in one pass."""

from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit.engine.lookup import Lookup, best_length, continuation
from llmkit.sampling import Sampler, SamplingParams

COPYING = [  # prompts whose continuation tends to repeat what came before: proposals happen
    "one two three four five six seven one two three four five six seven one two three",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add(a,",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the",
    "Paris is the capital of France; Berlin is the capital of Germany. Paris is the",
]


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    path = tiny_model_dir("llama")
    return llmkit.load(path, speculative=True, prefix_cache=False), llmkit.load(path, speculative=False, prefix_cache=False)


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=0, repetition_penalty=1.3),
                                      dict(temperature=0, presence_penalty=0.5, frequency_penalty=0.3)])
def test_greedy_text_is_the_same_with_and_without_speculation(pair, settings):
    spec, plain = pair
    before = spec.engine.spec_proposed
    for prompt in COPYING:
        want = plain.generate(prompt, max_tokens=40, ignore_eos=True, **settings)
        assert spec.generate(prompt, max_tokens=40, ignore_eos=True, **settings) == want
    if settings == dict(temperature=0):  # penalties steer away from repeats: maybe nothing to propose
        assert spec.engine.spec_proposed > before  # proposals were made and checked


def test_accepted_proposals_save_passes(pair):
    spec, _ = pair
    accepted = spec.engine.spec_accepted
    prompt = spec.tokenizer.encode(COPYING[0])
    steps = []
    forward = spec.engine.executor.forward

    def counting(*args):
        steps.append(1)
        return forward(*args)

    spec.engine.executor.forward = counting
    try:
        out = spec.generate_ids(prompt, max_tokens=40, temperature=0, ignore_eos=True)
    finally:
        del spec.engine.executor.forward
    assert spec.engine.spec_accepted > accepted  # the model agreed with some proposals ...
    assert len(out) == 40 and len(steps) < len(out)  # ... so fewer passes than tokens (the prompt is one)
    # every pass yields its kept tokens and one more; the count is complete when the answer is
    assert spec.engine.spec_accepted - accepted == len(out) - len(steps)


def test_speculation_can_be_turned_off_per_call(pair):
    spec, plain = pair
    before = spec.engine.spec_proposed
    spec.generate(COPYING[1], max_tokens=30, temperature=0, ignore_eos=True, speculative=False)
    assert spec.engine.spec_proposed == before
    assert plain.engine.speculative is False


def test_the_check_keeps_the_sampling_distribution():
    """Sampler.verify with a proposed token yields tokens distributed as Sampler.sample's."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    for params in (SamplingParams(temperature=0.8), SamplingParams(temperature=1.0, top_p=0.9),
                   SamplingParams(temperature=1.2, top_k=4, min_p=0.02)):
        want = Sampler(params, 6).process(logits, []).exp()
        for proposed in (0, 2, 5):
            sampler = Sampler(params.replace(seed=proposed), 6)
            counts = torch.zeros(6)
            n = 6000
            for _ in range(n):
                token, kept = sampler.verify(logits, [], proposed)
                assert kept == (token == proposed)
                counts[token] += 1
            assert torch.allclose(counts / n, want, atol=0.025), (params, proposed, counts / n, want)


def test_greedy_check_keeps_only_the_argmax():
    sampler = Sampler(SamplingParams(temperature=0), 4)
    logits = torch.tensor([0.1, 3.0, 0.2, 0.3])
    assert sampler.verify(logits, [], 1) == (1, True)
    assert sampler.verify(logits, [], 2) == (1, False)


def test_long_proposals_keep_the_greedy_text_and_save_more_passes(pair):
    """A model caught in a loop is copied many tokens per pass: the proposals grow past a handful
    of tokens, and the text stays that of plain decoding."""
    spec, plain = pair
    rows = []
    forward = spec.engine.executor.forward

    def counting(chunks, decodes):
        rows.append(len(decodes))
        return forward(chunks, decodes)

    spec.engine.executor.forward = counting
    try:
        for prompt in COPYING:
            ids = spec.tokenizer.encode(prompt)
            n = spec.engine.context_length - len(ids) - 1  # as long as the tiny model's context allows
            want = plain.generate_ids(ids, max_tokens=n, temperature=0, ignore_eos=True)
            assert spec.generate_ids(ids, max_tokens=n, temperature=0, ignore_eos=True) == want
    finally:
        del spec.engine.executor.forward
    assert max(rows) > 6  # more than the five proposed tokens (plus the last one) of a fixed length


def test_a_repeat_is_continued_past_the_end_of_the_sequence():
    seq = [7, 1, 2, 1, 2, 1, 2]
    assert continuation(seq, 5, 5) == [1, 2, 1, 2, 1]  # the match at 3..4 runs into the end
    lookup = Lookup()
    lookup.rate = 1.0
    proposal = lookup.propose(seq, 6)
    assert len(proposal) > 2 and proposal == [1, 2, 1, 2, 1, 2][: len(proposal)]  # more than seq holds after the match


def test_the_longest_agreeing_match_wins_over_the_most_recent():
    # "5 6" occurs after "3 4" (long agreement with the end) and, more recently, after "9"
    seq = [1, 2, 3, 4, 5, 6, 10, 11, 9, 5, 6, 12, 13, 0, 2, 3, 4, 5, 6]
    lookup = Lookup()
    lookup.rate = 1.0
    assert lookup.propose(seq, 2) == [10, 11]
    recent = [1, 5, 6, 10, 11, 9, 5, 6, 12, 13, 0, 5, 6]  # equal agreement: the most recent
    lookup = Lookup()
    lookup.rate = 1.0
    assert lookup.propose(recent, 2) == [12, 13]


def test_the_proposal_length_follows_the_chance_of_keeping_tokens():
    assert best_length(0.05, 16) == 0  # a wrong proposal would cost more than it could save
    lengths = [best_length(c, 16) for c in (0.5, 0.7, 0.9, 0.99)]
    assert lengths == sorted(lengths) and lengths[-1] == 16
    assert best_length(0.99, 3) == 3
    assert best_length(0.9, 16, row_cost=0.0) == 16  # free rows: propose all there is


def test_a_sequence_that_starts_copying_again_is_noticed_without_a_check():
    text = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9]
    lookup = Lookup(row_cost=0.35)  # rows that cost this much (cheaper ones make any match worth a check)
    lookup.rate = 0.0  # proposals have failed so far
    seq = text + [3, 1]
    assert lookup.propose(seq, 8) == []  # a two-token match with that record: not worth a check ...
    seq.append(4)  # ... but its guess, 4, comes true
    assert lookup.propose(seq, 8) == [1]  # so the next match is checked
    assert lookup.rate > 0.0
    unaware = Lookup(row_cost=0.35)
    unaware.rate = 0.0
    assert unaware.propose(seq, 8) == []  # where nothing was learned, it still is not


def test_greedy_text_is_the_same_on_the_native_decode_step(tiny_model_dir):
    """Block-format weights: a check of many rows of one slot goes through the one-call decode step."""
    path = tiny_model_dir("llama")
    spec = llmkit.load(path, quantize="q8_0", prefix_cache=False)
    plain = llmkit.load(path, quantize="q8_0", prefix_cache=False, speculative=False)
    assert spec.engine.executor.step is not None
    for prompt in COPYING:
        ids = spec.tokenizer.encode(prompt)
        n = spec.engine.context_length - len(ids) - 1
        want = plain.generate_ids(ids, max_tokens=n, temperature=0, ignore_eos=True)
        assert spec.generate_ids(ids, max_tokens=n, temperature=0, ignore_eos=True) == want
    assert spec.engine.spec_accepted > 0


def test_beside_a_prompt_chunk_the_rows_stay_within_the_batch(tiny_model_dir):
    """An executor sized for one chunk plus a row per slot (llama.cpp's) has room for no more: a
    request that speculates while another's prompt is prefilled proposes within that room."""
    llm = llmkit.load(tiny_model_dir("llama"), max_batch=2, speculative=True, prefix_cache=False)
    llm.engine.prefill_chunk = 8  # the second prompt takes several steps
    passes = []
    forward = llm.engine.executor.forward

    def recording(chunks, decodes):
        passes.append((len(chunks), len(decodes)))
        return forward(chunks, decodes)

    llm.engine.executor.forward = recording
    copying = llm.tokenizer.encode(COPYING[0])
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    first = llm.submit(llm.requests([copying], params)[0])
    for _ in zip(range(12), first.events()):  # decoding, and proposing, before the second arrives
        pass
    second = llm.submit(llm.requests([llm.tokenizer.encode(COPYING[2] * 2)], params)[0])
    for handle in (first, second):
        for _ in handle.events():
            pass
    beside = [rows for chunks, rows in passes if chunks]
    assert len(beside) >= 3 and max(beside) <= 2
    assert max(rows for _, rows in passes) > 2  # alone, it proposed more than the room beside a chunk
