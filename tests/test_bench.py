"""``llmkit bench``: the bandwidth accounting, peers run by another interpreter, and results that say
which configuration ran. Real files, real subprocesses, tiny models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_llmkit
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize

from llmkit import bench

# ------------------------------------------------------------------ bandwidth accounting

# bytes per 32 values, by type (the GGUF block layouts)
PER_32 = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20, Q.Q5_0: 22, Q.F16: 64, Q.F32: 128}


def _write_gguf(path: Path, tensors: dict[str, tuple[Q, tuple[int, ...]]]) -> Path:
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    for name, (qtype, shape) in tensors.items():
        data = rng.standard_normal(shape).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, data)
        elif qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            q = quantize(data, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


LAYER = {
    "blk.0.attn_norm.weight": (Q.F32, (64,)),
    "blk.0.attn_q.weight": (Q.Q4_0, (64, 64)),
    "blk.0.ffn_up.weight": (Q.F16, (128, 64)),  # a type llmkit's kernels do not hold: read as float32
}


def _bytes(tensors, per_32=None) -> int:
    return sum(np.prod(shape) // 32 * (per_32 or PER_32)[qtype] for qtype, shape in tensors)


def test_bytes_per_token_of_a_gguf_with_a_tied_head(tmp_path):
    # no output.weight: the token embedding is the head, read whole for every token
    path = _write_gguf(tmp_path / "tied.gguf", {"token_embd.weight": (Q.Q8_0, (96, 64)), **LAYER})
    everything = [(Q.Q8_0, (96, 64)), *LAYER.values()]
    assert bench.weight_bytes(path, "stored") == _bytes(everything) == 96 * 2 * 34 + 64 * 4 + 64 * 2 * 18 + 128 * 64 * 2
    assert bench.weight_bytes(path, "gguf-kernels") == _bytes(everything) + 128 * 64 * 2  # F16 held as float32
    assert bench.weight_bytes(path, "float32") == 4 * (96 * 64 + 64 + 64 * 64 + 128 * 64)
    assert bench.weight_bytes(path, "bfloat16") == 2 * (96 * 64 + 64 + 64 * 64 + 128 * 64)
    # llmkit's own quantization: matrices as blocks, the norm as float32; rows of 64 are not
    # whole 256-value Q4_K blocks, so q4_k writes them as Q5_0
    assert bench.weight_bytes(path, "q8_0") == _bytes([(Q.Q8_0, (96, 64)), (Q.F32, (64,)), (Q.Q8_0, (64, 64)),
                                                       (Q.Q8_0, (128, 64))])
    assert bench.weight_bytes(path, "q4_k") == _bytes([(Q.Q5_0, (96, 64)), (Q.F32, (64,)), (Q.Q5_0, (64, 64)),
                                                       (Q.Q5_0, (128, 64))])
    assert bench.weight_bytes(path, None) is None


def test_bytes_per_token_of_a_gguf_with_its_own_head(tmp_path):
    # with an output head of its own, the embedding is only looked up: one row per token, not counted
    path = _write_gguf(tmp_path / "untied.gguf", {"token_embd.weight": (Q.Q8_0, (96, 64)), **LAYER,
                                                  "output.weight": (Q.Q4_1, (96, 64))})
    assert bench.weight_bytes(path, "stored") == _bytes([*LAYER.values(), (Q.Q4_1, (96, 64))])
    assert bench.weight_bytes(path, "float32") == 4 * (64 + 64 * 64 + 128 * 64 + 96 * 64)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied and tied head
def test_bytes_per_token_of_safetensors_match_the_model(tiny_model_dir, arch):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tied = model.config.tie_word_embeddings
    read = sum(p.numel() for name, p in model.named_parameters() if tied or "embed_tokens" not in name)
    assert bench.weight_bytes(folder, "float32") == 4 * read
    assert bench.weight_bytes(folder, "stored") == 4 * read  # saved as float32


def test_bandwidth_is_bytes_per_token_times_decode_speed(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", {"token_embd.weight": (Q.Q8_0, (96, 64)), **LAYER})
    result = {"engine": "llama.cpp", "weights": "stored", "decode_tokens_per_s": 50.0}
    bench.add_bandwidth(result, path, machine_gb_s=0.01)
    nbytes = bench.weight_bytes(path, "stored")
    assert result["weights_read_per_token_mb"] == nbytes / 1e6
    assert result["decode_read_bandwidth_gb_s"] == pytest.approx(nbytes * 50 / 1e9)
    assert result["decode_bandwidth_share"] == pytest.approx(nbytes * 50 / 1e9 / 0.01)
    failed = {"engine": "transformers", "error": "boom"}
    bench.add_bandwidth(failed, path, 1.0)
    assert failed == {"engine": "transformers", "error": "boom"}


def test_machine_read_bandwidth_is_measured():
    assert bench.machine_read_bandwidth(1, nbytes=64 * 2**20) > 0


# ------------------------------------------------------------------ peers in another interpreter


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A Python with nothing installed: llmkit, torch and the peers cannot be imported there."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    assert subprocess.run([python, "-c", "import llmkit"], capture_output=True).returncode != 0
    return python


def test_probe_runs_in_an_interpreter_without_llmkit(bare_python):
    info = bench.probe(bare_python)
    assert info["python"] == bare_python
    assert info["peers"] == {"transformers": None, "llama.cpp": None}


def test_probe_reports_the_peers_of_the_interpreter_given():
    info = bench.probe(sys.executable)
    assert info["python"] == sys.executable
    assert info["peers"]["transformers"] == metadata.version("transformers")


def test_a_missing_interpreter_is_an_error_not_a_crash(tmp_path):
    result = bench.run_job({"engine": "probe"}, str(tmp_path / "no-python"))
    assert "cannot run" in result["error"]


@pytest.fixture(scope="module")
def long_tiny_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny random llama whose context holds the 512-token prompt the bench prefills."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                            bos_token_id=1, eos_token_id=2)
    out = tmp_path_factory.mktemp("tiny-long")
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def long_tiny_gguf(long_tiny_dir, tmp_path_factory) -> Path:
    import llmkit
    from llmkit.export import export

    return export(llmkit.load(long_tiny_dir), "gguf", tmp_path_factory.mktemp("gguf") / "tiny.gguf", quantize="q8_0")


def test_a_peer_worker_runs_under_the_interpreter_given(long_tiny_dir):
    result = bench.run_engine("transformers", str(long_tiny_dir), threads=1, repeats=1, python=sys.executable)
    assert "error" not in result, result
    assert result["python"] == sys.executable
    assert result["version"] == metadata.version("transformers")
    assert result["weights"] == "float32" and result["decode_tokens_per_s"] > 0


# ------------------------------------------------------------------ the configuration that ran


def test_llmkit_runs_its_default_and_says_which(long_tiny_gguf):
    import llmkit

    picked = llmkit.load(long_tiny_gguf).executor_name  # what a plain load picks on this machine
    result = bench.run_engine("llmkit", str(long_tiny_gguf), threads=1, repeats=1)
    assert "error" not in result, result
    assert result["executor"] == picked
    assert result["precision"].startswith(picked)
    if picked == "torch+gguf-kernels":
        assert result["weights"] == "gguf-kernels" and result["dtype"] == "float32"
        assert "GGUF blocks" in result["precision"]
    for key, *_ in bench.METRICS:
        assert result[key] > 0, key


def test_llmkit_with_options_reports_them(long_tiny_gguf):
    result = bench.run_engine("llmkit", str(long_tiny_gguf), threads=1, repeats=1, options={"dtype": "float32"})
    assert "error" not in result, result
    assert (result["executor"], result["dtype"], result["weights"]) == ("torch", "float32", "float32")
    assert result["precision"] == "torch, float32"


def test_cli_skips_missing_peers_and_reports_bandwidth(long_tiny_gguf, bare_python):
    from llmkit.store import home

    # the real store home: the worker reuses the kernels built there instead of compiling its own
    out = run_llmkit("bench", "-m", long_tiny_gguf, "--peer-python", bare_python, "--threads", "1",
                     "--repeats", "1", "--json", home=home())
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert "skipping transformers: not installed" in out.stderr
    assert "skipping llama.cpp: not installed" in out.stderr
    assert report["peer_python"] == bare_python
    assert report["machine_read_bandwidth_gb_s"] > 0
    [ours] = report["results"]
    assert ours["engine"] == "llmkit" and ours["precision"]
    nbytes = bench.weight_bytes(long_tiny_gguf, ours["weights"])
    assert ours["weights_read_per_token_mb"] == nbytes / 1e6
    assert ours["decode_read_bandwidth_gb_s"] == pytest.approx(nbytes * ours["decode_tokens_per_s"] / 1e9)


def test_cli_refuses_a_peer_python_that_is_not_one(tmp_path):
    out = run_llmkit("bench", "--peer-python", tmp_path / "nothing-here", home=tmp_path / "home")
    assert out.returncode == 2
    assert "is not an executable file" in out.stderr and "Traceback" not in out.stderr
