"""Speculative decoding by prompt lookup: the same greedy text as decoding one token at a time, and
for sampling the same distribution, with tokens proposed from the prompt and checked in one pass."""

from __future__ import annotations

import pytest
import torch

import llmkit
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
