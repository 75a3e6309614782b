"""Decode passes replayed from CUDA graphs (llmkit.engine.cuda_graphs).

The fixed-shape pass that a graph records is checked everywhere against the model's own decode
path (run eagerly on the CPU); recording and replaying graphs are checked where CUDA is present."""

from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit.engine.cuda_graphs import DecodeGraphs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _prefill(executor, chunks):
    with torch.inference_mode():
        executor.fit(300, 4)
        for chunk in chunks:
            executor.forward([chunk], [])


def _fixed_vs_modules(executor, decodes, graphs):
    """The same pass's logits from the fixed-shape form and from the module path (which writes the
    same keys and values again)."""
    with torch.inference_mode():
        got = graphs(executor.cache, decodes)
        want = executor._modules([], decodes)[1]
    return got, want


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3-odd", "phi3-odd"])
def test_fixed_shape_pass_equals_the_decode_path(tiny_model_dir, arch):
    """Mistral's window (8) shorter than the sequences; Gemma 3's two layer kinds with their own
    ropes; Phi-3's LongRoPE past position 32: rows at different lengths in one pass."""
    llm = llmkit.load(tiny_model_dir(arch), device="cpu")
    executor = llm.engine.executor
    chunks = [(0, list(range(5, 45)), 0), (1, list(range(30, 33)), 0), (2, list(range(40, 51)), 0)]
    _prefill(executor, chunks)
    graphs = DecodeGraphs(executor.model, executor.ops, executor.device, capture=False)
    got, want = _fixed_vs_modules(executor, [(0, 7, 40), (1, 8, 3), (2, 9, 11)], graphs)
    assert got.shape == want.shape == (3, llm.config.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_rows_of_one_slot_see_the_rows_before_them(tiny_model_dir):
    """Speculative decoding checks proposals as rows of one slot at consecutive positions: each
    row sees the keys written by the rows before it in the same pass."""
    llm = llmkit.load(tiny_model_dir("llama"), device="cpu")
    executor = llm.engine.executor
    _prefill(executor, [(0, list(range(10, 22)), 0), (1, list(range(50, 55)), 0)])
    graphs = DecodeGraphs(executor.model, executor.ops, executor.device, capture=False)
    got, want = _fixed_vs_modules(executor, [(0, 3, 12), (0, 4, 13), (0, 5, 14), (1, 6, 5)], graphs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_graphs_are_keyed_by_rows_and_length_and_dropped_with_the_cache(tiny_model_dir):
    llm = llmkit.load(tiny_model_dir("llama"), device="cpu")
    executor = llm.engine.executor
    _prefill(executor, [(0, list(range(10, 22)), 0), (1, list(range(50, 55)), 0)])
    graphs = DecodeGraphs(executor.model, executor.ops, executor.device, capture=False)
    with torch.inference_mode():
        graphs(executor.cache, [(0, 3, 12)])
        graphs(executor.cache, [(0, 3, 12), (1, 4, 5)])
        graphs(executor.cache, [(1, 4, 5), (0, 3, 12)])  # same shape: same entry
        length = executor.cache.max_len  # the tiny model's whole context: under the shortest bucket
        assert sorted(graphs.graphs) == [(1, length), (2, length)]
        executor.fit(100, 8)  # more slots: a new cache tensor, the old entries are stale
        graphs(executor.cache, [(0, 5, 12)])
    assert sorted(graphs.graphs) == [(1, length)] and graphs.cache is executor.cache


@cuda
def test_engine_on_cuda_replays_graphs_with_the_eager_text(tiny_model_dir):
    """Greedy text through captured graphs equals the text of the same engine launching op by op,
    alone and with requests decoding together."""
    llm = llmkit.load(tiny_model_dir("llama"), device="cuda", dtype="float32", speculative=False)
    executor = llm.engine.executor
    assert executor.graphs is not None
    prompts = ["hello world", "a b c d e f", "the quick brown fox", "one two"]
    graphed = llm.generate(prompts, max_tokens=24, temperature=0)
    assert executor.graphs.captured > 0
    graphs, executor.graphs = executor.graphs, None
    try:
        eager = llm.generate(prompts, max_tokens=24, temperature=0)
    finally:
        executor.graphs = graphs
    assert graphed == eager


@cuda
def test_cuda_logits_match_the_cpu_reference(tiny_model_dir):
    """Float32 on CUDA (graphs included) against float32 on the CPU, token by token."""
    path = tiny_model_dir("mistral")
    cpu = llmkit.load(path, device="cpu", speculative=False)
    gpu = llmkit.load(path, device="cuda", dtype="float32", speculative=False)
    torch.backends.cuda.matmul.allow_tf32 = False
    prompts = ["hello world and more words", "x y z"]
    assert gpu.generate(prompts, max_tokens=32, temperature=0) == cpu.generate(prompts, max_tokens=32, temperature=0)
