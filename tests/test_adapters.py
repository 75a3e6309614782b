"""Several LoRA adapters served beside one base model: rows of different adapters (and of the
base) share each decode step, and each row's output is what that adapter gives served alone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import llmkit

PROMPTS = ["The quick brown fox", "def add(a, b):", "Paris is the capital of", "Numbers like 12345"]


def make_adapter(folder, base, seed: int, rank: int = 4):
    """A PEFT adapter with random A and B on attention and MLP layers of the tiny Llama."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for module, (inp, out) in {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (64, 32),
                                   "mlp.down_proj": (128, 64)}.items():
            name = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.3
            tensors[f"{name}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.3
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(base), "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj", "down_proj"]}))
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    base = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("adapters")
    return base, {f"a{i}": make_adapter(root / f"a{i}", base, seed=i) for i in range(3)}


def greedy(llm, prompt, **kw):
    return llm.generate_ids(llm.tokenizer.encode(prompt), max_tokens=12, temperature=0, ignore_eos=True,
                            speculative=False, **kw)


def test_mixed_adapters_in_one_batch_equal_each_adapter_alone(adapters):
    base, folders = adapters
    llm = llmkit.load(base, adapters=folders, prefix_cache=False)
    assert sorted(llm.adapters) == ["a0", "a1", "a2"]
    merged = {name: llmkit.load(folder) for name, folder in folders.items()}  # the adapter merged into the base
    plain = llmkit.load(base)
    jobs = [(p, name) for p in PROMPTS for name in (None, "a0", "a1", "a2")]  # 16 rows, 4 kinds
    from llmkit.sampling import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    requests = [r for p, name in jobs
                for r in llm.requests([llm.tokenizer.encode(p)], params, speculative=False, adapter=name)]
    handles = [llm.submit(r) for r in requests]
    outputs = []
    for h in handles:
        list(h.events())
        outputs.append(h.tokens)
    for (p, name), got in zip(jobs, outputs):
        want = greedy(plain if name is None else merged[name], p)
        assert got == want, (p, name)
    assert len({tuple(o) for o, (p, _) in zip(outputs, jobs) if p == PROMPTS[0]}) > 1  # the adapters do differ


def test_adapter_logits_equal_the_merged_model(adapters):
    base, folders = adapters
    llm = llmkit.load(base, adapters={"a1": folders["a1"]})
    merged = llmkit.load(folders["a1"])
    ids = llm.tokenizer.encode(PROMPTS[1])
    (request,) = llm.requests([ids], llmkit.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                              logprobs=0, adapter="a1", speculative=False)
    got = [e.logprob for e in llm.submit(request).events() if e.token is not None]
    (ref,) = merged.requests([ids], llmkit.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                             logprobs=0, speculative=False)
    want = [e.logprob for e in merged.submit(ref).events() if e.token is not None]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-4)


def test_an_unknown_adapter_is_refused(adapters):
    base, folders = adapters
    llm = llmkit.load(base, adapters={"a0": folders["a0"]})
    with pytest.raises(llmkit.LLMKitError, match="no adapter named 'nope'.*a0"):
        llm.generate("hi", max_tokens=2, adapter="nope")
    with pytest.raises(llmkit.LLMKitError, match="no adapter named"):
        llm.generate_ids([1, 2], max_tokens=2, adapter="nope")
    with pytest.raises(llmkit.LLMKitError, match="no adapter named"):
        list(llm.stream("hi", max_tokens=2, adapter="nope"))


def test_adapters_on_the_quantized_default_path(adapters, tmp_path):
    """A GGUF base on the block kernels serves adapters too (the updates in float32)."""
    from llmkit.export import export

    base, folders = adapters
    gguf = export(llmkit.load(base), "gguf", tmp_path / "base.gguf", quantize="q8_0")
    llm = llmkit.load(gguf, adapters={"a2": folders["a2"]})
    assert llm.executor_name == "torch+gguf-kernels"
    with_adapter = greedy(llm, PROMPTS[2], adapter="a2")
    assert with_adapter != greedy(llm, PROMPTS[2])
    assert with_adapter == greedy(llmkit.load(folders["a2"]), PROMPTS[2])
