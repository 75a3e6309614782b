"""Fine-tuning: LoRA as a transform (identity at start, merge equals unmerged), loss only on the
assistant's tokens, saved folders that llmkit and transformers load with the same logits, LoRA
under FSDP, adapters that PEFT and llmkit read from each other, and clear errors for bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import llmkit
from llmkit.train.errors import DataError, TrainConfigError
from llmkit.train.finetune import encode_example, finetune
from llmkit.train.lora import LoRALinear, apply_lora, lora_state, merge_lora, read_adapter

QUIET = dict(progress=False, log=lambda *_: None)
FACTS = [("Zorblat", "blue"), ("Quenmip", "green"), ("Travok", "red"), ("Plinder", "gold"),
         ("Murvex", "black"), ("Sodrin", "white"), ("Kelbay", "pink"), ("Daxum", "gray")]


def _chat_rows():
    return [{"messages": [{"role": "user", "content": f"Color of {name}?"},
                          {"role": "assistant", "content": color}]} for name, color in FACTS]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _hf_logits(folder: Path, ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


# ------------------------------------------------------------------ LoRA as a transform


def test_lora_starts_as_the_base_model_and_merges_to_the_same_function(tiny_model_dir):
    llm = llmkit.load(tiny_model_dir("llama"))
    model = llm.model
    ids = torch.tensor([llm.tokenizer.encode("The quick brown fox")])
    before = model(ids)
    names = apply_lora(model, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8)
    assert len(names) == 2 * 3 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_state(model))
    torch.testing.assert_close(model(ids), before)  # B starts at zero
    with torch.no_grad():
        for p in lora_state(model).values():
            p.normal_(0, 0.1)
    changed = model(ids)
    assert not torch.allclose(changed, before)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    torch.testing.assert_close(model(ids), changed, atol=1e-5, rtol=1e-5)


def test_unknown_lora_target_is_a_clear_error(tiny_model_dir):
    llm = llmkit.load(tiny_model_dir("llama"))
    with pytest.raises(TrainConfigError, match="unknown LoRA target"):
        apply_lora(llm.model, ["qkv"])


# ------------------------------------------------------------------ data formats and masks


def test_loss_only_on_the_assistant_turns(tiny_model_dir):
    tok = llmkit.load(tiny_model_dir("llama")).tokenizer
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                        {"role": "assistant", "content": "Goodbye"}]}
    ex = encode_example(tok, row, "x:1")
    learned = [i for i, m in zip(ex.ids, ex.mask) if m]
    assert tok.decode(learned) == "Hello</s>Goodbye</s>"
    assert tok.decode(ex.ids) == tok.apply_chat_template(row["messages"])
    inst = encode_example(tok, {"instruction": "Add", "input": "2 and 3", "output": "5"}, "x:2")
    assert tok.decode([i for i, m in zip(inst.ids, inst.mask) if m]) == "5</s>"
    comp = encode_example(tok, {"prompt": "Capital of France:", "completion": " Paris"}, "x:3")
    assert tok.decode([i for i, m in zip(comp.ids, comp.mask) if m]) == " Paris</s>"
    text = encode_example(tok, {"text": "all of it"}, "x:4")
    assert all(text.mask)
    everything = encode_example(tok, row, "x:5", train_on_prompt=True)
    assert all(everything.mask)


@pytest.mark.parametrize("content, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n',
     r"data\.jsonl:2: not valid JSON"),
    ('{"question": "a", "answer": "b"}\n', r"data\.jsonl:1: unknown format"),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}\n', r"data\.jsonl:1: message 0"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}\n', r"data\.jsonl:1: no assistant message"),
    ('{"text": "' + "word " * 300 + '"}\n', r"data\.jsonl:1: \d+ tokens, longer than the limit of 128"),
    ("\n", r"no examples"),
])
def test_bad_data_is_a_clear_error_and_nothing_is_written(tiny_model_dir, tmp_path, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    with pytest.raises(DataError, match=message):
        finetune(str(tiny_model_dir("llama")), data, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


def test_too_few_examples_for_the_batch(tiny_model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", _chat_rows()[:3])
    with pytest.raises(DataError, match="fewer than the batch size 8"):
        finetune(str(tiny_model_dir("llama")), data, tmp_path / "out", **QUIET)


# ------------------------------------------------------------------ training and saving


def test_lora_finetune_learns_and_saves_merged_model_and_adapter(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    data = _write_jsonl(tmp_path / "train.jsonl", _chat_rows())
    out = tmp_path / "out"
    summary = finetune(str(base), data, out, val=data, method="lora", lora_rank=8, lora_alpha=16,
                       lora_targets="all", lr=1e-2, max_steps=30, batch_size=8, **QUIET)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # A random tiny model's head is untrained and its final norm caps the hidden state, so LoRA on
    # the projections can lower the loss only so far here; the SmolLM2 demo shows real learning.
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val == sorted(val, reverse=True) and val[-1] < val[0] - 0.2, val
    assert summary["val_loss"] == pytest.approx(val[-1])

    llm = llmkit.load(out)  # the merged model: an ordinary HF folder
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Color of Travok?"}],
                                               add_generation_prompt=True)
    ids = llm.tokenizer.encode(prompt)
    torch.testing.assert_close(llm.logits(ids), _hf_logits(out, ids), atol=1e-4, rtol=1e-4)
    assert llm.tokenizer.chat_template == llmkit.load(base).tokenizer.chat_template

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["r"] == 8
    adapted = read_adapter(out / "adapter")  # base + adapter, merged at load
    torch.testing.assert_close(adapted.model(torch.tensor([ids]))[0], llm.logits(ids), atol=1e-5, rtol=1e-5)


def test_full_finetune_of_a_tied_model_saves_what_transformers_reads(tiny_model_dir, tmp_path):
    base = tiny_model_dir("qwen2")
    rows = [{"prompt": f"{name} is", "completion": f" {color}"} for name, color in FACTS]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    finetune(str(base), data, out, method="full", lr=5e-3, max_steps=80, batch_size=4, **QUIET)
    llm = llmkit.load(out)
    ids = llm.tokenizer.encode("Zorblat is", add_special_tokens=True)
    torch.testing.assert_close(llm.logits(ids), _hf_logits(out, ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(llm.logits(ids), llmkit.load(base).logits(ids))
    assert llm.generate("Murvex is", temperature=0, max_tokens=8).strip() == "black"


def test_finetune_cli_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    data = _write_jsonl(tmp_path / "train.jsonl", _chat_rows())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LLMKIT_DEBUG", None)

    def run(out, *extra):
        cmd = [str(Path(sys.executable).parent / "llmkit"), "finetune", "-m", base, "--data", data, "--out", out,
               "--lora-dropout", "0.1", "--lr", "0.01", "--batch-size", "4", "--checkpoint-interval", "3",
               "--quiet", *extra]
        return subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True, timeout=300)

    r = run(tmp_path / "a", "--max-steps", "6")
    assert r.returncode == 0, r.stderr
    assert "model written to" in r.stdout
    r = run(tmp_path / "b", "--max-steps", "6")
    assert r.returncode == 0, r.stderr
    # cut run b back to its step-3 checkpoint, as if it had been killed there, then resume
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000006")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step-00000003\n")
    r = run(tmp_path / "b", "--max-steps", "6", "--resume")
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)


def test_lora_under_fsdp_matches_one_process(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from llmkit.train.metrics import read_metrics

    base = tiny_model_dir("llama")
    data = _write_jsonl(tmp_path / "train.jsonl", _chat_rows())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LLMKIT_DEBUG", None)
    args = ["finetune", "-m", base, "--data", data, "--val", data, "--lora-targets", "all", "--lr", "0.01",
            "--batch-size", "4", "--max-steps", "4", "--eval-interval", "2", "--device", "cpu", "--quiet"]
    one = [str(Path(sys.executable).parent / "llmkit"), *args, "--out", tmp_path / "one", "--micro-batch-size", "2"]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llmkit.cli",
           *args, "--out", tmp_path / "two", "--strategy", "fsdp"]
    for cmd in (one, two):
        r = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr

    def losses(out):
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(out / "metrics.jsonl")]

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [r[0] for r in a] == [r[0] for r in b] and any(r[2] is not None for r in b)
    for x, y in zip(a, b):
        assert y == pytest.approx(x, abs=1e-4)
    adapter_one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    adapter_two = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert adapter_one.keys() == adapter_two.keys()
    for k in adapter_one:
        # Adam divides by the square root of tiny second moments, so the rounding of a gradient summed
        # in another order (two ranks) can move a near-zero entry by ~lr-scaled 1e-5 (seen on AVX2)
        torch.testing.assert_close(adapter_two[k], adapter_one[k], atol=1e-4, rtol=1e-4)
    ids = llmkit.load(base).tokenizer.encode("Color of Travok?")
    torch.testing.assert_close(llmkit.load(tmp_path / "two").logits(ids), llmkit.load(tmp_path / "one").logits(ids),
                               atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ PEFT's adapter format


def _peft_logits(base: Path, adapter: Path, ids) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                      str(adapter)).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_llmkit_adapter_is_a_peft_adapter(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from llmkit.train.lora import save_adapter

    base = tiny_model_dir("llama")
    llm = llmkit.load(base)
    torch.manual_seed(0)
    apply_lora(llm.model, ["q_proj", "v_proj", "o_proj", "down_proj"], rank=4, alpha=8)
    with torch.no_grad():
        for p in lora_state(llm.model).values():
            p.normal_(0, 0.2)  # B too: an adapter that changes the model
    adapter = save_adapter(llm.model, tmp_path / "adapter", base=str(base), rank=4, alpha=8, dropout=0.05)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias",
                                   "fan_in_fan_out", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "bias": "none",
        "fan_in_fan_out": False, "base_model_name_or_path": str(base)}
    assert sorted(config["target_modules"]) == ["down_proj", "o_proj", "q_proj", "v_proj"]
    names = set(load_file(str(adapter / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in names and len(names) == 2 * 2 * 4

    ids = llm.tokenizer.encode("The quick brown fox")
    with torch.no_grad():
        unmerged = llm.model(torch.tensor([ids]))[0]
    assert not torch.allclose(unmerged, llmkit.load(base).logits(ids), atol=1e-3)
    torch.testing.assert_close(_peft_logits(base, adapter, ids), unmerged, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(llmkit.load(adapter).logits(ids), unmerged, atol=1e-4, rtol=1e-4)


def test_llmkit_loads_an_adapter_made_by_peft(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_model_dir("qwen2")  # tied embeddings, attention biases
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj", "gate_proj", "up_proj"],
                        alpha_pattern={"up_proj": 2}, task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # PEFT starts B at zero: make the adapter do something
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)

    llm = llmkit.load(tmp_path / "adapter")
    ids = llm.tokenizer.encode("Paris is the capital of France")
    expected = _peft_logits(base, tmp_path / "adapter", ids)
    assert not torch.allclose(expected, llmkit.load(base).logits(ids), atol=1e-3)
    torch.testing.assert_close(llm.logits(ids), expected, atol=1e-4, rtol=1e-4)

    # what llmkit cannot apply is refused by name, not silently ignored
    from llmkit.errors import ModelFormatError

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ModelFormatError, match="use_dora"):
        llmkit.load(tmp_path / "adapter")
