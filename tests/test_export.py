"""llmkit export: ONNX (with KV cache) in onnxruntime, GGUF read back by llmkit and transformers,
HF folders in transformers, torch.export programs without llmkit; refusals; the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import llmkit
from llmkit.cli import main
from llmkit.export import ExportError, export

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "Hi",
]


def _ids(llm, text):
    return llm.tokenizer.encode(text, add_special_tokens=True)


# ------------------------------------------------------------------------------------ ONNX

@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_onnx_with_kv_cache_matches_llmkit(tiny_llm_for, tmp_path, arch):
    import onnxruntime as ort

    llm = tiny_llm_for(arch)
    folder = export(llm, "onnx", tmp_path / "onnx")
    info = json.loads((folder / "export.json").read_text())
    session = ort.InferenceSession(str(folder / info["file"]), providers=["CPUExecutionProvider"])
    c = llm.config
    empty = np.zeros((1, c.num_kv_heads, 0, c.head_dim), dtype=np.float32)

    def run(ids, past):
        feed = {"input_ids": np.array([ids], dtype=np.int64)}
        feed.update({name: past[i] for i, name in enumerate(info["inputs"][1:])})
        logits, *present = session.run(None, feed)
        return logits[0], present

    for prompt in PROMPTS:  # whole prompt at once, empty cache
        ids = _ids(llm, prompt)
        logits, _ = run(ids, [empty] * (2 * c.num_layers))
        assert np.abs(logits - llm.logits(ids).numpy()).max() < 1e-4

    # greedy decoding step by step through the cache (mistral: past its 8-token sliding window)
    ids = _ids(llm, PROMPTS[1])
    logits, past = run(ids[:5], [empty] * (2 * c.num_layers))
    logits2, past = run(ids[5:], past)  # the rest of the prompt on top of a cache
    full = llm.logits(ids).numpy()
    assert np.abs(np.concatenate([logits, logits2]) - full).max() < 1e-4
    out, nxt = [], int(logits2[-1].argmax())
    for _ in range(12):
        out.append(nxt)
        step, past = run([nxt], past)
        nxt = int(step[-1].argmax())
    assert out == llm.generate_ids(ids, max_tokens=12, temperature=0, ignore_eos=True)


def test_onnx_runs_a_batch(tiny_llm_for, tmp_path):
    import onnxruntime as ort

    llm = tiny_llm_for("qwen2")
    folder = export(llm, "onnx", tmp_path / "onnx")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    c = llm.config
    ids = [llm.tokenizer.encode(PROMPTS[0])[:7], llm.tokenizer.encode(PROMPTS[1])[:7]]
    feed = {"input_ids": np.array(ids, dtype=np.int64)}
    feed.update({i.name: np.zeros((2, c.num_kv_heads, 0, c.head_dim), np.float32) for i in session.get_inputs()[1:]})
    logits = session.run(["logits"], feed)[0]
    for row, seq in zip(logits, ids):
        assert np.abs(row - llm.logits(seq).numpy()).max() < 1e-4


# ------------------------------------------------------------------------------------ GGUF

@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_gguf_f32_reads_back_with_the_same_logits_and_tokenizer(tiny_llm_for, tmp_path, arch):
    from llmkit.formats.gguf_file import GGUFFile

    llm = tiny_llm_for(arch)
    path = export(llm, "gguf", tmp_path / "model.gguf")
    back = llmkit.load(path)
    for prompt in PROMPTS:
        ids = _ids(llm, prompt)
        assert _ids(back, prompt) == ids
        assert (back.logits(ids) - llm.logits(ids)).abs().max() < 1e-5
    tok, tok2 = llm.tokenizer, back.tokenizer
    messages = [{"role": "user", "content": "Hello there"}]
    assert tok2.chat_template == tok.chat_template
    assert tok2.apply_chat_template(messages, add_generation_prompt=True) == tok.apply_chat_template(
        messages, add_generation_prompt=True)
    assert (tok2.bos_token_id, tok2.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    meta = GGUFFile(path).metadata
    assert meta["general.architecture"] == arch and meta["general.file_type"] == 0
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_is_read_by_transformers_as_llama_cpp_lays_it_out(tiny_model_dir, tiny_llm_for, tmp_path, arch):
    # transformers undoes llama.cpp's q/k row permutation itself: equal logits show the file is
    # laid out as llama.cpp's converter lays it out (llama permuted, qwen2 not)
    from transformers import AutoModelForCausalLM

    path = export(tiny_llm_for(arch), "gguf", tmp_path / "m.gguf")
    ours = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32).eval()
    ids = torch.tensor([_ids(tiny_llm_for(arch), PROMPTS[0])])
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max() < 1e-4
    assert path.exists()


def test_gguf_quantized_types(tiny_llm_for, tmp_path):
    from llmkit.formats.gguf_file import GGUFFile

    llm = tiny_llm_for("llama")
    ids = _ids(llm, PROMPTS[0])
    ref = llm.logits(ids)
    sizes = {}
    for q in ("f32", "f16", "q8_0", "q4_0"):
        path = export(llm, "gguf", tmp_path / f"m-{q}.gguf", quantize=q)
        sizes[q] = path.stat().st_size
        back = llmkit.load(path)
        diff = (back.logits(ids) - ref).abs().max().item()
        if q == "f16":
            # the same as running the model with its weights rounded to float16
            rounded = {k: v.half().float() if v.dim() == 2 else v for k, v in llm.model.state_dict().items()}
            model = type(llm.model)(llm.config)
            model.load_state_dict(rounded)
            model.eval()
            with torch.no_grad():
                assert (back.logits(ids) - model(torch.tensor([ids]))[0]).abs().max() < 1e-5
        if q == "q8_0":
            assert diff < 0.05
            types = {t.name: t.type for t in GGUFFile(path).tensors}
            assert types["blk.0.attn_q.weight"] == 8 and types["blk.0.attn_norm.weight"] == 0
        if q == "q4_0":
            assert diff < 0.5
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_gguf_tokenizer_of_the_real_model_round_trips(smollm2):
    # the 49k-token SmolLM2 vocabulary: the export must pick the 'smollm' pre-tokenizer (digits
    # one by one) and reproduce every probe text's tokens
    from llmkit.export.gguf import _tokenizer_metadata

    meta = _tokenizer_metadata(smollm2.tokenizer, smollm2.config.vocab_size)
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.chat_template"] == smollm2.tokenizer.chat_template
    assert len(meta["tokenizer.ggml.tokens"]) == smollm2.config.vocab_size


def test_gguf_runs_in_llama_cpp(tiny_llm_for, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = tiny_llm_for("llama")
    path = export(llm, "gguf", tmp_path / "m.gguf")
    model = llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, verbose=False, logits_all=False)
    ids = _ids(llm, PROMPTS[0])
    out = []
    for token in model.generate(ids, temp=0.0, top_k=1):
        out.append(token)
        if len(out) == 8:
            break
    assert out == llm.generate_ids(ids, max_tokens=8, temperature=0, ignore_eos=True)


# ------------------------------------------------------------------------------------ HF, pt2

def test_hf_export_loads_in_transformers(tiny_llm_for, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = tiny_llm_for("qwen2")
    folder = export(llm, "hf", tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok, original = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(tiny_model_dir("qwen2"))
    for prompt in PROMPTS:
        ids = _ids(llm, prompt)
        # transformers 5 re-splits with its own Qwen2 rules whatever tokenizer.json says: compare
        # with its reading of the original folder, not with llmkit's ids
        assert tok(prompt)["input_ids"] == original(prompt)["input_ids"]
        with torch.no_grad():
            assert (model(torch.tensor([ids])).logits[0] - llm.logits(ids)).abs().max() < 1e-4


def test_pt2_program_runs_without_llmkit(tiny_llm_for, tmp_path):
    llm = tiny_llm_for("llama")
    folder = export(llm, "pt2", tmp_path / "pt2")
    prompt = _ids(llm, PROMPTS[0])
    torch.save({"ids": torch.tensor(prompt), "logits": llm.logits(prompt),
                "greedy": torch.tensor(llm.generate_ids(prompt, max_tokens=6, temperature=0, ignore_eos=True))},
               tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules["llmkit"] = None  # any import of llmkit now fails: the program must not need it
import json, torch
folder = {str(folder)!r}
info = json.load(open(folder + "/export.json"))
step = torch.export.load(folder + "/model.pt2").module()
want = torch.load({str(tmp_path / "expected.pt")!r})
L, H, D = info["num_layers"], info["num_kv_heads"], info["head_dim"]
keys = values = torch.zeros(L, 1, H, 0, D)
logits, keys, values = step(want["ids"][None], keys, values)
assert (logits[0] - want["logits"]).abs().max() < 1e-4, "logits differ"
out, nxt = [], int(logits[0, -1].argmax())
for _ in range(6):
    out.append(nxt)
    logits, keys, values = step(torch.tensor([[nxt]]), keys, values)
    nxt = int(logits[0, -1].argmax())
assert out == want["greedy"].tolist(), (out, want["greedy"])
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


# ------------------------------------------------------------------------------------ refusals, CLI

def test_export_refuses_what_a_format_cannot_hold(tiny_llm_for, tmp_path):
    with pytest.raises(ExportError, match="sliding window of 8 tokens"):
        export(tiny_llm_for("mistral"), "gguf", tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ExportError, match="takes no --quantize"):
        export(tiny_llm_for("llama"), "onnx", tmp_path / "o", quantize="q8_0")
    with pytest.raises(ExportError, match="choose one of: f32, f16, bf16"):
        export(tiny_llm_for("llama"), "hf", tmp_path / "h", quantize="q4_0")
    with pytest.raises(ExportError, match="unknown export format 'tflite'; available: gguf, hf, onnx, pt2"):
        export(tiny_llm_for("llama"), "tflite", tmp_path / "t")
    llm = tiny_llm_for("llama")
    quantized = llmkit.api.LLM(type(llm.model)(llm.config), llm.tokenizer)
    quantized.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(
        torch.zeros_like(llm.model.layers[0].mlp.up_proj.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ExportError, match="not a float tensor"):
        export(quantized, "gguf", tmp_path / "q.gguf")


def test_cli_export(tiny_model_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.gguf"
    result = runner.invoke(main, ["export", "-m", str(tiny_model_dir("llama")), "--format", "gguf",
                                  "--out", str(out), "--quantize", "q8_0"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    original, exported = llmkit.load(tiny_model_dir("llama")), llmkit.load(out, dtype="float32")
    ids = original.tokenizer.encode("The quick brown fox")
    want = original.logits(ids)
    assert ((exported.logits(ids) - want).norm() / want.norm()).item() < 0.02  # q8_0's rounding only

    result = runner.invoke(main, ["export", "-m", "no-such-model-anywhere", "--format", "gguf", "--out",
                                  str(out), "--quantize", "q9"])
    assert result.exit_code == 1  # the bad type is named before any model is looked for
    assert "cannot write 'q9' weights" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["export", "-m", str(tiny_model_dir("mistral")), "--format", "gguf",
                                  "--out", str(tmp_path / "x.gguf")])
    assert result.exit_code == 1 and "sliding window" in result.output
