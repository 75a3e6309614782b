"""The decode step in one native call (llmkit.engine.step): the same logits as the model's own
layer-by-layer path on the same block-format weights, for every shape of pass it takes."""

from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit.engine import quant, step

pytestmark = pytest.mark.skipif(not quant.available(), reason="no C compiler to build the native kernels")


def _both(executor, chunks, decodes):
    """The decode logits of one pass through DecodeStep and then through the modules, from the
    same cache contents (the prompts written first on the module path)."""
    fused = executor.step
    assert fused is not None
    with torch.inference_mode():
        executor.step = None
        for chunk in chunks:
            executor.forward([chunk], [])
        want = executor.forward([], decodes)[1]
        executor.step = fused
        got = executor.forward([], decodes)[1]
    return got, want


def _close(got, want):
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-4, err
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "qwen3-hd12", "phi3"])
def test_decode_rows_equal_the_module_path(tiny_model_dir, arch):
    """Several sequences at different lengths; Mistral's sliding window (8) shorter than the
    longest; Qwen3's per-head q/k norms and its head_dim unlike hidden / heads."""
    llm = llmkit.load(tiny_model_dir(arch), quantize="q8_0")
    executor = llm.engine.executor
    with torch.inference_mode():
        executor.fit(64, 3)
    chunks = [(0, list(range(5, 25)), 0), (1, list(range(30, 33)), 0), (2, list(range(40, 51)), 0)]
    got, want = _both(executor, chunks, [(0, 7, 20), (1, 8, 3), (2, 9, 11)])
    _close(got, want)


def test_rows_of_one_slot_at_consecutive_positions(tiny_model_dir):
    """Speculative decoding's check: each row sees its slot's keys up to its own position,
    the keys of the rows before it in the same pass included."""
    llm = llmkit.load(tiny_model_dir("llama"), quantize="q4_0")
    executor = llm.engine.executor
    with torch.inference_mode():
        executor.fit(64, 2)
    chunks = [(0, list(range(10, 22)), 0), (1, list(range(50, 55)), 0)]
    got, want = _both(executor, chunks, [(0, 3, 12), (0, 4, 13), (0, 5, 14), (1, 6, 5)])
    _close(got, want)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "qwen3-hd12"])
def test_a_prompt_chunk_equals_its_tokens_fed_one_at_a_time(tiny_model_dir, arch):
    """A chunk is rows of one slot at consecutive positions that attend together: its last
    logits and the keys and values it writes are the very same as from one row per pass (the
    window of Mistral's tiny model, 8, is shorter than the prompt; heads of 12 take the kernel's
    path for any head size)."""
    llm = llmkit.load(tiny_model_dir(arch), quantize="q8_0")
    executor = llm.engine.executor
    assert executor.step is not None
    ids = [(7 * i + 3) % 200 + 5 for i in range(27)]
    with torch.inference_mode():
        executor.fit(64, 2)
        chunk = executor.forward([(0, ids, 0)], [])[0][0]
        for i, token in enumerate(ids):
            alone = executor.forward([], [(1, token, i)])[1][0]
    assert torch.equal(chunk, alone)
    n = len(ids)
    assert torch.equal(executor.cache.k[:, 0, :, :n], executor.cache.k[:, 1, :, :n])
    assert torch.equal(executor.cache.v[:, 0, :, :n], executor.cache.v[:, 1, :, :n])


def test_prompt_chunks_and_decode_rows_in_one_pass(tiny_model_dir):
    """Two prompts' chunks and two decode rows share a pass: each output as from a pass of its
    own, and the chunks' logits as the module path gives them."""
    llm = llmkit.load(tiny_model_dir("llama"), quantize="q4_0")
    executor = llm.engine.executor
    a, b = list(range(10, 30)), list(range(40, 49))
    with torch.inference_mode():
        executor.fit(64, 4)
        executor.forward([(2, list(range(60, 72)), 0), (3, list(range(80, 85)), 0)], [])
        chunks, decodes = executor.forward([(0, a, 0), (1, b, 0)], [(2, 5, 12), (3, 6, 5)])
        alone_a = executor.forward([(0, a, 0)], [])[0][0]
        alone_b = executor.forward([(1, b, 0)], [])[0][0]
        alone_d = executor.forward([], [(2, 5, 12), (3, 6, 5)])[1]
        fused = executor.step
        executor.step = None
        modules = executor.forward([(0, a, 0)], [])[0][0]
        executor.step = fused
    assert torch.equal(chunks[0], alone_a) and torch.equal(chunks[1], alone_b)
    assert torch.equal(decodes, alone_d)
    _close(chunks[0][None], modules[None])


def test_generation_runs_on_the_step_and_equals_the_module_path(tiny_model_dir):
    llm = llmkit.load(tiny_model_dir("llama"), quantize="q8_0")
    assert llm.engine.executor.step is not None
    prompts = ["The quick brown fox", "def add(a, b):"]
    fused = llm.generate(prompts, max_tokens=12, temperature=0, ignore_eos=True, speculative=False)
    llm.engine.executor.step = None
    assert fused == llm.generate(prompts, max_tokens=12, temperature=0, ignore_eos=True, speculative=False)


def test_positions_outside_the_cache_are_refused(tiny_model_dir):
    llm = llmkit.load(tiny_model_dir("llama"), quantize="q8_0")
    executor = llm.engine.executor
    with torch.inference_mode():
        executor.fit(64, 1)
        with pytest.raises(IndexError, match="outside the cache"):
            executor.forward([], [(0, 5, executor.cache.max_len)])
        with pytest.raises(IndexError, match="outside the cache"):
            executor.forward([], [(executor.cache.slots, 5, 0)])


@pytest.mark.parametrize("arch, reason", [("qwen2", "biases"), ("gemma3", "norms"), ("phi3-odd", "rotary")])
def test_models_it_does_not_cover_keep_the_module_path(tiny_model_dir, arch, reason):
    llm = llmkit.load(tiny_model_dir(arch), quantize="q8_0")
    executor = llm.engine.executor
    assert executor.step is None
    assert reason in step.unsupported(executor.model, executor.ops)
    assert llm.generate("Hello", max_tokens=4, temperature=0, ignore_eos=True)  # still runs


def test_float_weights_have_no_step(tiny_model_dir):
    assert llmkit.load(tiny_model_dir("llama")).engine.executor.step is None


def test_a_prompt_chunk_in_the_pass_changes_no_decode_row(tiny_model_dir):
    """Decode rows go through the step whatever shares their pass: the same bits with a new
    request's prompt chunk beside them as without it."""
    llm = llmkit.load(tiny_model_dir("llama"), quantize="q8_0")
    executor = llm.engine.executor
    decodes = [(0, 7, 9), (1, 8, 4)]
    with torch.inference_mode():
        executor.fit(64, 3)
        executor.forward([(0, list(range(5, 14)), 0), (1, list(range(20, 24)), 0)], [])
        alone = executor.forward([], decodes)[1]
        chunk_logits, beside = executor.forward([(2, list(range(60, 70)), 0)], decodes)
        executor.step, fused = None, executor.step
        want_chunk = executor.forward([(2, list(range(60, 70)), 0)], [])[0]
        executor.step = fused
    assert torch.equal(alone, beside)
    torch.testing.assert_close(chunk_logits[0], want_chunk[0])


def test_matrices_kept_apart_where_block_types_differ(tiny_model_dir):
    """Q4_K_M files store v (and some down) in Q6_K beside q and k in Q4_K: such groups are not
    stacked, and the step multiplies their parts one by one."""
    from llmkit.engine.quant import QuantMatrix

    llm = llmkit.load(tiny_model_dir("llama"), quantize="q8_0")
    executor = llm.engine.executor
    ops = executor.ops
    for block in executor.model.layers:
        for group in ((block.attn.q_proj, block.attn.k_proj, block.attn.v_proj),
                      (block.mlp.gate_proj, block.mlp.up_proj)):
            del ops.fused[tuple(map(id, group))]
            for m, kind in zip(group, ("q8_0", "q4_0", "q4_k")):
                ops.matrices[id(m)] = QuantMatrix.quantize(m.weight, kind)
    executor.step = step.DecodeStep.build(executor.model, ops)
    with torch.inference_mode():
        executor.fit(64, 2)
    got, want = _both(executor, [(0, list(range(5, 17)), 0), (1, list(range(30, 35)), 0)],
                      [(0, 7, 12), (1, 8, 5)])
    _close(got, want)


def test_rows_on_lora_adapters_equal_the_module_path(tiny_model_dir, tmp_path):
    """Rows on different adapters and on the base share one step, each with its own low-rank
    updates, as the modules apply them."""
    from test_adapters import make_adapter

    base = tiny_model_dir("llama")
    folders = {name: make_adapter(tmp_path / name, base, seed=seed) for seed, name in enumerate(("a0", "a1"))}
    llm = llmkit.load(base, quantize="q8_0", adapters=folders)
    executor = llm.engine.executor
    assert executor.step is not None
    with torch.inference_mode():
        executor.fit(64, 3)
    executor.use_adapter(0, "a0")
    executor.use_adapter(1, "a1")
    chunks = [(0, list(range(5, 15)), 0), (1, list(range(30, 36)), 0), (2, list(range(40, 48)), 0)]
    got, want = _both(executor, chunks, [(0, 7, 10), (1, 8, 6), (2, 9, 8), (0, 3, 11)])
    _close(got, want)
    executor.use_adapter(1, None)
    base_row = _both(executor, [], [(1, 8, 6)])[0]
    assert not torch.allclose(base_row[0], got[1])  # the adapter changed that row
