"""The Python API on the real default model: generate, stream, chat, stop strings, seeds."""

from __future__ import annotations

import pytest

import llmkit
from llmkit.errors import ContextLengthError, InvalidSamplingError


def test_greedy_completion_is_sensible(smollm2):
    out = smollm2.generate("The capital of France is", max_tokens=20, temperature=0)
    assert isinstance(out, str) and "Paris" in out


def test_stream_pieces_join_to_generate(smollm2):
    prompt = "Write a haiku about the sea, with an emoji:"
    whole = smollm2.generate(prompt, max_tokens=40, temperature=0)
    pieces = list(smollm2.stream(prompt, max_tokens=40, temperature=0))
    assert len(pieces) > 1 and "".join(pieces) == whole
    assert all("\ufffd" not in p for p in pieces)


def test_stream_text_equals_decoded_tokens(smollm2):
    """Incremental text never differs from decoding all generated tokens at once."""
    ids = smollm2.tokenizer.encode("Translate to Chinese and Japanese: good morning")
    new = smollm2.generate_ids(ids, max_tokens=30, temperature=0.9, seed=3)
    text = "".join(smollm2._stream_ids(ids, llmkit.SamplingParams(max_tokens=30, temperature=0.9, seed=3)))
    assert text == smollm2.tokenizer.decode(new, skip_special_tokens=True)


def test_same_seed_same_text_and_batches(smollm2):
    a = smollm2.generate("Once upon a time", max_tokens=24, temperature=0.8, seed=7)
    b = smollm2.generate("Once upon a time", max_tokens=24, temperature=0.8, seed=7)
    c = smollm2.generate("Once upon a time", max_tokens=24, temperature=0.8, seed=8)
    assert a == b and a != c
    batch = smollm2.generate(["Once upon a time", "Hello"], max_tokens=10, temperature=0)
    assert isinstance(batch, list) and len(batch) == 2
    assert batch[0] == smollm2.generate("Once upon a time", max_tokens=10, temperature=0)


def test_stop_strings_cut_the_output(smollm2):
    prompt = "List the numbers from one to ten in words, separated by commas:"
    full = smollm2.generate(prompt, max_tokens=40, temperature=0)
    assert "," in full
    stop = full[full.index(",") :][:2]  # a stop string that occurs in the greedy text
    cut = smollm2.generate(prompt, max_tokens=40, temperature=0, stop=[stop])
    assert cut == full[: full.index(stop)]
    assert stop not in cut


def test_chat_uses_the_models_template(smollm2):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = smollm2.chat(messages, max_tokens=32, temperature=0)
    prompt = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    ids = smollm2.generate_ids(smollm2.tokenizer.encode(prompt), max_tokens=32, temperature=0)
    expected = smollm2.tokenizer.decode([t for t in ids if t not in smollm2.tokenizer.eos_token_ids])
    assert answer == expected and "Paris" in answer


def test_ignore_eos_gives_a_fixed_length(smollm2):
    ids = smollm2.tokenizer.encode("Hi")
    assert len(smollm2.generate_ids(ids, max_tokens=48, temperature=0, ignore_eos=True)) == 48


def test_bad_settings_and_lengths_raise(smollm2):
    with pytest.raises(InvalidSamplingError, match="temperature"):
        smollm2.generate("Hi", temperature=-0.5)
    with pytest.raises(InvalidSamplingError, match="top_p"):
        smollm2.stream("Hi", top_p=0)
    with pytest.raises(ContextLengthError, match="8192"):
        smollm2.generate("word " * 9000, max_tokens=5)


def test_bfloat16_agrees_with_float32_and_batches_like_alone(smollm2, smollm2_gguf):
    import torch

    from llmkit.api import cpu_has_native_bf16

    if not cpu_has_native_bf16():  # emulated bfloat16 is slow and not what "auto" picks there
        pytest.skip("this CPU has no native bfloat16")
    bf = llmkit.load(smollm2_gguf, executor="torch", dtype="bfloat16")
    assert bf.model.embed.weight.dtype == torch.bfloat16
    text = ("The river rose through the night, and by morning the village had moved its boats, its "
            "goats and its grandmothers up to the old church on the hill, where they waited for the rain to stop.")
    ids = smollm2.tokenizer.encode(text)
    top32, top16 = smollm2.logits(ids).argmax(-1), bf.logits(ids).argmax(-1)
    assert (top32 == top16).float().mean() >= 0.9
    prompts = ["The capital of France is", "Water boils at", "def fibonacci(n):"]
    together = bf.generate(prompts, max_tokens=12, temperature=0)
    assert together == [bf.generate(p, max_tokens=12, temperature=0) for p in prompts]


def test_an_unknown_dtype_is_refused_by_name(tiny_dir):
    from llmkit.errors import LLMKitError

    with pytest.raises(LLMKitError, match="float8.*auto"):
        llmkit.load(tiny_dir, dtype="float8")


def test_one_off_work_runs_in_a_thread_that_ends_and_errors_reach_the_caller():
    import threading

    from llmkit.threads import in_fresh_thread

    seen = []
    assert in_fresh_thread(lambda: seen.append(threading.current_thread()) or 7) == 7
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(ZeroDivisionError):
        in_fresh_thread(lambda: 1 / 0)
