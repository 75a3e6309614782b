"""Pretraining on prepared data (data preparation itself: test_prepare.py): exact resume after kill -9,
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
from llmkit.train.data import prepare
from llmkit.train.errors import CheckpointError, TrainConfigError
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
    # random Greek-letter words are no language and fail the web-quality rules: filters off
    prepare([src], root / "data", vocab_size=300, val_fraction=0.1, lang=None, quality=False, progress=False,
            log=lambda *_: None)
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


# ------------------------------------------------------------------ prepare (more in test_prepare.py)


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
    # nothing the killed process had half-written is left (temporary folders, their locks)
    assert [p.name for p in killed.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")] == []
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


QUIET = {"progress": False, "log": lambda *_: None}


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time: to show nothing changed."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_training_into_a_non_empty_out_is_refused_and_touches_nothing(prepared, tiny_yaml, tmp_path):
    from llmkit.train.finetune import finetune
    from llmkit.train.pretrain import pretrain

    out = tmp_path / "run"
    pretrain(prepared, out, str(tiny_yaml), max_steps=3, **QUIET)
    before = _files(out)
    r = subprocess.run(_pretrain_cmd(prepared, out, tiny_yaml, "--max-steps", 2), env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "not empty" in r.stderr and "--resume" in r.stderr and "--overwrite" in r.stderr
    with pytest.raises(TrainConfigError, match="--resume.*--overwrite"):
        finetune("any-model", tmp_path / "train.jsonl", out, **QUIET)  # refused before reading anything
    with pytest.raises(TrainConfigError, match="give one of them"):
        pretrain(prepared, out, str(tiny_yaml), resume=True, overwrite=True, **QUIET)
    assert _files(out) == before

    # a folder no run wrote: neither continued nor deleted
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for flags, message in (({}, "not empty"), ({"resume": True}, "no run.json"),
                           ({"overwrite": True}, "no training run wrote")):
        with pytest.raises(TrainConfigError, match=message):
            pretrain(prepared, mine, str(tiny_yaml), max_steps=2, **flags, **QUIET)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def _run_id(out: Path) -> str | None:
    path = out / "run.json"
    return json.loads(path.read_text())["run_id"] if path.exists() else None


def test_overwrite_replaces_the_earlier_run_and_keeps_the_new_checkpoints(prepared, tiny_yaml, tmp_path):
    from llmkit.train.pretrain import pretrain

    out = tmp_path / "run"
    pretrain(prepared, out, str(tiny_yaml), max_steps=10, **QUIET)  # checkpoints at steps 5 and 10
    first = _run_id(out)
    pretrain(prepared, out, str(tiny_yaml), max_steps=3, checkpoint_interval=1, overwrite=True, **QUIET)
    ckpts = out / "checkpoints"
    # the earlier run's later steps neither survive nor push the new run's checkpoints out
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    assert (ckpts / "latest").read_text().strip() == "step-00000003"
    run_id = _run_id(out)
    assert run_id not in (None, first)
    assert json.loads((ckpts / "step-00000003" / "state.json").read_text())["run_id"] == run_id
    assert sorted(_losses(out)) == [1, 2, 3]
    assert ckpt_mod.latest_checkpoint(ckpts, run_id).name == "step-00000003"


def test_pruning_and_latest_only_concern_their_own_run(tmp_path):
    weights = {"w": torch.zeros(2)}
    for step in (100, 200):
        ckpt_mod.save_checkpoint(tmp_path, step, weights, {}, {}, keep=2, run_id="a")
    ckpt_mod.save_checkpoint(tmp_path, 10, weights, {}, {}, keep=2, run_id="b")
    assert [p.name for p in ckpt_mod.list_checkpoints(tmp_path, "b")] == ["step-00000010"]
    assert [p.name for p in ckpt_mod.list_checkpoints(tmp_path, "a")] == ["step-00000100", "step-00000200"]
    (tmp_path / "latest").write_text("step-00000200\n")  # pointing at the other run's checkpoint
    assert ckpt_mod.latest_checkpoint(tmp_path, "b").name == "step-00000010"
    assert ckpt_mod.latest_checkpoint(tmp_path, "c") is None


def test_resume_continues_the_run_in_out_with_its_own_config_and_budget(prepared, tiny_yaml, tmp_path):
    import shutil

    from llmkit.train.pretrain import pretrain

    full = tmp_path / "full"
    pretrain(prepared, full, str(tiny_yaml), max_steps=8, **QUIET)  # checkpoints at 5 and 8
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)  # the same run, as if killed right after its step-5 checkpoint
    shutil.rmtree(cut / "checkpoints" / "step-00000008")
    (cut / "checkpoints" / "latest").write_text("step-00000005\n")

    with pytest.raises(CheckpointError, match="lr=0.003"):
        pretrain(prepared, cut, str(tiny_yaml), resume=True, lr=0.01, **QUIET)
    with pytest.raises(CheckpointError, match="another model_config"):  # the same settings, another model
        pretrain(prepared, cut, "tiny", resume=True, batch_size=4, seq_len=32, warmup_steps=3, **QUIET)
    summary = pretrain(prepared, cut, resume=True, **QUIET)  # neither config nor budget given again
    assert summary["step"] == 8
    reference, resumed = _losses(full), _losses(cut)
    assert sorted(resumed) == list(range(1, 9))
    for step in (6, 7, 8):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


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
