"""Evaluation: perplexity, BLEU / chrF / ROUGE over generations, accuracy and macro F1 for
classification, multiple choice by log-likelihood, and retrieval with embeddings.

Each metric is a ``Metric`` registered through the ``register_metrics`` plugin hook (the built-ins
below use it too). ``evaluate(models, tasks, data)`` runs them and returns a report (a dict, what
``llmkit eval --json`` writes) that records each model's checksum, the data's checksum, the
settings and every figure. Results are deterministic: generation is greedy unless a temperature
is given, and then seeded per record.

Data formats (JSON Lines, one object per line):

* perplexity: a ``.txt`` file (one document; ``limit`` keeps its first N lines) or ``{text}``;
* bleu, chrf, rouge: ``{input, reference}`` (``reference`` a string or a list of strings); other
  fields are passed to the generation task (e.g. ``"to": "fr"`` for translate);
* accuracy: ``{text, label}``;
* multiple_choice: ``{question, choices, answer}``, ``answer`` the index of the right choice or its text;
* retrieval: ``{query, passage}``; every record's passage is in the pool every query is ranked against.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from llmkit.errors import DataError, read_jsonl

__all__ = [
    "DataError", "Metric", "EvalRun", "BUILTIN_METRICS", "DATA_DIR", "SHIPPED_DATA",
    "perplexity", "load_records", "evaluate", "macro_f1", "file_sha256", "model_sha256",
    "recall_at_1", "bow_vectors", "format_table",
]

DATA_DIR = Path(__file__).parent / "data" / "eval"
# Data sets the project wrote itself, so that `llmkit eval` runs out of the box.
SHIPPED_DATA = {
    "text": "text.txt",
    "translation": "translation_en_fr.jsonl",
    "summaries": "summaries.jsonl",
    "sentiment": "sentiment.jsonl",
    "multiple_choice": "multiple_choice.jsonl",
    "retrieval": "retrieval.jsonl",
}




# ------------------------------------------------------------------------------------------ data

def resolve_data(data: str | Path) -> Path:
    """A path, or the name of a shipped set (``sentiment``, ``translation``, ...)."""
    if str(data) in SHIPPED_DATA:
        return DATA_DIR / SHIPPED_DATA[str(data)]
    path = Path(data)
    if not path.is_file():
        raise DataError(f"no data file {str(data)!r}: give a path, or one of the shipped sets: "
                        f"{', '.join(SHIPPED_DATA)}")
    return path


def load_records(path: str | Path, fields: Iterable[str] = (), limit: int | None = None) -> list[dict]:
    """Records of a JSONL file (or a .txt file as one ``{text}`` record), each checked for ``fields``.

    A bad line raises ``DataError`` naming the file and the line.
    """
    path = resolve_data(path)
    fields = tuple(fields)
    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        if limit is not None:
            lines = lines[:limit]
        text = "".join(lines)
        if not text.strip():
            raise DataError(f"{path}: the file is empty")
        return [{"text": text}]
    records = []
    for number, record in read_jsonl(path):
        missing = [k for k in fields if k not in record or record[k] is None]
        if missing:
            raise DataError(f"{path}:{number}: missing field{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(repr, missing))} (each record needs {', '.join(fields)})")
        record["_line"] = number
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f"{path}: no records")
    return records


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_sha256(llm) -> str | None:
    """sha256 of the model's file (a GGUF), or of its folder's files (name and sha256 of each)."""
    path = Path(llm.path) if llm.path else None
    if path is None or not path.exists():
        return None
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(path).as_posix()} {file_sha256(f)}\n".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ perplexity

def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n tokens.

    Every token from position 1 on is scored exactly once, in the first window that reaches it,
    with the tokens from that window's start as context (as transformers' perplexity guide does):
    with stride < window each scored token has at least window - stride tokens before it.
    """
    out, prev_end = [], 0
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


@torch.inference_mode()
def perplexity(llm, texts: str | Sequence[str], *, window: int | None = None, stride: int | None = None,
               token_budget: int = 4096, progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Perplexity of texts with a sliding window: ``{perplexity, nll, tokens}``.

    Each text is encoded as the model's tokenizer does for a prompt (a BOS where it adds one);
    ``window`` defaults to min(context, 1024) tokens and ``stride`` to half the window.
    """
    from llmkit.tasks import _pad, hidden_states

    if isinstance(texts, str):
        texts = [texts]
    window = min(window or min(llm.context_length, 1024), llm.context_length)
    stride = stride or max(window // 2, 1)
    if not 1 <= stride <= window:
        raise DataError(f"stride must be between 1 and the window ({window}), got {stride}")
    jobs = []  # (ids, begin, end, first)
    for text in texts:
        ids = llm.tokenizer.encode(text, add_special_tokens=True)
        jobs += [(ids, b, e, f) for b, e, f in _windows(len(ids), window, stride)]
    nll, count = 0.0, 0
    head = llm.model.lm_head
    per_batch = max(1, token_budget // window)
    for start in range(0, len(jobs), per_batch):
        group = jobs[start : start + per_batch]
        def score(h: torch.Tensor, group=group) -> float:
            total = 0.0
            for row, (ids, b, e, f) in enumerate(group):
                # logits at local position j predict token j + 1
                logits = head(h[row, f - b - 1 : e - b - 1]).float()
                target = torch.as_tensor(ids[f:e], device=logits.device)
                total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            return total

        nll += hidden_states(llm, _pad([ids[b:e] for ids, b, e, _ in group]), score)
        count += sum(e - f for _, _, e, f in group)
        if progress:
            progress(len(group))
    if count == 0:
        raise DataError("the text is too short to score: it needs at least two tokens")
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}


# ------------------------------------------------------------------------------------------ scores

def macro_f1(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Mean over labels (those in gold or pred) of F1 = 2TP / (2TP + FP + FN)."""
    labels = sorted(set(gold) | set(pred))
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


_WORD = re.compile(r"\w+", re.UNICODE)


def bow_vectors(texts: Sequence[str]):
    """Bag-of-words term-count vectors (lower-cased words), L2-normalised: the retrieval baseline."""
    import numpy as np

    counts = [Counter(_WORD.findall(t.lower())) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted(set().union(*counts)))}
    out = np.zeros((len(texts), max(len(vocab), 1)), dtype=np.float32)
    for row, c in enumerate(counts):
        for w, n in c.items():
            out[row, vocab[w]] = n
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def recall_at_1(queries, passages, relevant: Sequence[int]) -> tuple[float, float]:
    """(recall@1, mean reciprocal rank) of cosine ranking; rows are L2-normalised vectors."""
    import numpy as np

    sims = np.asarray(queries) @ np.asarray(passages).T
    hits, rr = 0, 0.0
    for q, gold in enumerate(relevant):
        order = np.argsort(-sims[q], kind="stable")
        rank = int(np.nonzero(order == gold)[0][0]) + 1
        hits += rank == 1
        rr += 1.0 / rank
    return hits / len(relevant), rr / len(relevant)


# ------------------------------------------------------------------------------------------ metrics

@dataclass
class EvalRun:
    """One model over one data set: what a metric's ``compute`` receives."""

    llm: Any
    records: list[dict]
    path: Path
    options: dict[str, Any]
    progress: Callable[[str, int], Callable[[int], None]]  # (description, total) -> advance(n)
    memo: dict[str, Any] = field(default_factory=dict)

    def sampling(self) -> dict[str, Any]:
        keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "max_tokens")
        return {k: self.options[k] for k in keys if self.options.get(k) is not None}


@dataclass
class Metric:
    """An evaluation: ``compute(run) -> {name: value}``; ``fields`` each record needs; ``data`` the
    shipped set used when none is given."""

    name: str
    description: str
    compute: Callable[[EvalRun], dict[str, float]]
    fields: tuple[str, ...] = ()
    data: str | None = None


def _perplexity(run: EvalRun) -> dict[str, float]:
    texts = [r["text"] for r in run.records]
    if not all(isinstance(t, str) for t in texts):
        raise DataError(f"{run.path}: 'text' must be a string")
    return perplexity(run.llm, texts, window=run.options.get("window"), stride=run.options.get("stride"),
                      progress=run.progress("perplexity", _count_windows(run, texts)))


def _count_windows(run: EvalRun, texts: Sequence[str]) -> int:
    window = min(run.options.get("window") or min(run.llm.context_length, 1024), run.llm.context_length)
    stride = run.options.get("stride") or max(window // 2, 1)
    return sum(len(_windows(len(run.llm.tokenizer.encode(t, add_special_tokens=True)), window, stride)) for t in texts)


def _generations(run: EvalRun) -> list[str]:
    """The generation task's output for every record (computed once per run, shared by metrics)."""
    if "generations" in run.memo:
        return run.memo["generations"]
    from llmkit.tasks import generate_batch, get_task, render

    template = run.options.get("template")
    task_name = run.options.get("generate") or ("translate" if "to" in run.records[0] else "summarize")
    task = None if template else get_task(task_name)
    if task is not None and (task.prompt is None or task.rule != "generate"):
        raise DataError(f"task {task_name!r} does not generate text; use translate, summarize, answer or a template")
    extra = dict(run.options.get("task_options") or {})
    prompts, finishers, stops = [], [], []
    for r in run.records:
        fields = {k: v for k, v in r.items() if k not in ("reference", "_line")}
        if template:
            try:
                content = template.format(**fields)
            except KeyError as exc:
                raise DataError(f"{run.path}:{r['_line']}: the template uses {exc} but the record has no such field") from None
            prompts.append(render(run.llm, [{"role": "user", "content": content}]))
            finishers.append(lambda text: text.strip())
            stops.append(None)
            continue
        inputs = {**{k: v for k, v in fields.items() if k != "input"}, **extra}
        try:
            import inspect

            bound = inspect.signature(task.prompt).bind(fields["input"], **inputs)
        except TypeError as exc:
            raise DataError(f"{run.path}:{r['_line']}: the {task_name} task cannot take this record: {exc}") from None
        bound.apply_defaults()
        prompts.append(render(run.llm, task.prompt(*bound.args, **bound.kwargs)))
        args = dict(bound.arguments)
        finishers.append(lambda text, _a=args: task.finish(text, _a) if task.finish else text.strip())
        stops.append(tuple(task.stop(args)) if task.stop and run.options.get("stop") is None else None)
    sampling = {"max_tokens": task.max_tokens if task else 256, **run.sampling()}
    advance = run.progress(f"generating ({task_name if task else 'template'})", len(prompts))
    texts: list[str] = [""] * len(prompts)
    # records with the same stop strings generate together
    for stop in dict.fromkeys(stops):
        idx = [i for i, s in enumerate(stops) if s == stop]
        extra_stop = {"stop": list(stop)} if stop else {}
        outs = generate_batch(run.llm, [prompts[i] for i in idx], batch_size=run.options.get("batch_size") or 8,
                              progress=advance, **sampling, **extra_stop)
        for i, out in zip(idx, outs):
            texts[i] = out
    run.memo["generations"] = [finish(t) for finish, t in zip(finishers, texts)]
    return run.memo["generations"]


def _references(run: EvalRun) -> list[list[str]]:
    refs = []
    for r in run.records:
        ref = r["reference"]
        ref = [ref] if isinstance(ref, str) else ref
        if not isinstance(ref, list) or not ref or not all(isinstance(x, str) for x in ref):
            raise DataError(f"{run.path}:{r['_line']}: 'reference' must be a string or a list of strings")
        refs.append(ref)
    return refs


def _ref_streams(refs: list[list[str]], path: Path) -> list[list[str]]:
    n = {len(r) for r in refs}
    if len(n) != 1:
        raise DataError(f"{path}: every record needs the same number of references for BLEU/chrF, found {sorted(n)}")
    return [list(s) for s in zip(*refs)]


def _bleu(run: EvalRun) -> dict[str, float]:
    import sacrebleu

    hyps = _generations(run)
    return {"bleu": sacrebleu.corpus_bleu(hyps, _ref_streams(_references(run), run.path)).score}


def _chrf(run: EvalRun) -> dict[str, float]:
    import sacrebleu

    hyps = _generations(run)
    return {"chrf": sacrebleu.corpus_chrf(hyps, _ref_streams(_references(run), run.path)).score}


def _rouge(run: EvalRun) -> dict[str, float]:
    from rouge_score import rouge_scorer

    hyps, refs = _generations(run), _references(run)
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for hyp, ref in zip(hyps, refs):
        scores = scorer.score_multi(ref, hyp)
        for k in kinds:
            totals[k] += scores[k].fmeasure
    return {k: 100 * v / len(hyps) for k, v in totals.items()}


def _labels(run: EvalRun) -> list[str]:
    given = run.options.get("labels")
    gold = [str(r["label"]) for r in run.records]
    if given:
        labels = [x.strip() for x in given.split(",")] if isinstance(given, str) else [str(x) for x in given]
        for r, g in zip(run.records, gold):
            if g not in labels:
                raise DataError(f"{run.path}:{r['_line']}: label {g!r} is not one of the labels given "
                                f"({', '.join(labels)})")
        return labels
    labels = list(dict.fromkeys(gold))
    if len(labels) < 2:
        raise DataError(f"{run.path}: the data has only one label ({labels[0]!r}); give the label set with --labels")
    return labels


def _accuracy(run: EvalRun) -> dict[str, float]:
    from llmkit.tasks import classify

    labels = _labels(run)
    advance = run.progress("classifying", len(run.records))
    pred = []
    for r in run.records:
        if not isinstance(r["text"], str):
            raise DataError(f"{run.path}:{r['_line']}: 'text' must be a string")
        pred.append(classify(run.llm, r["text"], labels).label)
        advance(1)
    gold = [str(r["label"]) for r in run.records]
    return {"accuracy": sum(g == p for g, p in zip(gold, pred)) / len(gold), "macro_f1": macro_f1(gold, pred)}


def _multiple_choice(run: EvalRun) -> dict[str, float]:
    """As lm-evaluation-harness scores multiple choice: the log-likelihood of " choice" after
    "Question: ...\\nAnswer:"; ``acc`` takes the highest sum, ``acc_norm`` the highest sum per byte."""
    from llmkit.tasks import continuation_logprobs

    tok = run.llm.tokenizer
    pairs, spans, answers, lengths = [], [], [], []
    for r in run.records:
        where = f"{run.path}:{r['_line']}"
        choices, answer = r["choices"], r["answer"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of at least two strings")
        if isinstance(answer, bool) or not isinstance(answer, (int, str)):
            raise DataError(f"{where}: 'answer' must be the index of the right choice or its text")
        if isinstance(answer, str):
            if answer not in choices:
                raise DataError(f"{where}: answer {answer!r} is not one of the choices")
            answer = choices.index(answer)
        if not 0 <= answer < len(choices):
            raise DataError(f"{where}: answer index {answer} is out of range for {len(choices)} choices")
        context = f"Question: {r['question']}\nAnswer:"
        ctx_ids = tok.encode(context, add_special_tokens=True)
        start = len(pairs)
        for choice in choices:
            whole = tok.encode(context + " " + choice, add_special_tokens=True)
            # the continuation's tokens as the whole text has them, unless the boundary merged
            cont = whole[len(ctx_ids):] if whole[: len(ctx_ids)] == ctx_ids else tok.encode(" " + choice)
            pairs.append((ctx_ids, cont))
            lengths.append(len((" " + choice).encode("utf-8")))
        spans.append((start, len(pairs)))
        answers.append(answer)
    logps = continuation_logprobs(run.llm, pairs, progress=run.progress("scoring choices", len(pairs)))
    acc = acc_norm = 0
    for (a, b), answer in zip(spans, answers):
        sums = [sum(logps[i]) for i in range(a, b)]
        normed = [s / lengths[i] for s, i in zip(sums, range(a, b))]
        acc += max(range(len(sums)), key=sums.__getitem__) == answer
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == answer
    return {"acc": acc / len(spans), "acc_norm": acc_norm / len(spans)}


def _retrieval(run: EvalRun) -> dict[str, float]:
    from llmkit.tasks import embed

    queries = [str(r["query"]) for r in run.records]
    passages = list(dict.fromkeys(str(r["passage"]) for r in run.records))
    relevant = [passages.index(str(r["passage"])) for r in run.records]
    advance = run.progress("embedding", 2)
    q = embed(run.llm, queries)
    advance(1)
    p = embed(run.llm, passages)
    advance(1)
    r1, mrr = recall_at_1(q, p, relevant)
    bow = bow_vectors(queries + passages)
    b1, bmrr = recall_at_1(bow[: len(queries)], bow[len(queries):], relevant)
    return {"recall_at_1": r1, "mrr": mrr, "bow_recall_at_1": b1, "bow_mrr": bmrr}


BUILTIN_METRICS: dict[str, Metric] = {
    "perplexity": Metric("perplexity", "Perplexity with a sliding window (--window, --stride).",
                         _perplexity, ("text",), "text"),
    "bleu": Metric("bleu", "BLEU (sacrebleu) of generations against references.", _bleu,
                   ("input", "reference"), "translation"),
    "chrf": Metric("chrf", "chrF (sacrebleu) of generations against references.", _chrf,
                   ("input", "reference"), "translation"),
    "rouge": Metric("rouge", "ROUGE-1/2/L F1 (rouge-score, stemmed) of generations against references.",
                    _rouge, ("input", "reference"), "summaries"),
    "accuracy": Metric("accuracy", "Accuracy and macro F1 of classify over {text, label}.", _accuracy,
                       ("text", "label"), "sentiment"),
    "multiple_choice": Metric("multiple_choice", "Multiple choice by log-likelihood (acc, acc_norm).",
                              _multiple_choice, ("question", "choices", "answer"), "multiple_choice"),
    "retrieval": Metric("retrieval", "recall@1 and MRR of embeddings vs a bag-of-words baseline.",
                        _retrieval, ("query", "passage"), "retrieval"),
}


def list_metrics() -> dict[str, Metric]:
    from llmkit.plugins import registry

    return registry("metrics")


def get_metric(name: str) -> Metric:
    metrics = list_metrics()
    if name not in metrics:
        raise DataError(f"no evaluation task named {name!r}; known: {', '.join(sorted(metrics))}")
    return metrics[name]


# ------------------------------------------------------------------------------------------ runs

def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def evaluate(models: Sequence[Any], tasks: Sequence[str], data: str | Path | None = None, *,
             limit: int | None = None, seed: int = 0, options: dict[str, Any] | None = None,
             progress: Callable[[str, int], Callable[[int], None]] | None = None,
             load: Callable[[str], Any] | None = None) -> dict:
    """Evaluate each model (an ``LLM`` or a name to load) on each task over one data set.

    Returns the report: ``{llmkit, tasks, data: {path, sha256, records}, settings, results: [{model,
    path, format, sha256, seconds, metrics}]}``.
    """
    import llmkit

    metrics = [get_metric(t) for t in tasks]
    if not metrics:
        raise DataError("no evaluation task given")
    if data is None:
        shipped = {m.data for m in metrics}
        if len(shipped) != 1 or None in shipped:
            raise DataError("these tasks have no common shipped data set: give one with --data")
        data = shipped.pop()
    path = resolve_data(data)
    fields = tuple(dict.fromkeys(f for m in metrics for f in m.fields))
    if path.suffix == ".txt" and fields != ("text",):
        raise DataError(f"{path}: a .txt file only serves perplexity; {', '.join(tasks)} need{'s' if len(tasks) == 1 else ''} JSONL")
    records = load_records(path, fields, limit)
    options = dict(options or {})
    if options.get("temperature") and options.get("seed") is None:
        options["seed"] = seed
    progress = progress or _no_progress
    results = []
    for model in models:
        llm = model if not isinstance(model, (str, Path)) else (load or llmkit.load)(str(model))
        torch.manual_seed(seed)
        run = EvalRun(llm, records, path, options, progress)
        start = time.perf_counter()
        scores: dict[str, dict[str, float]] = {}
        for metric in metrics:
            scores[metric.name] = metric.compute(run)
        results.append({
            "model": getattr(llm, "name", "") or str(model), "path": str(getattr(llm, "path", "") or ""),
            "format": getattr(llm, "format", ""), "sha256": model_sha256(llm),
            "seconds": round(time.perf_counter() - start, 3), "metrics": scores,
        })
    return {
        "llmkit": llmkit.__version__,
        "tasks": list(tasks),
        "data": {"path": str(path), "sha256": file_sha256(path), "records": len(records), "limit": limit},
        "settings": {"seed": seed, **{k: v for k, v in options.items() if v is not None}},
        "results": results,
    }


def format_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) for a side-by-side table: one row per metric, one column per model."""
    header = ["task", "metric"] + [r["model"] for r in report["results"]]
    rows = []
    for task in report["tasks"]:
        names = list(dict.fromkeys(k for r in report["results"] for k in r["metrics"].get(task, {})))
        for name in names:
            row = [task, name]
            for r in report["results"]:
                value = r["metrics"].get(task, {}).get(name)
                row.append("-" if value is None else (str(value) if isinstance(value, int) else f"{value:.4f}"))
            rows.append(row)
    return header, rows
