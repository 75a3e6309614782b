"""``llmkit finetune``: supervised fine-tuning of a loaded model, with LoRA or all weights.

Examples are JSONL lines in one of four formats, detected per line:

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}   chat
    {"instruction": ..., "input": ... (optional), "output": ...}                              instruction
    {"prompt": ..., "completion": ...}                                                        completion
    {"text": ...}                                                                             plain text

Chat and instruction examples are rendered with the base model's chat template, exactly as
``LLM.chat`` renders a conversation at inference; the loss covers only the assistant turns (their
text and the template's end-of-turn marker), found by rendering the conversation turn by turn.
Completion examples are plain text, prompt then completion then end-of-sequence, with the loss on
the completion. Text examples are learned whole.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from llmkit.train.data import read_jsonl
from llmkit.train.errors import DataError, TrainConfigError
from llmkit.train.loop import TrainSettings, setup_distributed, teardown_distributed, token_loss_sum, train

ROLES = {"system", "user", "assistant", "tool", "developer"}


class Example:
    __slots__ = ("ids", "mask", "where")

    def __init__(self, ids: list[int], mask: list[bool], where: str):
        self.ids, self.mask, self.where = ids, mask, where  # mask[i]: token i is learned

    @property
    def targets(self) -> int:
        return sum(self.mask[1:])


def _str(row: dict, key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def to_messages(row: dict, where: str) -> tuple[str, Any]:
    """(format, content): messages for chat and instruction rows, (prompt, completion) or text."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise DataError(f"{where}: message {i} must be {{\"role\": one of {sorted(ROLES)}, "
                                f"\"content\": a string}}, got {str(m)[:80]}")
        return "chat", [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in row:
        instruction = _str(row, "instruction", where)
        extra = _str(row, "input", where, required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
        return "chat", messages + [{"role": "user", "content": user},
                                   {"role": "assistant", "content": _str(row, "output", where)}]
    if "prompt" in row or "completion" in row:
        return "completion", (_str(row, "prompt", where), _str(row, "completion", where))
    if "text" in row:
        return "text", _str(row, "text", where)
    raise DataError(f"{where}: unknown format (keys {sorted(row)}); use 'messages', 'instruction'/'output', "
                    "'prompt'/'completion' or 'text'")


def _chat_example(tokenizer, messages: list[dict], where: str, train_on_prompt: bool) -> tuple[list[int], list[bool]]:
    full = tokenizer.apply_chat_template(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(f"{where}: the chat template does not render this conversation turn by turn, so the "
                            "assistant's tokens cannot be told apart; use --train-on-prompt or the completion format")
        spans.append((len(before), len(through)))
    if not spans and not train_on_prompt:
        raise DataError(f"{where}: no assistant message to learn from")
    encoding = tokenizer.backend.encode(full, add_special_tokens=False)
    mask = [train_on_prompt or any(a <= start < b for a, b in spans) for start, _ in encoding.offsets]
    return list(encoding.ids), mask


def encode_example(tokenizer, row: dict, where: str, train_on_prompt: bool = False) -> Example:
    kind, content = to_messages(row, where)
    if kind == "chat":
        ids, mask = _chat_example(tokenizer, content, where, train_on_prompt)
    elif kind == "completion":
        prompt, completion = content
        p = tokenizer.encode(prompt, add_special_tokens=True)
        if p and tokenizer.eos_token_id is not None and p[-1] == tokenizer.eos_token_id and tokenizer.add_eos_token:
            p = p[:-1]
        c = tokenizer.encode(completion) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        ids, mask = p + c, [train_on_prompt] * len(p) + [True] * len(c)
    else:
        ids = tokenizer.encode(content, add_special_tokens=True)
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        mask = [True] * len(ids)
    return Example(ids, mask, where)


def load_examples(path: str | Path, tokenizer, max_len: int, context: int, train_on_prompt: bool = False
                  ) -> list[Example]:
    """Every line of ``path`` as an Example; any bad line is an error that names it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    examples = []
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        ex = encode_example(tokenizer, row, where, train_on_prompt)
        if len(ex.ids) > max_len:
            hint = (f"raise --max-seq-len (the model's context is {context})" if max_len < context
                    else "shorten or split it")
            raise DataError(f"{where}: {len(ex.ids)} tokens, longer than the limit of {max_len}: {hint}")
        if len(ex.ids) < 2 or ex.targets == 0:
            raise DataError(f"{where}: nothing to learn (no answer tokens after the first token)")
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


class FinetuneTask:
    """Examples in a fresh random order each epoch; step k's rows depend only on (seed, k)."""

    def __init__(self, model, tokenizer, train_set: list[Example], val_set: list[Example] | None,
                 s: TrainSettings, lora: dict | None, base: str, pad_id: int):
        self.model, self.tokenizer, self.train_set, self.val_set = model, tokenizer, train_set, val_set
        self.s, self.lora, self.base, self.pad_id = s, lora, base, pad_id
        self._orders: dict[int, list[int]] = {}
        self.adapter_only = False
        self.peft_form = lora is not None  # the LoRA layers have PEFT names: OUT/adapter is written

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.s.seed * 104_729 + epoch)
            self._orders = {epoch: torch.randperm(len(self.train_set), generator=g).tolist()}
        return self._orders[epoch]

    def _pick(self, k: int) -> Example:
        n = len(self.train_set)
        return self.train_set[self._order(k // n)[k % n]]

    def collate(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(e.ids) for e in examples) - 1
        x = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(examples), width), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.ids) - 1
            x[i, :n] = torch.tensor(e.ids[:-1])
            y[i, :n] = torch.tensor([t if m else -100 for t, m in zip(e.ids[1:], e.mask[1:])])
        return x, y

    def micro_batches(self, step, rank, world, micro, accum):
        b = self.s.batch_size
        rows = [self._pick(step * b + j) for j in range(b)]
        count = sum(e.targets for e in rows)
        mine = rows[rank * micro * accum : (rank + 1) * micro * accum]
        return [self.collate(mine[i * micro : (i + 1) * micro]) for i in range(accum)], count

    def evaluate(self, model) -> dict[str, Any]:
        if not self.val_set:
            return {}
        device = next(model.parameters()).device
        total, count, right = 0.0, 0, 0
        bs = max(1, self.s.micro_batch_size or self.s.batch_size)
        for i in range(0, len(self.val_set), bs):
            x, y = self.collate(self.val_set[i : i + bs])
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total += float(token_loss_sum(logits, y))
            keep = y != -100
            count += int(keep.sum())
            right += int(((logits.argmax(-1) == y) & keep).sum())
        loss = total / max(1, count)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_token_acc": right / max(1, count)}

    def trainable_state(self, model):
        if self.lora is not None:
            from llmkit.train.lora import lora_state

            return lora_state(model)
        return model.state_dict()

    def load_trainable(self, model, weights):
        if self.lora is not None:
            from llmkit.train.lora import load_lora_state

            load_lora_state(model, weights)
        else:
            missing, unexpected = model.load_state_dict(weights, strict=False)
            missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_embeddings)]
            if missing or unexpected:
                raise DataError(f"checkpoint does not match the model (missing {missing[:3]})")
            model.tie_weights()

    def export(self, model, out):
        from llmkit.train.pretrain import export_hf_into

        out = Path(out)
        if self.lora is not None:
            from llmkit.train.lora import merge_lora, save_adapter

            if self.adapter_only or self.peft_form:
                save_adapter(model, out if self.adapter_only else out / "adapter", base=self.base,
                             rank=self.lora["rank"], alpha=self.lora["alpha"], dropout=self.lora["dropout"])
            if self.adapter_only:
                return
            merge_lora(model)
        export_hf_into(model, self.tokenizer, out)


def finetune(base: str, data: str | Path, out: str | Path, *, val: str | Path | None = None, method: str = "lora",
             epochs: float | None = None, max_seq_len: int | None = None, lora_rank: int = 8,
             lora_alpha: float = 16.0, lora_dropout: float = 0.0, lora_targets: str = "q_proj,k_proj,v_proj,o_proj",
             adapter_only: bool = False, train_on_prompt: bool = False, resume: bool = False,
             overwrite: bool = False, progress: bool = True, device: str | None = None, log=print,
             **overrides: Any) -> dict[str, Any]:
    """Fine-tune ``base`` on a JSONL file; write the result to ``out`` (see ``llmkit finetune --help``).

    ``out`` must be empty or missing, unless ``resume`` (continue the run there, with its own
    budget unless one is given) or ``overwrite`` (replace the earlier run there)."""
    import llmkit
    from llmkit.train.checkpoint import plan_run
    from llmkit.train.loop import BUDGET, keep_run_budget

    if method not in ("lora", "full"):
        raise TrainConfigError(f"--method must be lora or full, got {method!r}")
    if adapter_only and method != "lora":
        raise TrainConfigError("--adapter-only needs --method lora")
    run = plan_run(out, "finetune", resume=resume, overwrite=overwrite)  # before anything else: refuse early
    d = setup_distributed(device)
    try:
        llm = llmkit.load(base, device="cpu", dtype=torch.float32, progress=progress and d.main)
        model, tokenizer = llm.model, llm.tokenizer
        context = model.config.max_position_embeddings
        max_len = min(max_seq_len or context, context)
        train_set = load_examples(data, tokenizer, max_len, context, train_on_prompt)
        val_set = load_examples(val, tokenizer, max_len, context, train_on_prompt) if val else None

        s = TrainSettings(batch_size=8, lr=2e-4 if method == "lora" else 2e-5, weight_decay=0.0,
                          warmup_steps=0, seq_len=max_len, eval_interval=0, checkpoint_interval=100,
                          eval_batches=0, min_lr_ratio=0.1)
        s.update(**overrides)
        if len(train_set) < s.batch_size:
            raise DataError(f"{data}: {len(train_set)} examples, fewer than the batch size {s.batch_size}: "
                            "add examples or lower --batch-size")
        if s.max_steps is None and s.max_tokens is None and s.max_minutes is None:
            s.max_steps = max(1, math.ceil((epochs or 3.0) * len(train_set) / s.batch_size))
        elif epochs is not None and s.max_steps is None:
            s.max_steps = max(1, math.ceil(epochs * len(train_set) / s.batch_size))
        keep_run_budget(s, run, epochs is not None or any(overrides.get(k) is not None for k in BUDGET))
        if "warmup_steps" not in overrides and s.max_steps:
            s.warmup_steps = max(1, s.max_steps // 20)
        if "eval_interval" not in overrides and s.max_steps:
            s.eval_interval = max(1, s.max_steps // 5)

        lora, peft_form = None, False
        if method == "lora":
            from llmkit.train.lora import apply_lora, hf_layer_names, parse_targets

            targets = parse_targets(lora_targets)
            torch.manual_seed(s.seed)  # the A matrices' initial values
            wrapped = apply_lora(model, targets, lora_rank, lora_alpha, lora_dropout)
            lora = {"rank": lora_rank, "alpha": lora_alpha, "dropout": lora_dropout, "targets": list(targets)}
            peft_form = hf_layer_names(model.config, wrapped) is not None
            if not peft_form:
                why = (f"LoRA on {model.config.architecture}'s {', '.join(targets)} has no PEFT adapter form "
                       "(those layers are fused or transposed in the Hugging Face model)")
                if adapter_only:
                    raise TrainConfigError(f"--adapter-only: {why}; drop --adapter-only to get the merged model")
                if d.main:
                    log(f"note: {why}: OUT gets the merged model only")
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        base_name = str(Path(base).resolve()) if Path(base).exists() else base
        task = FinetuneTask(model, tokenizer, train_set, val_set, s, lora, base_name, pad)
        task.adapter_only, task.peft_form = adapter_only, peft_form
        if d.main:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            log(f"{method}: {trainable / 1e6:.3f}M of {total / 1e6:.1f}M parameters trained; "
                f"{len(train_set)} examples ({sum(e.targets for e in train_set):,} answer tokens)"
                + (f", {len(val_set)} for validation" if val_set else "") + f"; {s.max_steps} steps")
        summary = train(model, task, s, out, d=d, resume=resume, run=run, progress=progress, log=log,
                        describe={"base": base_name, "method": method, "lora": lora,
                                  "train_on_prompt": train_on_prompt})
        return summary
    finally:
        teardown_distributed()
