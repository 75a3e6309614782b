"""The default path for GGUF files: weights stay in their block formats and the engine multiplies
by them with the native kernels. Compared with the float32 reference (the same file dequantized)."""

from __future__ import annotations

import math

import pytest
import torch

import llmkit
from llmkit.engine import quant

pytestmark = pytest.mark.skipif(not quant.available(), reason="no C compiler to build the native kernels")


def _full_logits(llm, ids: list[int]) -> torch.Tensor:
    """Logits at every position through the executor's own ops (no cache)."""
    executor = llm.engine.executor
    with torch.inference_mode():
        return executor.model.forward_many([(torch.tensor([ids]), None, None)], ops=executor.ops)[0][0]


def test_the_default_keeps_gguf_blocks_and_an_explicit_dtype_dequantizes(smollm2_fast, smollm2, tiny_model_dir):
    assert smollm2_fast.executor_name == "torch+gguf-kernels"
    assert smollm2.executor_name == "torch"  # dtype="float32": the reference path
    executor = smollm2_fast.engine.executor
    layer = executor.model.layers[0]
    assert layer.attn.q_proj.weight.is_meta and layer.mlp.down_proj.weight.is_meta  # never allocated
    ops = executor.ops
    assert ops.fused  # q/k/v and gate/up of one block type: one matrix and one call each
    assert ops.modules_on_blocks >= 7 * smollm2_fast.config.num_layers
    assert llmkit.load(tiny_model_dir("llama")).executor_name == "torch"  # safetensors: float weights


@pytest.mark.slow
def test_perplexity_on_the_blocks_is_within_half_a_percent_of_float32(smollm2_fast, smollm2):
    from importlib.resources import files

    text = files("llmkit").joinpath("data/heldout.txt").read_text()[:3000]
    ids = smollm2.tokenizer.encode(text, add_special_tokens=True)[:512]

    def ppl(logits):
        nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))
        return math.exp(nll.item())

    fast = _full_logits(smollm2_fast, ids)
    with torch.inference_mode():
        ref = smollm2.model(torch.tensor([ids]))[0]
    assert abs(ppl(fast) / ppl(ref) - 1) < 0.005
    agree = (fast.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.9


def test_cached_decode_on_the_blocks_equals_recompute(smollm2_fast):
    """The engine's step by step decode (cache, decode kernel) gives the tokens that a full
    recompute on the same ops picks."""
    prompt = smollm2_fast.tokenizer.encode("The quick brown fox")
    out = smollm2_fast.generate_ids(prompt, max_tokens=12, temperature=0, ignore_eos=True)
    ids = list(prompt)
    for token in out:
        assert _full_logits(smollm2_fast, ids)[-1].argmax().item() == token
        ids.append(token)


def test_batched_streams_on_the_blocks_equal_one_alone(smollm2_fast):
    prompts = ["Once upon a time", "def add(a, b):", "The capital of France is"]
    together = smollm2_fast.generate(prompts, max_tokens=16, temperature=0, ignore_eos=True)
    assert together == [smollm2_fast.generate(p, max_tokens=16, temperature=0, ignore_eos=True) for p in prompts]


def test_logits_and_saving_read_the_float_model_on_demand(smollm2_fast, smollm2):
    ids = smollm2.tokenizer.encode("Hello there")
    torch.testing.assert_close(smollm2_fast.logits(ids), smollm2.logits(ids))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_k"])
def test_a_float_model_quantized_to_blocks_at_load(tiny_model_dir, kind):
    ref = llmkit.load(tiny_model_dir("qwen2"))
    llm = llmkit.load(tiny_model_dir("qwen2"), quantize=kind)  # biases on q/k/v; tied head
    assert llm.executor_name == "torch+gguf-kernels" and llm.quantize == kind
    ids = ref.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    got, want = _full_logits(llm, ids), ref.logits(ids)
    err = ((got - want).norm() / want.norm()).item()
    assert err < (0.02 if kind == "q8_0" else 0.15), err
    assert llm.generate("def add(a, b):", max_tokens=8, temperature=0, ignore_eos=True)  # runs end to end
    with pytest.raises(llmkit.LLMKitError, match="quantize"):
        llmkit.load(tiny_model_dir("qwen2"), quantize="q3_x")


def test_embeddings_on_the_blocks_read_no_float_model(tiny_model_dir, tmp_path):
    """Embeddings of a GGUF model run on its block weights: no float copy of the model is read,
    and the vectors agree with the float32 reference's."""
    import numpy as np

    from llmkit.export import export
    from llmkit.tasks import embed

    gguf = export(llmkit.load(tiny_model_dir("llama")), "gguf", tmp_path / "tiny.gguf", quantize="q8_0")
    llm = llmkit.load(gguf)
    texts = ["The quick brown fox", "def add(a, b): return a + b", "Paris"]
    got = embed(llm, texts)
    assert llm._model is None  # the float model was never read
    want = embed(llmkit.load(gguf, dtype="float32"), texts)
    cosine = (got * want).sum(axis=1)  # both L2-normalised
    assert got.shape == want.shape and np.all(cosine > 0.999), cosine
