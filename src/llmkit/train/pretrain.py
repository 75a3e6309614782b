"""``llmkit pretrain``: train a small model from scratch on a prepared token folder."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import torch

from llmkit.config import ModelConfig
from llmkit.train.data import TokenData
from llmkit.train.errors import DataError, TrainConfigError
from llmkit.train.loop import TrainSettings, setup_distributed, teardown_distributed, token_loss_sum, train

# Named sizes. The vocabulary comes from the data folder; the context from seq_len.
PRESETS: dict[str, dict[str, Any]] = {
    # ~1.3M parameters with a 4k vocabulary: minutes on 2 CPU cores
    "tiny": {
        "model": dict(architecture="llama", hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                      num_kv_heads=4, tie_embeddings=True, norm_eps=1e-5, rope_theta=10000.0),
        "train": dict(seq_len=128, batch_size=16, lr=3e-3, warmup_steps=50, max_steps=800, weight_decay=0.1,
                      eval_interval=100, eval_batches=16, checkpoint_interval=100),
    },
    # ~20M parameters (with a 16k vocabulary): for a GPU or an afternoon on a laptop
    "small": {
        "model": dict(architecture="llama", hidden_size=384, intermediate_size=1024, num_layers=8, num_heads=6,
                      num_kv_heads=6, tie_embeddings=True, norm_eps=1e-5, rope_theta=10000.0),
        "train": dict(seq_len=512, batch_size=32, lr=1e-3, warmup_steps=200, max_steps=5000, weight_decay=0.1,
                      eval_interval=250, eval_batches=32, checkpoint_interval=250),
    },
}


def load_run_config(config: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model fields, training settings) of a preset name or a YAML file.

    YAML: ``preset: tiny`` (optional base), ``model: {...}`` (ModelConfig fields),
    ``train: {...}`` (TrainSettings fields)."""
    if config in PRESETS:
        preset = PRESETS[config]
        return dict(preset["model"]), dict(preset["train"])
    path = Path(config)
    if not path.exists():
        raise TrainConfigError(f"--config {config!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TrainConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict) or set(data) - {"preset", "model", "train"}:
        raise TrainConfigError(f"{path}: expected the keys preset, model and train")
    model, settings = ({}, {})
    if data.get("preset"):
        model, settings = load_run_config(str(data["preset"]))
    model.update(data.get("model") or {})
    settings.update(data.get("train") or {})
    return model, settings


class PretrainTask:
    """Random windows of the token stream; the window starts of step k depend only on (seed, k)."""

    def __init__(self, data: TokenData, settings: TrainSettings, tokenizer):
        self.data, self.s, self.tokenizer = data, settings, tokenizer
        self.n = data.tokens("train")
        if self.n < settings.seq_len + 2:
            raise DataError(f"{data.folder}: {self.n} training tokens, fewer than one sequence of "
                            f"{settings.seq_len}: prepare more text or lower seq_len")
        self._val: torch.Tensor | None = None

    def _rows(self, split: str, starts) -> torch.Tensor:
        t = self.s.seq_len
        return torch.from_numpy(__import__("numpy").stack([self.data.window(split, int(a), t + 1) for a in starts]))

    def micro_batches(self, step, rank, world, micro, accum):
        g = torch.Generator().manual_seed(self.s.seed * 7919 + step)
        starts = torch.randint(0, self.n - self.s.seq_len - 1, (self.s.batch_size,), generator=g).tolist()
        mine = starts[rank * micro * accum : (rank + 1) * micro * accum]
        out = []
        for i in range(accum):
            rows = self._rows("train", mine[i * micro : (i + 1) * micro])
            out.append((rows[:, :-1], rows[:, 1:]))
        return out, self.s.batch_size * self.s.seq_len

    def _val_rows(self) -> torch.Tensor | None:
        if self._val is None:
            t = self.s.seq_len
            n = max(0, (self.data.tokens("val") - 1) // t)
            n = min(n, self.s.eval_batches * max(1, self.s.micro_batch_size or self.s.batch_size))
            self._val = self._rows("val", [i * t for i in range(n)]) if n else torch.empty(0, t + 1, dtype=torch.long)
        return self._val if len(self._val) else None

    def evaluate(self, model) -> dict[str, Any]:
        rows = self._val_rows()
        result: dict[str, Any] = {}
        device = next(model.parameters()).device
        if rows is not None:
            total, count = 0.0, 0
            bs = max(1, self.s.micro_batch_size or self.s.batch_size)
            for i in range(0, len(rows), bs):
                chunk = rows[i : i + bs].to(device)
                total += float(token_loss_sum(model(chunk[:, :-1]), chunk[:, 1:]))
                count += chunk[:, 1:].numel()
            result["val_loss"] = total / count
            result["val_ppl"] = math.exp(min(result["val_loss"], 50))
        result["sample"] = sample_text(model, self.tokenizer, [self.data.meta["separator_id"]], 40,
                                       seed=self.s.seed)
        return result

    def trainable_state(self, model):
        return model.state_dict()

    def load_trainable(self, model, weights):
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_embeddings)]
        if missing or unexpected:
            raise DataError(f"checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.tie_weights()

    def export(self, model, out):
        export_hf_into(model, self.tokenizer, out)


@torch.no_grad()
def sample_text(model, tokenizer, prompt: list[int], max_new: int, temperature: float = 0.8, top_k: int = 40,
                seed: int = 0) -> str:
    """A short sample without a KV cache (tiny models, a few dozen tokens). Its own generator: the
    training run's random numbers are not touched. Always ``max_new`` forward passes, cut at the
    first end of sequence afterwards: under FSDP every process must run the same passes."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    ids = list(prompt)
    limit = model.config.max_position_embeddings
    for _ in range(max_new):
        x = torch.tensor([ids[-limit:]], device=device)
        logits = model(x, last_only=True)[0, -1].float() / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g)))
    new, eos = ids[len(prompt):], tokenizer.eos_token_ids
    ends = [i for i, token in enumerate(new) if token in eos]
    return tokenizer.decode(new[: ends[0]] if ends else new, skip_special_tokens=True)


def export_hf_into(model, tokenizer, out: str | Path) -> None:
    """Write the model in HF format into ``out`` beside what is there (checkpoints, metrics): saved
    whole into a temporary sibling first, then each file moved in with an atomic rename."""
    from llmkit.formats.hf import save_hf
    from llmkit.fsutil import scratch_dir

    out = Path(out)
    with scratch_dir(out, "export") as tmp:
        was = model.training
        model.eval()
        save_hf(model, tokenizer, tmp / "model")
        model.train(was)
        for f in (tmp / "model").iterdir():
            os.replace(f, out / f.name)


def build_config(model_fields: dict[str, Any], data: TokenData, seq_len: int) -> ModelConfig:
    fields = dict(model_fields)
    fields.setdefault("vocab_size", data.vocab_size)
    if fields["vocab_size"] < data.vocab_size:
        raise TrainConfigError(f"vocab_size {fields['vocab_size']} is smaller than the data's {data.vocab_size}")
    fields.setdefault("max_position_embeddings", seq_len)
    sep = data.meta["separator_id"]
    fields.setdefault("bos_token_id", sep)
    fields.setdefault("eos_token_id", sep)
    fields.setdefault("name", "llmkit-pretrained")
    try:
        return ModelConfig.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise TrainConfigError(f"model settings: {exc}") from None


def pretrain(data: str | Path, out: str | Path, config: str | None = None, *, resume: bool = False,
             overwrite: bool = False, progress: bool = True, device: str | None = None, log=print,
             **overrides: Any) -> dict[str, Any]:
    """Pretrain a model from scratch on a ``llmkit prepare`` folder. ``overrides``: TrainSettings
    fields (max_steps, max_tokens, max_minutes, batch_size, lr, seed, ...).

    ``out`` must be empty or missing, unless ``resume`` (continue the run there, with its own
    budget unless one is given) or ``overwrite`` (replace the earlier run there). ``config``: a
    preset or YAML file; by default ``tiny``, or on resume the one the run started with."""
    from llmkit.model import Transformer
    from llmkit.train.checkpoint import plan_run
    from llmkit.train.loop import BUDGET, keep_run_budget

    run = plan_run(out, "pretrain", resume=resume, overwrite=overwrite)  # before anything else: refuse early
    if config is None:
        config = run.recorded.get("describe", {}).get("config") or "tiny"
    model_fields, settings_fields = load_run_config(config)
    s = TrainSettings.from_dict(copy.deepcopy(settings_fields))
    if any(overrides.get(k) is not None for k in ("max_tokens", "max_minutes")) and overrides.get("max_steps") is None:
        s.max_steps = None  # the preset's step count gives way to the budget the user asked for
    s.update(**overrides)
    keep_run_budget(s, run, any(overrides.get(k) is not None for k in BUDGET))
    tokens = TokenData(data)
    if tokens.tokens("val") == 0 and progress:
        log("note: the data folder has no validation split; no validation loss will be reported")
    model_config = build_config(model_fields, tokens, s.seq_len)
    if s.seq_len > model_config.max_position_embeddings:
        raise TrainConfigError(f"seq_len {s.seq_len} exceeds the model context {model_config.max_position_embeddings}")
    d = setup_distributed(device)
    try:
        torch.manual_seed(s.seed)
        model = Transformer(model_config)
        model.init_weights()
        model.init_buffers()
        tokenizer = tokens.tokenizer()
        task = PretrainTask(tokens, s, tokenizer)
        if d.main:
            n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
            log(f"model: {model_config.architecture}, {model_config.num_layers} layers, hidden "
                f"{model_config.hidden_size}, {n_params / 1e6:.2f}M parameters, vocabulary {model_config.vocab_size}; "
                f"{d.world} process(es) on {d.device}" + (f" ({s.strategy})" if d.world > 1 else ""))
        baseline = tokens.meta.get("unigram_val_loss")
        describe = {"model_config": model_config.to_dict(), "data": str(Path(data).resolve()), "config": config}
        summary = train(model, task, s, out, d=d, resume=resume, run=run, progress=progress, baseline=baseline,
                        log=log, describe=describe)
        summary["unigram_val_loss"] = baseline
        return summary
    finally:
        teardown_distributed()
