"""Fault injection: ``kill -9`` of ``llmkit pull`` and of ``llmkit pretrain`` at random moments.

Part 1 (pull): a fresh store (its own LLMKIT_HOME); a model this script builds (an HF-format
folder and the same model as a GGUF file, large enough that copying and hashing take a moment).
Each round starts ``llmkit pull`` of one of them (a first pull, or ``--force`` over a stored
copy), waits until the pull is at work (its temporary folder exists), then kills it with SIGKILL
after a random delay. At the end ``llmkit list`` must succeed, every listed model must verify
against its manifest and load and generate, and no temporary folder may be left.

Part 2 (pretrain): a small corpus and a tiny model; one uninterrupted reference run; then the
same run killed at random moments, each time continued with ``--resume``, until it finishes.
Its per-step losses and its final weights must equal the reference's.

    OMP_NUM_THREADS=1 .venv/bin/python bench/faults.py            # both parts, 10 kills each
    .venv/bin/python bench/faults.py --rounds 3 --part pretrain

Prints a table and writes bench/faults-results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLMKIT = [sys.executable, "-m", "llmkit.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **extra)
    env.pop("LLMKIT_DEBUG", None)
    return env


def _kill_after(cmd: list[str], env: dict, started, delay: float, log: Path, deadline_s: float = 300) -> dict:
    """Start ``cmd`` (its output to ``log``); once ``started()`` is true, wait ``delay`` seconds and
    SIGKILL it, unless it has ended by then. Returns whether it was killed and how long it had been
    at work (since ``started()``)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while not started() and proc.poll() is None:
        if time.monotonic() - t0 > deadline_s:
            proc.kill()
            raise RuntimeError(f"{' '.join(cmd)} never started its work")
        time.sleep(0.002)
    at = time.monotonic()
    try:
        proc.wait(timeout=delay)
        killed = False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = True
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {log.read_text()[-2000:]}")
    return {"killed": killed, "at_work_s": round(time.monotonic() - at, 3)}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


# ------------------------------------------------------------------ part 1: pull


def _build_model(folder: Path) -> tuple[Path, Path]:
    """An HF-format Llama folder (random weights, a BPE tokenizer trained here) and its GGUF."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    import llmkit
    from llmkit.export import export

    hf = folder / "faults-model"
    hf.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7919 % 1000}" for i in range(2000)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(hf)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(hf, safe_serialization=True)
    gguf = export(llmkit.load(hf), "gguf", folder / "faults-model.gguf")
    return hf, gguf


def _check_store(home: Path) -> dict:
    """``llmkit list`` as a user runs it, then every stored model verified, loaded and run, and
    no temporary folder left in the store."""
    listed = subprocess.run([*LLMKIT, "list"], env=_env(LLMKIT_HOME=str(home)), capture_output=True, text=True,
                            timeout=300)
    os.environ["LLMKIT_HOME"] = str(home)
    try:
        import llmkit
        from llmkit import store

        models = {}
        for m in store.list_models():
            text = llmkit.load(m.name).generate("the quick brown", max_tokens=3, temperature=0)
            models[m.name] = {"format": m.format, "verified": store.verify(m.name), "generated": isinstance(text, str)}
    finally:
        del os.environ["LLMKIT_HOME"]
    tmp = home / "tmp"
    debris = _hidden(home / "models") + (sorted(os.listdir(tmp)) if tmp.is_dir() else [])
    ok = listed.returncode == 0 and bool(models) and all(all(v.values()) for v in models.values()) and not debris
    return {"list_exit": listed.returncode, "models": models,
            "debris": debris, "ok": ok}


def part_pull(rounds: int, rng: random.Random, work: Path) -> dict:
    hf, gguf = _build_model(work / "src")
    log = work / "pull.log"

    def pull(home: Path, src: Path, name: str, force: bool, delay: float) -> dict:
        tmp = home / "tmp"
        before = set(os.listdir(tmp)) if tmp.is_dir() else set()

        def at_work() -> bool:  # its own temporary folder exists (stale ones of a killed pull do not count)
            return tmp.is_dir() and bool(set(os.listdir(tmp)) - before)

        cmd = [*LLMKIT, "pull", str(src), "--name", name, "--quiet"] + (["--force"] if force else [])
        return _kill_after(cmd, _env(LLMKIT_HOME=str(home)), at_work, delay, log)

    # how long a pull is at work, uninterrupted (into a scratch store): the kills fall in that span
    whole = max(pull(work / "scratch", hf, "probe", False, 1e9)["at_work_s"],
                pull(work / "scratch", gguf, "probe-gguf", False, 1e9)["at_work_s"])
    shutil.rmtree(work / "scratch")

    home = work / "store"
    rows = []
    for i in range(rounds):
        kind, src = (("hf", hf), ("gguf", gguf))[i % 2]
        name = f"m-{kind}"
        force = (home / "models" / name).exists()  # a stored copy: --force replaces it
        delay = rng.uniform(0, whole)
        event = pull(home, src, name, force, delay)
        models = home / "models"
        rows.append({"round": i + 1, "source": kind, "force": force, "delay_s": round(delay, 3), **event,
                     "stored_after": sorted(p.name for p in models.iterdir() if not p.name.startswith("."))
                     if models.is_dir() else [],
                     "temporaries_left": len(os.listdir(home / "tmp")) if (home / "tmp").is_dir() else 0})
    check = _check_store(home)
    # then the store must still take new pulls: each model the kills kept out, pulled uninterrupted
    for kind, src in (("hf", hf), ("gguf", gguf)):
        if not (home / "models" / f"m-{kind}").exists():
            pull(home, src, f"m-{kind}", False, 1e9)
    after = _check_store(home)
    return {"pull_at_work_s_uninterrupted": whole, "rounds": rows, "after_the_kills": check,
            "after_pulling_again": after, "ok": check["ok"] and after["ok"] and len(after["models"]) == 2}


# ------------------------------------------------------------------ part 2: pretrain


TRAIN_YAML = """\
model: {architecture: llama, hidden_size: 64, intermediate_size: 192, num_layers: 2, num_heads: 4,
        num_kv_heads: 4, tie_embeddings: true}
train: {seq_len: 64, batch_size: 8, lr: 0.003, warmup_steps: 10, eval_interval: 60, eval_batches: 2,
        checkpoint_interval: 5, log_interval: 1}
"""


def _prepare_data(folder: Path) -> Path:
    import inspect

    from llmkit.train.data import prepare

    src = folder / "corpus"
    src.mkdir(parents=True)
    rng = random.Random(0)
    words = ("model data token train loss step weight layer head batch cache query value key value "
             "the a of to and in is for on with as by at from it this that be").split()
    for i in range(60):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(12)]
        (src / f"doc{i:03d}.txt").write_text(" ".join(sentences) + "\n")
    options = {"vocab_size": 512, "val_fraction": 0.1, "progress": False, "log": lambda *_: None}
    accepted = inspect.signature(prepare).parameters
    # the corpus is synthetic: language and web-quality filters (where this version has them) off
    options.update({k: v for k, v in (("lang", None), ("quality", False)) if k in accepted})
    prepare([src], folder / "data", **options)
    return folder / "data"


def _losses(out: Path) -> dict[int, float]:
    from llmkit.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def part_pretrain(rounds: int, rng: random.Random, work: Path, steps: int) -> dict:
    import torch

    data = _prepare_data(work)
    config = work / "tiny.yaml"
    config.write_text(TRAIN_YAML)

    def cmd(out: Path, *extra: str) -> list[str]:
        return [*LLMKIT, "pretrain", "--data", str(data), "--config", str(config), "--out", str(out),
                "--max-steps", str(steps), "--quiet", *extra]

    log = work / "pretrain.log"

    def looping(out: Path):
        """True once the run's loop is about to start: it (re)opens metrics.jsonl right before the
        first step, after the imports, the data and the checkpoint are loaded."""
        since = time.time()
        metrics = out / "metrics.jsonl"
        return lambda: metrics.exists() and metrics.stat().st_mtime >= since

    ref = work / "reference"
    whole = _kill_after(cmd(ref), _env(), looping(ref), 1e9, log)["at_work_s"]

    run = work / "killed"
    rows = []
    from llmkit.train.checkpoint import latest_checkpoint, read_run

    at = 0
    moments = sorted(rng.random() for _ in range(rounds))  # where in the run each kill falls, in order
    for i in range(rounds):
        # the process starts again from checkpoint ``at``: the kill falls at moment i of the whole
        # run as the uninterrupted run paced it, or, when the run is already past that moment, at a
        # random moment of the next 1/rounds of it
        delay = (moments[i] - at / steps) * whole
        if delay <= 0:
            delay = rng.uniform(0, whole / rounds)
        event = _kill_after(cmd(run, "--resume"), _env(), looping(run), delay, log)
        recorded = read_run(run) if run.is_dir() else None
        last = latest_checkpoint(run / "checkpoints", recorded["run_id"]) if recorded else None
        at = json.loads((last / "state.json").read_text())["step"] if last else 0
        rows.append({"round": i + 1, "delay_s": round(delay, 3), **event, "checkpoint_step": at,
                     "temporaries_left": len(_hidden(run) + _hidden(run / "checkpoints"))})
    t0 = time.monotonic()
    final = subprocess.run(cmd(run, "--resume"), env=_env(), capture_output=True, text=True, timeout=900)
    finish = time.monotonic() - t0

    reference, resumed = _losses(ref), _losses(run)
    same_steps = sorted(resumed) == sorted(reference) == list(range(1, steps + 1))
    loss_diff = max((abs(resumed[s] - reference[s]) for s in reference if s in resumed), default=float("nan"))
    a, b = _weights(ref), _weights(run)
    bitwise = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    max_weight_diff = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else float("nan")
    debris = _hidden(run) + _hidden(run / "checkpoints")
    ok = final.returncode == 0 and same_steps and loss_diff == 0.0 and bitwise and not debris
    return {"steps": steps, "training_s_uninterrupted": whole, "rounds": rows,
            "final_resume_exit": final.returncode, "final_resume_seconds": round(finish, 2),
            "metrics_one_row_per_step": same_steps, "max_loss_difference": loss_diff,
            "final_weights_bitwise_equal": bitwise, "max_weight_difference": max_weight_diff,
            "temporaries_left": debris, "ok": ok}


# ------------------------------------------------------------------ report


def _table(title: str, rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = [title, "  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="kills per part")
    parser.add_argument("--steps", type=int, default=120, help="pretraining steps of the run killed")
    parser.add_argument("--part", choices=["pull", "pretrain", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0, help="the random kill moments")
    parser.add_argument("--out", default=str(HERE / "faults-results.json"))
    args = parser.parse_args()

    rng = random.Random(args.seed)
    command = " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}", sys.executable, *sys.argv])
    results = {"command": command, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "load_average_at_start": os.getloadavg()[0], "seed": args.seed}
    with tempfile.TemporaryDirectory(prefix="llmkit-faults-") as tmp:
        work = Path(tmp)
        if args.part in ("pull", "both"):
            results["pull"] = part_pull(args.rounds, rng, work / "pull")
            print(_table("kill -9 of llmkit pull", results["pull"]["rounds"],
                         ["round", "source", "force", "delay_s", "killed", "stored_after", "temporaries_left"]))
            for when in ("after_the_kills", "after_pulling_again"):
                c = results["pull"][when]
                print(f"{when.replace('_', ' ')}: llmkit list exit {c['list_exit']}; models {c['models']}; "
                      f"temporaries left {c['debris'] or 'none'} -> {'OK' if c['ok'] else 'FAILED'}")
            print()
        if args.part in ("pretrain", "both"):
            results["pretrain"] = r = part_pretrain(args.rounds, rng, work / "pretrain", args.steps)
            print(_table(f"kill -9 of llmkit pretrain ({args.steps} steps, each round resumed with --resume)",
                         r["rounds"], ["round", "delay_s", "killed", "checkpoint_step", "temporaries_left"]))
            print(f"final --resume exit {r['final_resume_exit']}; one metrics row per step: "
                  f"{r['metrics_one_row_per_step']}; max loss difference to the uninterrupted run: "
                  f"{r['max_loss_difference']}; final weights bitwise equal: {r['final_weights_bitwise_equal']} "
                  f"(max difference {r['max_weight_difference']}); temporaries left: "
                  f"{r['temporaries_left'] or 'none'} -> {'OK' if r['ok'] else 'FAILED'}")
    results["ok"] = all(results[p]["ok"] for p in ("pull", "pretrain") if p in results)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    sys.exit(0 if results["ok"] else 1)


if __name__ == "__main__":
    main()
