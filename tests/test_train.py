"""Data preparation and pretraining: cleaning (plugin cleaners too), shards, exact resume after kill -9,
atomic checkpoints, several processes with torchrun (gloo; DDP and FSDP) against one, and the CLI
commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.train import checkpoint as ckpt_mod
from llmkit.train.clean import NearDuplicates, html_to_text, normalize
from llmkit.train.data import TokenData, prepare
from llmkit.train.errors import DataError
from llmkit.train.metrics import read_metrics

LLMKIT = Path(sys.executable).parent / "llmkit"

TINY_YAML = """\
model:
  architecture: llama
  hidden_size: 32
  intermediate_size: 64
  num_layers: 2
  num_heads: 2
  num_kv_heads: 2
  tie_embeddings: true
train:
  seq_len: 32
  batch_size: 4
  lr: 0.003
  warmup_steps: 3
  eval_interval: 5
  eval_batches: 2
  checkpoint_interval: 5
  log_interval: 1
"""

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega").split()


def _corpus_files(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(30):
        words = rng.choice(WORDS, size=120)
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}. " + " ".join(words) + ".\n")
    (folder / "copy.txt").write_text((folder / "doc00.txt").read_text())  # exact duplicate
    near = (folder / "doc01.txt").read_text().replace("Document 1.", "Document one.")
    (folder / "near.md").write_text(near)  # near duplicate
    (folder / "short.txt").write_text("too short")
    (folder / "page.html").write_text(
        "<html><head><style>p{}</style><script>var x = 1;</script></head><body><nav>Home | About</nav>"
        "<p>" + " ".join(rng.choice(WORDS, size=60)) + "</p><p>Second paragraph of the page, "
        "long enough to keep around for the test.</p></body></html>")
    with open(folder / "rows.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"text": f"Row {i}: " + " ".join(rng.choice(WORDS, size=80))}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "Say the alphabet in Greek please."},
                                         {"role": "assistant", "content": " ".join(WORDS)}]}) + "\n")
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep")
    src = _corpus_files(root / "src")
    prepare([src], root / "data", vocab_size=300, val_fraction=0.1, progress=False, log=lambda *_: None)
    return root / "data"


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LLMKIT_DEBUG", None)
    return env


def _pretrain_cmd(data, out, config, *extra) -> list[str]:
    return [sys.executable, "-c", "from llmkit.commands.train import pretrain; pretrain()",
            "--data", str(data), "--out", str(out), "--config", str(config), "--quiet", *map(str, extra)]


# ------------------------------------------------------------------ cleaning


def test_html_to_text_drops_scripts_styles_navigation_and_keeps_paragraphs():
    html = ("<html><head><title>t</title><style>.a{color:red}</style></head><body><nav><a>Home</a></nav>"
            "<script>alert(1)</script><p>First  para\ngraph.</p><div>Second &amp; last.</div>"
            "<footer>(c) 2024</footer></body></html>")
    assert html_to_text(html) == "First para graph.\n\nSecond & last."


def test_normalize_unicode_controls_and_whitespace():
    text = "Cafe\u0301\x00\x07 here   now  \r\n\r\n\r\n\r\n    indented\tcode\ufeff  \n"
    assert normalize(text) == "Caf\u00e9 here now\n\n    indented code"


def test_near_duplicates_found_and_distinct_texts_kept():
    rng = np.random.default_rng(1)
    a = " ".join(rng.choice(WORDS, size=200))
    b = a.replace(a.split()[100], "CHANGED", 1)
    c = " ".join(rng.choice(WORDS, size=200))
    near = NearDuplicates(threshold=0.8)
    assert [near.seen(a), near.seen(b), near.seen(c)] == [False, True, False]


# ------------------------------------------------------------------ prepare


def test_prepare_writes_shards_tokenizer_and_report(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    clean = meta["cleaning"]
    assert clean["read"]["documents"] == 30 + 4 + 6
    assert clean["dropped"]["exact_duplicate"]["documents"] == 1
    assert clean["dropped"]["near_duplicate"]["documents"] == 1
    assert clean["dropped"]["too_short"]["documents"] == 1
    assert clean["kept"]["documents"] == 37 == meta["train"]["documents"] + meta["val"]["documents"]
    assert meta["val"]["documents"] >= 3 and meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    assert all(len(s["sha256"]) == 64 for s in meta["sources"])
    data = TokenData(prepared)
    tok = data.tokenizer()
    stream = data.window("train", 0, data.tokens("train"))
    assert stream.max() < 300 and (stream == meta["separator_id"]).sum() == meta["train"]["documents"]
    text = tok.decode(stream[: 200].tolist())
    assert "Document" in text and "<script>" not in text
    assert 0 < meta["unigram_val_loss"] < np.log(300)


def test_prepare_with_an_existing_tokenizer(tmp_path, tiny_tokenizer_dir):
    src = _corpus_files(tmp_path / "src")
    meta = prepare([src], tmp_path / "data", tokenizer=tiny_tokenizer_dir, progress=False, log=lambda *_: None)
    assert meta["vocab_size"] == 400
    from llmkit.tokenizer import Tokenizer

    assert meta["separator_id"] == Tokenizer.from_folder(tiny_tokenizer_dir).eos_token_id


def test_prepare_malformed_jsonl_names_the_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line, long enough to keep around for the test"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        prepare([bad], tmp_path / "out", progress=False, log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]


CLEANER_PLUGINS = {
    "cleaners": """
import re

from llmkit.plugins import hookimpl


def redact_keys(text):
    return re.sub(r"key-[0-9]+", "[KEY]", text)


def drop_drafts(text):
    return None if text.startswith("DRAFT") else text


@hookimpl
def register_cleaners(register):
    register("redact-keys", redact_keys)
    register("drop-drafts", drop_drafts)
""",
    "miscounting": """
from llmkit.plugins import hookimpl


@hookimpl
def register_cleaners(register):
    register("count-words", lambda text: len(text.split()))
""",
}


@pytest.fixture
def cleaner_plugins(tmp_path, monkeypatch):
    """Two plugin 'packages' with cleaners, installed the way pip would: modules plus dist-info entry points."""
    from llmkit import plugins

    site = tmp_path / "site"
    for name, code in CLEANER_PLUGINS.items():
        (site / f"{name}_plugin-1.0.dist-info").mkdir(parents=True)
        (site / f"{name}_plugin.py").write_text(code)
        (site / f"{name}_plugin-1.0.dist-info" / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}-plugin\nVersion: 1.0\n")
        (site / f"{name}_plugin-1.0.dist-info" / "entry_points.txt").write_text(f"[llmkit]\n{name} = {name}_plugin\n")
    monkeypatch.syspath_prepend(str(site))

    def select(name: str) -> None:
        monkeypatch.setenv("LLMKIT_PLUGINS", name)
        plugins.reset()

    yield select
    plugins.reset()
    for name in CLEANER_PLUGINS:
        sys.modules.pop(f"{name}_plugin", None)


def test_prepare_runs_the_plugins_cleaners_and_reports_them(cleaner_plugins, tmp_path):
    cleaner_plugins("cleaners")
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    src.mkdir()
    docs = {"a": "Use key-1234 and key-99 to open.", "b": "No secrets here.", "c": "DRAFT: key-5 is the key.",
            "d": "Plain text again."}
    docs = {name: f"{text} {' '.join(rng.choice(WORDS, size=40))}" for name, text in docs.items()}
    for name, text in docs.items():
        (src / f"{name}.txt").write_text(text)
    lines: list[str] = []
    meta = prepare([src], tmp_path / "data", vocab_size=300, val_fraction=0, progress=False, log=lines.append)

    report = meta["cleaning"]
    assert report["cleaners"] == {
        # key-1234 -> [KEY] removes 3 characters, key-99 one, key-5 none (the document still changed)
        "redact-keys": {"changed": {"documents": 2, "characters_removed": 4}, "dropped": {"documents": 0, "characters": 0}},
        "drop-drafts": {"changed": {"documents": 0, "characters_removed": 0},
                        "dropped": {"documents": 1, "characters": len(docs["c"])}},
    }
    assert report["kept"]["documents"] == meta["train"]["documents"] == 3
    printed = [line.split()[:5] for line in lines]
    assert ["redact-keys", "0", "documents", "-4", "characters"] in printed
    assert ["drop-drafts", "-1", "documents", f"-{len(docs['c'])}", "characters"] in printed
    data = TokenData(tmp_path / "data")
    text = data.tokenizer().decode(data.window("train", 0, data.tokens("train")).tolist())
    assert "Use [KEY] and [KEY] to open." in text and "No secrets here." in text
    assert "key-" not in text and "DRAFT" not in text


def test_a_cleaner_that_breaks_its_contract_is_named_and_nothing_is_written(cleaner_plugins, tmp_path):
    cleaner_plugins("miscounting")
    src = _corpus_files(tmp_path / "src")
    with pytest.raises(DataError, match="cleaner 'count-words' returned int"):
        prepare([src], tmp_path / "data", vocab_size=300, progress=False, log=lambda *_: None)
    assert not (tmp_path / "data").exists()


def test_demo_corpus_is_the_standard_library():
    from itertools import islice

    from llmkit.train.demo import stdlib_documents

    docs = list(islice(stdlib_documents(), 40))
    assert len(docs) == 40 and all(isinstance(t, str) and t for _, t in docs)


# ------------------------------------------------------------------ pretraining


def _torchrun(*args) -> list[str]:
    """Two processes on the CPU (gloo), through the real `llmkit` entry point (llmkit.cli)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llmkit.cli",
            *map(str, args)]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def test_pretrain_resumes_exactly_after_kill_9(prepared, tiny_yaml, tmp_path):
    steps = 40
    full = tmp_path / "full"
    r = subprocess.run(_pretrain_cmd(prepared, full, tiny_yaml, "--max-steps", steps), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    reference = _losses(full)
    assert sorted(reference) == list(range(1, steps + 1))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_pretrain_cmd(prepared, killed, tiny_yaml, "--max-steps", steps), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "latest").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = ckpt_mod.latest_checkpoint(killed / "checkpoints")
    assert last is not None
    at = json.loads((last / "state.json").read_text())["step"]
    assert at < steps, "the run finished before it could be killed"
    ckpt_mod.load_checkpoint(last)  # the last complete checkpoint loads

    r = subprocess.run(_pretrain_cmd(prepared, killed, tiny_yaml, "--max-steps", steps, "--resume"), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    resumed = _losses(killed)
    assert sorted(resumed) == list(range(1, steps + 1))  # one run's metrics: no repeated steps
    for step in range(at + 1, steps + 1):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step
    assert (killed / "loss.png").stat().st_size > 1000
    # the final model is an HF folder that llmkit and transformers load, with the same logits
    import llmkit
    from transformers import AutoModelForCausalLM

    llm = llmkit.load(full)
    ids = llm.tokenizer.encode("Document 3. alpha beta")
    hf = AutoModelForCausalLM.from_pretrained(str(full), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(llm.logits(ids), ref, atol=1e-4, rtol=1e-4)
    rows = read_metrics(full / "metrics.jsonl")
    val = [r for r in rows if "val_loss" in r]
    assert val and val[-1]["val_loss"] < val[0]["val_loss"] and "sample" in val[-1]


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    weights = {"w": torch.arange(6.0).view(2, 3)}
    ckpt_mod.save_checkpoint(tmp_path, 1, weights, {"state": {}, "param_groups": []}, {"a": 1})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        ckpt_mod.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2, 3)}, {}, {"a": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
    w, _, state = ckpt_mod.load_checkpoint(ckpt_mod.latest_checkpoint(tmp_path))
    assert torch.equal(w["w"], weights["w"]) and state["step"] == 1


def _one_vs_two_processes(prepared, tiny_yaml, tmp_path, steps: int, *extra) -> tuple[Path, Path, list[str]]:
    """Pretrain ``steps`` in one process (micro batch 2) and in two (torchrun, micro batch 1, the
    same global batch); assert their losses agree. Returns both folders and the torchrun command."""
    one = tmp_path / "one"
    r = subprocess.run(_pretrain_cmd(prepared, one, tiny_yaml, "--max-steps", steps, "--micro-batch-size", 2),
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two"
    cmd = _torchrun("pretrain", "--data", prepared, "--out", two, "--config", tiny_yaml, "--quiet", "--max-steps",
                    steps, "--device", "cpu", *extra)
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    return one, two, cmd


def test_two_processes_match_one_with_the_same_global_batch(prepared, tiny_yaml, tmp_path):
    _one_vs_two_processes(prepared, tiny_yaml, tmp_path, 4)


def test_fsdp_matches_one_process_saves_full_checkpoints_and_resumes(prepared, tiny_yaml, tmp_path):
    from safetensors.torch import load_file

    import llmkit

    steps = 6  # checkpoints at 5 and 6
    one, fsdp, cmd = _one_vs_two_processes(prepared, tiny_yaml, tmp_path, steps, "--strategy", "fsdp")
    b = _losses(fsdp)
    assert json.loads((fsdp / "checkpoints" / "step-00000006" / "state.json").read_text())["settings"]["strategy"] == "fsdp"

    # rank 0 wrote full tensors, the same as one process's, not shards
    for step in (5, 6):
        name = f"checkpoints/step-{step:08d}/model.safetensors"
        mine, ref = load_file(str(fsdp / name)), load_file(str(one / name))
        assert mine.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(mine[k], ref[k], atol=1e-4, rtol=1e-4)
    # the final model: an HF folder that llmkit loads, computing what the one-process model computes
    ids = llmkit.load(one).tokenizer.encode("Document 3. alpha beta")
    torch.testing.assert_close(llmkit.load(fsdp).logits(ids), llmkit.load(one).logits(ids), atol=1e-4, rtol=1e-4)

    # cut back to step 5, as if killed there, and resume under FSDP: the same step 6
    import shutil

    shutil.rmtree(fsdp / "checkpoints" / "step-00000006")
    (fsdp / "checkpoints" / "latest").write_text("step-00000005\n")
    r = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = _losses(fsdp)
    assert sorted(resumed) == list(range(1, steps + 1))
    assert resumed[6] == pytest.approx(b[6], abs=1e-6)


def test_fsdp_needs_several_processes(prepared, tiny_yaml, tmp_path):
    r = subprocess.run(_pretrain_cmd(prepared, tmp_path / "x", tiny_yaml, "--max-steps", 1, "--strategy", "fsdp"),
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "torchrun" in r.stderr and "Traceback" not in r.stderr


def test_bad_settings_are_clear_errors(prepared, tmp_path):
    r = subprocess.run(_pretrain_cmd(prepared, tmp_path / "x", "huge"), env=_env(), capture_output=True, text=True)
    assert r.returncode == 1 and "neither a preset" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(_pretrain_cmd(tmp_path / "nodata", tmp_path / "x", "tiny"), env=_env(), capture_output=True,
                       text=True)
    assert r.returncode == 1 and "llmkit prepare" in r.stderr


def test_cli_lists_the_training_commands(tmp_path):
    env = dict(_env(), LLMKIT_HOME=str(tmp_path))
    out = subprocess.run([str(LLMKIT), "--help"], env=env, capture_output=True, text=True).stdout
    for command in ("prepare", "pretrain", "finetune"):
        assert f"  {command} " in out, command
        r = subprocess.run([str(LLMKIT), command, "--help"], env=env, capture_output=True, text=True)
        assert r.returncode == 0 and f"Usage: llmkit {command}" in r.stdout
