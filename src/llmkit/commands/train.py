"""Training commands: prepare data, pretrain from scratch, fine-tune (LoRA or full)."""

from __future__ import annotations

import click

from llmkit.cli import friendly_errors


@click.command()
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Folder to write shards, tokenizer and meta.json to.")
@click.option("--tokenizer", default=None, metavar="MODEL_OR_NEW",
              help="Use this model's tokenizer (folder or store name); 'new' or nothing trains a byte-level BPE.")
@click.option("--vocab-size", type=int, default=8192, show_default=True, help="Size of a new tokenizer's vocabulary.")
@click.option("--val-fraction", type=float, default=0.05, show_default=True, help="Share of documents kept for validation.")
@click.option("--min-chars", type=int, default=64, show_default=True, help="Drop documents shorter than this, after cleaning.")
@click.option("--near-dup-threshold", type=float, default=0.8, show_default=True,
              help="Drop documents this similar (MinHash Jaccard) to an earlier one; 0 keeps near duplicates.")
@click.option("--html-format", type=click.Choice(["text", "markdown"]), default="text", show_default=True,
              help="Web pages' main content as plain text, or as Markdown (headings, lists, fenced code).")
@click.option("--text-field", default="text", show_default=True,
              help="The JSONL field or Parquet column that holds each document's text.")
@click.option("--lang", default="en", show_default=True, metavar="CODES|any",
              help="Keep documents in these languages (fastText codes, comma-separated: en,fr); 'any' keeps all.")
@click.option("--lang-threshold", type=float, default=0.65, show_default=True,
              help="Lowest language-identification probability kept.")
@click.option("--quality/--no-quality", default=True, show_default=True,
              help="The Gopher quality and repetition rules and C4's rules (thresholds in meta.json).")
@click.option("--pii/--no-pii", default=True, show_default=True,
              help="Replace e-mail addresses, IP addresses and phone numbers with [EMAIL], [IP], [PHONE].")
@click.option("--ray", "use_ray", is_flag=True,
              help="Clean the files on Ray: a local instance, or the cluster RAY_ADDRESS names (pip install 'llmkit[ray]').")
@click.option("--demo", is_flag=True, help="Add the built-in corpus: the Python standard library's docstrings and docs.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def prepare(inputs, out, tokenizer, vocab_size, val_fraction, min_chars, near_dup_threshold, html_format, text_field,
            lang, lang_threshold, quality, pii, use_ray, demo, quiet):
    """Clean, filter, deduplicate and tokenize INPUTS into binary shards for `llmkit pretrain`.

    INPUTS are files and folders: .txt and .md, .html pages (main content only), .jsonl (a "text"
    field, or chat "messages"), .parquet (a "text" column) and .pdf, each also compressed (.gz,
    .zst). A file that cannot be read as what its name says is reported and skipped. Documents
    go through language identification, the Gopher and C4 quality rules, PII redaction, and exact
    and MinHash deduplication; the report says what each step removed and why. An interrupted
    run started again redoes only the files it had not finished. Nothing is written to --out
    unless everything succeeds.

    \b
    Example, with no download at all:
      llmkit prepare --demo --vocab-size 4096 --out data/demo
    """
    from llmkit.train.data import prepare as run

    run(inputs, out, tokenizer=None if tokenizer in (None, "new") else tokenizer, vocab_size=vocab_size,
        val_fraction=val_fraction, min_chars=min_chars, near_duplicates=near_dup_threshold or None, demo=demo,
        html_format=html_format, text_field=text_field, lang=lang, lang_threshold=lang_threshold, quality=quality,
        pii=pii, use_ray=use_ray, progress=not quiet, log=click.echo)
    click.echo(f"wrote {out}")


def _budget_options(fn):
    options = [
        click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps."),
        click.option("--max-tokens", type=int, default=None, help="Stop after this many training tokens."),
        click.option("--max-minutes", type=float, default=None,
                     help="Stop after this long (steps are planned from the measured speed)."),
        click.option("--batch-size", type=int, default=None, help="Sequences per optimizer step (all processes)."),
        click.option("--micro-batch-size", type=int, default=None,
                     help="Sequences per forward pass in each process (gradient accumulation makes up the rest)."),
        click.option("--lr", type=float, default=None, help="Peak learning rate."),
        click.option("--warmup-steps", type=int, default=None, help="Linear warm-up steps."),
        click.option("--eval-interval", type=int, default=None, help="Validate every N steps (0: only at the end)."),
        click.option("--checkpoint-interval", type=int, default=None, help="Checkpoint every N steps (and at the end)."),
        click.option("--seed", type=int, default=None, help="Same seed, same run."),
        click.option("--resume", is_flag=True,
                     help="Continue the run in --out from its last checkpoint, exactly (with its own budget unless "
                          "given again; settings that change the results must be the same)."),
        click.option("--overwrite", is_flag=True,
                     help="Replace the earlier run in --out (its checkpoints, metrics and model are deleted)."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)."),
        click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default=None,
                     help="Several processes (torchrun): ddp keeps a whole model in each (default); fsdp shards "
                          "weights, gradients and optimizer state over them, for a model too big for one GPU."),
        click.option("--compile/--no-compile", "compile_", default=None,
                     help="torch.compile the model (default: on GPU only)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _overrides(kwargs) -> dict:
    keys = ("max_steps", "max_tokens", "max_minutes", "batch_size", "micro_batch_size", "lr", "warmup_steps",
            "eval_interval", "checkpoint_interval", "seed", "strategy")
    out = {k: kwargs[k] for k in keys if kwargs.get(k) is not None}
    if kwargs.get("compile_") is not None:
        out["compile"] = kwargs["compile_"]
    return out


@click.command()
@click.option("--data", required=True, type=click.Path(), help="A folder written by `llmkit prepare`.")
@click.option("--config", default=None,
              help="A preset (tiny, small) or a YAML file.  [default: tiny; with --resume, the run's own]")
@click.option("--out", required=True, type=click.Path(),
              help="Folder for checkpoints, metrics, and the final model: empty, or see --resume and --overwrite.")
@click.option("--seq-len", type=int, default=None, help="Tokens per training sequence (the model's context).")
@_budget_options
@friendly_errors
def pretrain(data, config, out, seq_len, resume, overwrite, device, quiet, **kwargs):
    """Train a language model from scratch on prepared data.

    The final model is written to OUT in Hugging Face format: `llmkit generate -m OUT` uses it.
    Checkpoints go to OUT/checkpoints, metrics to OUT/metrics.jsonl and OUT/loss.png. Several
    processes: `torchrun --nproc_per_node N -m llmkit.cli pretrain ...` (add `--strategy fsdp` to
    shard a model that does not fit one GPU).

    \b
    Example:
      llmkit prepare --demo --vocab-size 4096 --out data/demo
      llmkit pretrain --data data/demo --config tiny --out runs/tiny --max-minutes 10
      llmkit generate -m runs/tiny "def "
    """
    from llmkit.train.pretrain import pretrain as run

    overrides = _overrides(kwargs)
    if seq_len is not None:
        overrides["seq_len"] = seq_len
    summary = run(data, out, config, resume=resume, overwrite=overwrite, progress=not quiet, device=device,
                  log=click.echo, **overrides)
    _summary(summary, out)


def _summary(summary: dict, out) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    parts = [f"step {summary['step']}"]
    if summary.get("loss") is not None:
        parts.append(f"train loss {summary['loss']:.4f}")
    if summary.get("val_loss") is not None:
        parts.append(f"validation loss {summary['val_loss']:.4f}")
    if summary.get("unigram_val_loss") is not None:
        parts.append(f"unigram baseline {summary['unigram_val_loss']:.4f}")
    if summary.get("val_acc") is not None:
        parts.append(f"validation answer accuracy {summary['val_acc']:.3f}")
    parts.append(f"{summary['tokens_per_s']:,.0f} tokens/s")
    click.echo("; ".join(parts))
    if summary.get("finished", True):
        click.echo(f"model written to {out}")


@click.command()
@click.option("-m", "--model", "base", required=True, help="The base model: store name, .gguf file or HF folder.")
@click.option("--data", required=True, type=click.Path(), help="Training JSONL (chat, instruction, completion or text).")
@click.option("--val", type=click.Path(), default=None, help="Validation JSONL, same formats.")
@click.option("--method", type=click.Choice(["lora", "full"]), default="lora", show_default=True)
@click.option("--out", required=True, type=click.Path(),
              help="Folder for the fine-tuned model: empty, or see --resume and --overwrite.")
@click.option("--epochs", type=float, default=None, help="Passes over the data (default 3 unless --max-steps).")
@click.option("--max-seq-len", type=int, default=None, help="Longest example in tokens (default: the model's context).")
@click.option("--lora-rank", type=int, default=8, show_default=True)
@click.option("--lora-alpha", type=float, default=16.0, show_default=True)
@click.option("--lora-dropout", type=float, default=0.0, show_default=True)
@click.option("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", show_default=True,
              help="Comma-separated projection names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or 'all'.")
@click.option("--adapter-only", is_flag=True, help="LoRA: write only the adapter (it names its base), not the merged model.")
@click.option("--train-on-prompt", is_flag=True, help="Compute the loss on every token, not only the answers.")
@_budget_options
@friendly_errors
def finetune(base, data, val, method, out, epochs, max_seq_len, lora_rank, lora_alpha, lora_dropout, lora_targets,
             adapter_only, train_on_prompt, resume, overwrite, device, quiet, **kwargs):
    """Fine-tune a model on your own examples, with LoRA (default) or all weights.

    Each JSONL line is one example: {"messages": [...]} (chat), {"instruction", "input"?, "output"},
    {"prompt", "completion"}, or {"text"}. Chat and instruction examples are rendered with the base
    model's chat template and only the assistant's tokens are learned.

    OUT gets the merged model in Hugging Face format (`llmkit generate -m OUT`, transformers) and,
    for LoRA, the adapter alone in OUT/adapter, in PEFT's format (`llmkit.load` and
    `peft.PeftModel.from_pretrained` read it).
    """
    from llmkit.train.finetune import finetune as run

    summary = run(base, data, out, val=val, method=method, epochs=epochs, max_seq_len=max_seq_len,
                  lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                  lora_targets=lora_targets, adapter_only=adapter_only, train_on_prompt=train_on_prompt,
                  resume=resume, overwrite=overwrite, progress=not quiet, device=device, log=click.echo,
                  **_overrides(kwargs))
    _summary(summary, out)


COMMANDS = [prepare, pretrain, finetune]
