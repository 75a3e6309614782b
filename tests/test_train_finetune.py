"""Fine-tuning: LoRA as a transform (identity at start, merge equals unmerged), loss only on the
assistant's tokens, saved folders that llmkit and transformers load with the same logits, and
clear errors for bad data."""

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
