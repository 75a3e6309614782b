"""The model against the reference implementation: logits, greedy generation, KV cache."""

from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit.formats.archs import unpermute_rope

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Once upon a time, in a land far away, there lived a",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2", "qwen3", "phi3", "gemma3"])
def test_tiny_models_match_transformers(arch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir(arch)
    llm = llmkit.load(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert llm.config.architecture == arch
    gen = torch.Generator().manual_seed(1)
    for length in (1, 5, 20, 40):  # 20 and 40 pass Mistral's and Gemma 3's sliding window of 8
        ids = torch.randint(0, 400, (length,), generator=gen)
        with torch.no_grad():
            expected = ref(ids[None]).logits[0]
        got = llm.logits(ids.tolist())
        assert got.dtype == torch.float32 and got.shape == (length, 400)
        assert (got - expected).abs().max().item() < 1e-4


def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
    for prompt in PROMPTS:
        ids = smollm2.tokenizer.encode(prompt)
        with torch.no_grad():
            expected = hf_smollm2(torch.tensor([ids])).logits[0]
        got = smollm2.logits(ids)
        assert got.shape == (len(ids), 49152)
        assert (got - expected).abs().max().item() < 1e-3


def test_smollm2_greedy_generation_matches_transformers(smollm2, hf_smollm2):
    for prompt in PROMPTS:
        ids = smollm2.tokenizer.encode(prompt)
        with torch.no_grad():
            out = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=2)
        expected = out[0, len(ids):].tolist()  # ends with the end-of-sequence token if one came
        got = smollm2.generate_ids(ids, max_tokens=32, temperature=0)
        assert got == expected


def test_kv_cache_decode_equals_recompute(tiny_model_dir):
    llm = llmkit.load(tiny_model_dir("llama"))
    prompt = [5, 17, 42, 99, 3]
    got = llm.generate_ids(prompt, max_tokens=24, temperature=0, ignore_eos=True)
    ids = list(prompt)
    for _ in range(24):  # no cache: the whole sequence every step
        ids.append(int(llm.logits(ids)[-1].argmax()))
    assert got == ids[len(prompt):]


def test_batched_generation_equals_one_at_a_time(tiny_model_dir):
    """Requests of different lengths decode together, each at its own position."""
    llm = llmkit.load(tiny_model_dir("qwen2"))
    prompts = ["The quick brown fox", "def add(a, b):", "Paris"]
    together = llm.generate(prompts, max_tokens=12, temperature=0, ignore_eos=True)
    alone = [llm.generate(p, max_tokens=12, temperature=0, ignore_eos=True) for p in prompts]
    assert together == alone


@pytest.mark.parametrize("arch", ["mistral", "gpt2", "gemma3-odd", "phi3-odd"])
def test_one_pass_over_a_prompt_chunk_and_decode_rows_equals_separate_passes(arch, tiny_model_dir):
    """forward_many: a prompt chunk rides along with decode rows (how the engine steps); each
    batch's logits and cache entries equal those of its own pass."""
    model = llmkit.load(tiny_model_dir(arch)).model
    torch.manual_seed(0)
    v = model.config.vocab_size
    with torch.inference_mode():
        caches = [model.new_cache(4, 64), model.new_cache(4, 64)]
        for cache in caches:  # slots 1 and 2 hold 9 and 5 earlier tokens
            for slot, n in ((1, 9), (2, 5)):
                g = torch.Generator().manual_seed(slot)
                model(torch.randint(0, v, (1, n), generator=g), positions=torch.arange(n)[None],
                      cache=cache, slots=torch.tensor([slot]))
        chunk = (torch.randint(0, v, (1, 7)), torch.arange(3, 10)[None], torch.tensor([0]))  # slot 0, positions 3..9
        step = (torch.randint(0, v, (2, 1)), torch.tensor([[9], [5]]), torch.tensor([1, 2]))
        # slot 0's first three positions, written before
        model(torch.randint(0, v, (1, 3)), positions=torch.arange(3)[None], cache=caches[1], slots=torch.tensor([0]))
        caches[0].k.copy_(caches[1].k)
        caches[0].v.copy_(caches[1].v)
        together = model.forward_many([chunk, step], cache=caches[0], last_only=True)
        apart = [model(*chunk[:1], positions=chunk[1], cache=caches[1], slots=chunk[2], last_only=True),
                 model(*step[:1], positions=step[1], cache=caches[1], slots=step[2], last_only=True)]
    assert [t.shape for t in together] == [(1, 1, v), (2, 1, v)]
    for got, want in zip(together, apart):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the keys come out of matmuls over different numbers of rows: float32 rounding, as the logits
    torch.testing.assert_close(caches[0].k, caches[1].k, rtol=1e-5, atol=1e-5)


def test_unpermute_inverts_llama_cpp_permutation():
    n_head, dim = 4, 16
    w = torch.arange(dim * 3, dtype=torch.float32).reshape(dim, 3)
    # llama.cpp's converter: rows of each head go from half-split to interleaved order
    permuted = w.reshape(n_head, 2, dim // n_head // 2, 3).swapaxes(1, 2).reshape(dim, 3)
    assert torch.equal(unpermute_rope(permuted, n_head), w)


def test_config_round_trips_through_json(tmp_path, smollm2):
    from llmkit.config import ModelConfig

    smollm2.config.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == smollm2.config


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_save_hf_round_trips_through_transformers(arch, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    llm = llmkit.load(tiny_model_dir(arch))
    out = llm.save(tmp_path / "saved")
    ids = list(range(3, 40))
    again = llmkit.load(out)
    assert torch.equal(again.logits(ids), llm.logits(ids))
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert (llm.logits(ids) - expected).abs().max().item() < 1e-4


def test_save_hf_of_the_gguf_model(smollm2, tmp_path):
    out = smollm2.save(tmp_path / "smol-hf")
    again = llmkit.load(out)
    ids = smollm2.tokenizer.encode("The capital of France is")
    assert torch.equal(again.logits(ids), smollm2.logits(ids))
    assert again.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True) \
        == smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)


@pytest.mark.parametrize("rope", [{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                  {"rope_type": "linear", "factor": 2.0}])
def test_rope_scaling_matches_transformers(rope, tiny_model_dir, tmp_path):
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    folder = tmp_path / "scaled"
    shutil.copytree(tiny_model_dir("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = rope
    (folder / "config.json").write_text(json.dumps(cfg))
    llm = llmkit.load(folder)
    assert llm.config.rope_scaling["rope_type"] == rope["rope_type"]
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = list(range(5, 100))
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert (llm.logits(ids) - expected).abs().max().item() < 1e-4
