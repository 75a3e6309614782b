"""``llmkit tasks``, ``llmkit run TASK``, ``llmkit eval``: the task APIs and evaluation from the shell."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from llmkit.cli import _fail, friendly_errors, model_option


def _options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """KEY=VALUE pairs; a VALUE that is JSON (a number, a list...) is decoded, else kept as text."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--option")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


@click.command(name="tasks")
@friendly_errors
def tasks_cmd() -> None:
    """List the tasks (`llmkit run NAME`) and evaluation tasks (`llmkit eval --task NAME`), plugins' included."""
    from rich.console import Console
    from rich.table import Table

    from llmkit.evaluate import list_metrics
    from llmkit.tasks import list_tasks

    table = Table("task", "rule", "description", title="llmkit run TASK")
    for name, task in sorted(list_tasks().items()):
        table.add_row(name, task.rule, task.description)
    console = Console()
    console.print(table)
    table = Table("eval task", "needs", "shipped data", "description", title="llmkit eval --task NAME")
    for name, metric in sorted(list_metrics().items()):
        table.add_row(name, ", ".join(metric.fields) or "text", metric.data or "-", metric.description)
    console.print(table)


def _read_input(source: str | None) -> str:
    if source in (None, "-"):
        if source is None and sys.stdin.isatty():
            _fail("no input: give a FILE, or pipe text in (`cat notes.txt | llmkit run summarize -`)")
        return sys.stdin.read()
    path = Path(source)
    if not path.is_file():
        _fail(f"no such file: {source}")
    return path.read_text(encoding="utf-8")


@click.command(name="run")
@click.argument("task")
@click.argument("file", required=False)
@model_option
@click.option("--to", help="translate: target language (fr, de, French...).")
@click.option("--source", help="translate: source language (default: let the model tell).")
@click.option("--max-words", type=int, help="summarize: the most words (default 50).")
@click.option("--labels", help="classify: comma-separated labels.")
@click.option("--schema", type=click.Path(exists=True, dir_okay=False),
              help="extract: a JSON schema file.")
@click.option("--context", "context_file", type=click.Path(exists=True, dir_okay=False),
              help="answer: a file with the context; FILE holds the question.")
@click.option("-o", "--option", "extra", multiple=True, metavar="KEY=VALUE",
              help="Any other option of the task, or a sampling setting (temperature=0.7).")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Batch job: FILE is JSONL or Parquet, one record per row; write each row with the task's "
                   "answer under `result` here (.jsonl or .parquet). Run again to resume.")
@click.option("--field", default="text", show_default=True, help="Batch job: the field that holds each row's text.")
@click.option("--ray", "on_ray", is_flag=True, help="Batch job on Ray Data (pip install 'llmkit[ray]').")
@click.option("--replicas", type=click.IntRange(1, None), default=1, show_default=True,
              help="With --ray: actors that each load the model and take rows.")
@click.option("--threads-per-replica", type=click.IntRange(1, None), default=1, show_default=True,
              help="With --ray: CPUs (and torch threads) of each actor.")
@click.option("--address", default=None,
              help="With --ray: the Ray cluster to join (auto, HOST:6379, ray://HOST:10001); default: a local one.")
@friendly_errors
def run_cmd(task: str, file: str | None, model: str, to: str | None, source: str | None,
            max_words: int | None, labels: str | None, schema: str | None, context_file: str | None,
            extra: tuple[str, ...], out: str | None, field: str, on_ray: bool, replicas: int,
            threads_per_replica: int, address: str | None) -> None:
    """Run TASK (see `llmkit tasks`) on the text in FILE (or standard input, with - or a pipe).

    With --out, FILE is a JSONL or Parquet file and TASK runs on every row's text (a batch job):
    each row is written to OUT with the answer added, in the input's order; a row that fails is
    reported with its id and the job goes on. Rows are recorded as they finish in
    OUT.progress.jsonl, so running the same command again after an interruption skips them.
    With --ray, the rows are spread over --replicas Ray actors, on this machine or a cluster.

    \b
    llmkit run summarize notes.txt --max-words 30
    llmkit run translate letter.txt --to fr
    llmkit run classify review.txt --labels positive,negative
    llmkit run extract invoice.txt --schema invoice.schema.json
    llmkit run answer question.txt --context manual.txt
    llmkit run embed lines.txt          (one text per line; prints one JSON vector per line)
    llmkit run summarize docs.jsonl --out summaries.jsonl --ray --replicas 4
    """
    from llmkit.tasks import get_task

    if out is None and (on_ray or address):
        raise click.UsageError("--ray runs batch jobs: give --out FILE (and a JSONL or Parquet input)")

    kwargs = _options(extra)
    for key, value in (("to", to), ("source", source), ("max_words", max_words), ("labels", labels)):
        if value is not None:
            kwargs[key] = value
    if schema:
        try:
            kwargs["schema"] = json.loads(Path(schema).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            _fail(f"{schema} is not valid JSON: {exc}")
    if context_file:
        kwargs["context"] = Path(context_file).read_text(encoding="utf-8")
    spec = get_task(task)  # an unknown task fails before the model loads
    if task == "translate" and "to" not in kwargs:
        raise click.UsageError("translate needs --to LANGUAGE")
    if task == "classify" and "labels" not in kwargs:
        raise click.UsageError("classify needs --labels a,b,...")
    if task == "extract" and "schema" not in kwargs:
        raise click.UsageError("extract needs --schema FILE")
    if out is not None:
        if file in (None, "-"):
            raise click.UsageError("a batch job (--out) reads a JSONL or Parquet FILE, not standard input")
        _batch(task, file, out, model=model, on_ray=on_ray, replicas=replicas, threads=threads_per_replica,
               address=address, field=field, options=kwargs)
        return
    text = _read_input(file)
    import llmkit

    llm = llmkit.load(model)
    if spec.rule == "embed":
        lines = [line for line in text.splitlines() if line.strip()]
        for vector in spec(llm, lines, **kwargs):
            click.echo(json.dumps([round(float(x), 6) for x in vector]))
        return
    result = spec(llm, text.strip(), **kwargs)
    if spec.rule == "choose":
        click.echo(result.label)
        for label, p in sorted(result.scores.items(), key=lambda kv: -kv[1]):
            click.echo(f"  {p:.3f}  {label}", err=True)
    elif spec.rule == "json":
        value = result.model_dump(mode="json") if hasattr(result, "model_dump") else result
        click.echo(json.dumps(value, ensure_ascii=False, indent=2))
    else:
        click.echo(result)


def _batch(task: str, file: str, out: str, *, model: str, on_ray: bool, replicas: int, threads: int,
           address: str | None, field: str, options: dict) -> None:
    from llmkit.batch_job import batch

    report = batch(task, file, out, model=model, ray=on_ray, replicas=replicas, threads_per_replica=threads,
                   address=address, field=field, **options)
    skipped = f", {report.skipped} done by an earlier run" if report.skipped else ""
    click.echo(f"{report.rows} rows written to {report.out}{skipped}", err=True)
    if report.failed:
        _fail(f"{len(report.failed)} of {report.rows} rows failed (listed above, and under `error` in the "
              f"output); run the same command again to retry them")


class _Bars:
    """Progress bars on standard error (rich), one per step of the run; none when quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = None

    def __enter__(self):
        if not self.quiet:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, description: str, total: int):
        if self.progress is None:
            return lambda n: None
        task = self.progress.add_task(description, total=total)
        return lambda n: self.progress.advance(task, n)


@click.command(name="eval")
@click.option("-m", "--model", default="smollm2-135m-instruct", show_default=True,
              help="One model or several, comma-separated (store names, .gguf files, HF folders).")
@click.option("--task", "task", required=True,
              help="perplexity, bleu, chrf, rouge, accuracy, multiple_choice, retrieval (comma-separated "
                   "for several over the same data; see `llmkit tasks`).")
@click.option("--data", help="A JSONL (or .txt for perplexity) file, or a shipped set's name "
                             "(default: the task's shipped set).")
@click.option("--limit", type=int, help="Only the first N records (N lines of a .txt).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the full report here.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for anything random.")
@click.option("--window", type=int, help="perplexity: tokens per window (default min(context, 1024)).")
@click.option("--stride", type=int, help="perplexity: tokens the window moves by (default window/2).")
@click.option("--labels", help="accuracy: the label set, comma-separated (default: the labels in the data).")
@click.option("--generate", "generate", help="bleu/chrf/rouge: the task that generates (translate, summarize, "
                                             "answer; default translate when records have 'to', else summarize).")
@click.option("--template", help="bleu/chrf/rouge: a prompt template instead, fields in braces: "
                                 "'Translate to German: {input}'.")
@click.option("-o", "--option", "extra", multiple=True, metavar="KEY=VALUE",
              help="An option for the generation task (to=de, max_words=30).")
@click.option("--temperature", type=float, help="Sampling temperature for generations (default 0: greedy).")
@click.option("--max-tokens", type=int, help="Most tokens per generation (default: the task's).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Generations run together.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def eval_cmd(model: str, task: str, data: str | None, limit: int | None, json_out: str | None, seed: int,
             window: int | None, stride: int | None, labels: str | None, generate: str | None,
             template: str | None, extra: tuple[str, ...], temperature: float | None, max_tokens: int | None,
             batch_size: int, quiet: bool) -> None:
    """Evaluate one or more models; several models give a side-by-side table.

    \b
    llmkit eval --task perplexity --data wiki.txt --window 1024 --stride 512
    llmkit eval -m smollm2,./my-finetune --task accuracy          (the shipped sentiment set)
    llmkit eval --task bleu,chrf --data pairs.jsonl --generate translate -o to=de --json out.json
    """
    from rich.console import Console
    from rich.table import Table

    from llmkit.evaluate import evaluate, format_table, get_metric

    models = [m.strip() for m in model.split(",") if m.strip()]
    tasks = [t.strip() for t in task.split(",") if t.strip()]
    for t in tasks:
        get_metric(t)  # unknown names fail before any model loads
    if limit is not None and limit < 1:
        raise click.BadParameter("must be at least 1", param_hint="--limit")
    options = {"window": window, "stride": stride, "labels": labels, "generate": generate,
               "template": template, "task_options": _options(extra) or None, "temperature": temperature,
               "max_tokens": max_tokens, "batch_size": batch_size}
    with _Bars(quiet) as bars:
        report = evaluate(models, tasks, data, limit=limit, seed=seed, options=options, progress=bars)
    header, rows = format_table(report)
    table = Table(*header, title=f"{', '.join(tasks)} on {Path(report['data']['path']).name} "
                                 f"({report['data']['records']} records)")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        click.echo(f"report written to {json_out}", err=True)


COMMANDS = [tasks_cmd, run_cmd, eval_cmd]
