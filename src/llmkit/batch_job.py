"""Batch jobs: one task over every row of a JSONL or Parquet file, in this process or on Ray Data.

``batch("summarize", "docs.jsonl", "summaries.jsonl", max_words=30)`` runs the task on each row's
``text`` field and writes every input row, ``id`` and all, with the task's answer added under
``result`` (a failed row gets ``error`` instead, and the job goes on). The output keeps the
input's order, and appears at once when the job ends (written beside it, then renamed), so that
a reader never sees half a file.

Resuming: rows are recorded as they finish in a progress file beside the output
(``OUT.progress.jsonl``: a first line that names the job, then one line per finished row). Running
the same job again with the same output skips the rows recorded there and retries the failed
ones; a progress file of another job (another task, model, options or input) is refused rather
than mixed in. It is removed once every row has succeeded.

In this process, the rows run concurrently on one engine, which batches them (continuous
batching). With ``ray=True``, Ray Data spreads them over ``replicas`` actors, each loading the
model once; the rows' results come back to this process, which writes the progress file and the
output, so that the files live where the job was started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Iterable, Iterator

from llmkit.errors import LLMKitError, read_jsonl

log = logging.getLogger("llmkit.batch")

RESULT = "result"  # the output column with the task's answer
ERROR = "error"  # the output column with a failed row's error
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
DEFAULT_MODEL = "smollm2-135m-instruct"


class BatchError(LLMKitError):
    """A batch job that cannot start: an unreadable input, an output of another format, a
    progress file of another job."""


@dataclass
class BatchReport:
    """What a batch job did: ``rows`` in the input, ``skipped`` (done by an earlier run),
    ``ran`` in this run, and ``failed`` as (row id, error message)."""

    out: Path
    rows: int
    skipped: int
    ran: int
    failed: list[tuple[Any, str]] = dc_field(default_factory=list)


@dataclass
class Outcome:
    """One row's answer (as JSON text) or its error."""

    index: int
    result: str | None = None
    error: str | None = None


def batch(task: str, input: str | os.PathLike, out: str | os.PathLike, *, model: str = DEFAULT_MODEL,
          ray: bool = False, replicas: int = 1, threads_per_replica: int = 1, address: str | None = None,
          field: str = "text", load_options: dict | None = None, progress: bool = True,
          **task_options: Any) -> BatchReport:
    """Run ``task`` (see ``llmkit tasks``) on the ``field`` of every row of ``input`` (JSONL or
    Parquet) and write the rows with the task's answer under ``result`` to ``out`` (JSONL or
    Parquet, by its extension); see the module's notes on order, failures and resuming.

    ``ray=True`` runs the rows on Ray Data with ``replicas`` actors of ``threads_per_replica``
    threads each, in a running Ray instance, the cluster at ``address``, or a local one started
    for the job. ``task_options`` go to the task (``to="fr"``, ``labels=[...]``, ``max_tokens=64``).
    """
    from llmkit.tasks import get_task

    spec = get_task(task)  # an unknown task fails before anything is read or loaded
    input, out = Path(input), Path(out)
    out_format = _format(out, "output")
    rows = read_rows(input)
    if rows and not any(field in row for row in rows):
        raise BatchError(f"no row of {input} has a {field!r} field; name the field that holds the text "
                         f"(--field; the first row has: {', '.join(map(str, rows[0])) or 'nothing'})")
    job = {"task": task, "model": str(model), "field": field, "options": _jsonable(task_options),
           "load_options": _jsonable(load_options or {}), "input_sha256": _sha256(input), "rows": len(rows)}
    ledger = Ledger(Path(f"{out}.progress.jsonl"), job)
    done = ledger.open()
    try:
        ids = [row.get("id", i) for i, row in enumerate(rows)]
        work: list[tuple[int, str]] = []
        for i, row in enumerate(rows):
            if i in done:
                continue
            text = row.get(field)
            if not isinstance(text, str):
                problem = "is missing" if text is None else f"is a {type(text).__name__}, not text"
                ledger.record(Outcome(i, error=f"the field {field!r} {problem}"))
            else:
                work.append((i, text))
        skipped = len(done)
        ran = len(ledger.errors)  # rows answered in this run, the refused ones included
        with _Progress(progress, total=len(rows), done=skipped) as bar:
            def finished(outcome: Outcome) -> None:
                nonlocal ran
                ran += 1
                ledger.record(outcome)
                bar.advance()
                if outcome.error is not None:
                    bar.say(f"row {ids[outcome.index]!r} failed: {outcome.error}")

            for i, error in ledger.errors.items():  # the rows refused above
                bar.advance()
                bar.say(f"row {ids[i]!r} failed: {error}")
            if work:
                if ray:
                    run = _on_ray(spec.name, model, load_options or {}, task_options, work, replicas=replicas,
                                  threads=threads_per_replica, address=address)
                else:
                    import llmkit

                    llm = llmkit.load(model, progress=progress, **(load_options or {}))
                    run = Rows(llm, spec.name, task_options).run(work)
                for outcome in run:
                    finished(outcome)
    finally:
        ledger.close()
    results = {**done, **ledger.results}
    failed = [(ids[i], ledger.errors[i]) for i in sorted(ledger.errors)]
    write_rows(out, out_format, (_with_result(row, results.get(i), ledger.errors.get(i))
                                 for i, row in enumerate(rows)))
    if not failed:
        ledger.remove()
    return BatchReport(out, len(rows), skipped, ran, failed)


# ------------------------------------------------------------------------------------------ running rows

class Rows:
    """Runs a task on rows with one loaded model: concurrently, so that the engine batches them."""

    def __init__(self, llm, task: str, options: dict, workers: int | None = None):
        from llmkit.tasks import get_task

        self.llm = llm
        self.spec = get_task(task)
        self.options = options
        self.workers = workers or max(1, int(getattr(llm.engine, "max_batch", 8)))

    def one(self, index: int, text: str) -> Outcome:
        try:
            if self.spec.rule == "embed":
                value = self.spec(self.llm, [text], **self.options)[0]
            else:
                value = self.spec(self.llm, text, **self.options)
            return Outcome(index, result=json.dumps(_jsonable(value), ensure_ascii=False))
        except Exception as exc:  # noqa: BLE001 - a row's failure is reported, the job goes on
            return Outcome(index, error=f"{type(exc).__name__}: {exc}")

    def run(self, work: Iterable[tuple[int, str]]) -> Iterator[Outcome]:
        """Outcomes in the order the rows finish; at most ``workers`` rows in the engine at once."""
        pending = iter(work)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="llmkit-batch") as pool:
            running = set()
            for item in pending:
                running.add(pool.submit(self.one, *item))
                if len(running) >= self.workers:
                    break
            while running:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
                    item = next(pending, None)
                    if item is not None:
                        running.add(pool.submit(self.one, *item))


class RayRows:
    """A Ray Data actor: loads the model once, then answers batches of rows."""

    def __init__(self, model: str, load_options: dict, task: str, options: dict, threads: int):
        import torch

        import llmkit

        torch.set_num_threads(threads)
        self.rows = Rows(llmkit.load(model, progress=False, **load_options), task, options)

    def __call__(self, batch: dict) -> dict:
        outcomes = {o.index: o for o in self.rows.run(zip(map(int, batch["i"]), map(str, batch["text"])))}
        ordered = [outcomes[int(i)] for i in batch["i"]]
        return {"i": [o.index for o in ordered], "result": [o.result or "" for o in ordered],
                "error": [o.error or "" for o in ordered]}


def _on_ray(task: str, model: str, load_options: dict, options: dict, work: list[tuple[int, str]], *,
            replicas: int, threads: int, address: str | None) -> Iterator[Outcome]:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise BatchError(f"ray=True (--ray) needs Ray Data: pip install 'llmkit[ray]' ({exc})") from None
    if replicas < 1 or threads < 1:
        raise BatchError("replicas and threads per replica must be at least 1")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the job shows its own, counted in rows
        rows = ray.data.from_items([{"i": i, "text": text} for i, text in work])
        answered = rows.map_batches(
            RayRows, fn_constructor_kwargs={"model": str(model), "load_options": load_options, "task": task,
                                            "options": options, "threads": threads},
            # a batch several times the engine's width keeps the engine full until its last rows
            concurrency=replicas, num_cpus=threads, batch_size=64, batch_format="numpy",
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})
        for row in answered.iter_rows():
            yield Outcome(int(row["i"]), result=row["result"] or None, error=row["error"] or None)
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------ files

def _format(path: Path, what: str) -> str:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise BatchError(f"{path}: the {what} must be a .jsonl or .parquet file (one row per record)")
    return kind


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL or Parquet file, as dicts."""
    kind = _format(path, "input")
    if not path.is_file():
        raise BatchError(f"no such file: {path}")
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [row for _, row in read_jsonl(path)]


def write_rows(path: Path, kind: str, rows: Iterable[dict]) -> None:
    """Write rows to ``path`` all at once: into a file beside it, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(list(rows)), tmp)
        else:
            with tmp.open("w", encoding="utf-8") as f:
                for row in rows:
                    # Parquet values without a JSON form (dates, bytes) are written as text
                    f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _with_result(row: dict, result: str | None, error: str | None) -> dict:
    out = dict(row)
    out[RESULT] = json.loads(result) if result is not None else None
    if error is not None:
        out[ERROR] = error
    return out


class Ledger:
    """The progress file: the job's description, then one JSON line per finished row."""

    def __init__(self, path: Path, job: dict):
        self.path = path
        self.job = job
        self.results: dict[int, str] = {}  # finished in this run: index -> result as JSON text
        self.errors: dict[int, str] = {}  # failed in this run
        self._file = None

    def open(self) -> dict[int, str]:
        """The rows an earlier run of this job finished (index -> result as JSON text)."""
        done: dict[int, str] = {}
        if self.path.exists():
            with self.path.open(encoding="utf-8") as f:
                lines = f.read().split("\n")
            try:
                header = json.loads(lines[0])
            except json.JSONDecodeError:
                header = None
            if not isinstance(header, dict) or header.get("job") != self.job:
                raise BatchError(f"{self.path} records another job (task, model, options or input differ); "
                                 "delete it to start over, or choose another output")
            for line in lines[1:]:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a run that was killed while writing it
                if "result" in entry:
                    done[entry["i"]] = entry["result"]
            # keep only whole lines: a half-written last line would spoil the next one
            self._file = self.path.open("a", encoding="utf-8")
            if lines[-1] != "":
                self._file.write("\n")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")
            self._file.write(json.dumps({"job": self.job}) + "\n")
        self._file.flush()
        return done

    def record(self, outcome: Outcome) -> None:
        if outcome.error is None:
            self.results[outcome.index] = outcome.result
            entry = {"i": outcome.index, "result": outcome.result}
        else:
            self.errors[outcome.index] = outcome.error
            entry = {"i": outcome.index, "error": outcome.error}
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    """A task's answer (text, a Classification, a pydantic model, a vector) as JSON values."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, type):  # a pydantic model class given as an extract schema
        return value.__name__
    return value


class _Progress:
    """Rows done out of all, on standard error (rich); messages printed above the bar."""

    def __init__(self, show: bool, total: int, done: int):
        self.show, self.total, self.done = show, total, done
        self.bar = None

    def __enter__(self):
        if self.show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("rows"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True))
            self.task = self.bar.add_task("rows", total=self.total, completed=self.done)
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message, markup=False, highlight=False)
        else:
            log.warning(message)
