"""The cleaning pipeline of ``llmkit prepare``, in two stages.

Stage 1 works on one input file at a time, so it runs in this process or spread over a Ray cluster
with the same result: read, extract (HTML), normalise, redact PII, run the plugins' cleaners, drop
empty and short documents, filter (language, Gopher, C4), and compute each kept document's MinHash
signature. Its result for a file, a *part*, is written to a cache folder under a key made of the
file's content hash and the settings, so a run interrupted and started again redoes only the
files it had not finished.

Stage 2 reads the parts back in input order and removes exact and near duplicates across all
files. Reading in input order makes the output the same however stage 1 was scheduled.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from llmkit.train.clean import NearDuplicates, exact_key, normalize
from llmkit.train.errors import DataError
from llmkit.train.filters import LanguageSettings, PIIRedactor, QualitySettings, build_filters, settings_dict
from llmkit.train.read import Source, Unreadable, read_source

FILTER_STEPS = ("language", "gopher_repetition", "gopher_quality", "c4")
DROP_STEPS = ("empty", "too_short", *FILTER_STEPS, "exact_duplicate", "near_duplicate")
PART_FORMAT = 1

# ------------------------------------------------------------------ report


@dataclass
class CleanerCounts:
    """What one cleaner did: documents it changed (and the characters that removed), and
    documents it dropped (and their characters)."""

    changed: int = 0
    removed_chars: int = 0
    dropped: int = 0
    dropped_chars: int = 0


@dataclass
class Report:
    """Documents and characters seen, changed and dropped at each step, and why."""

    read_docs: int = 0
    read_chars: int = 0
    extraction_removed_chars: int = 0  # page markup and boilerplate, HTML only
    normalization_removed_chars: int = 0
    pii: CleanerCounts = field(default_factory=CleanerCounts)
    pii_kinds: Counter = field(default_factory=Counter)
    cleaners: dict[str, CleanerCounts] = field(default_factory=dict)  # the plugins', by name
    dropped: dict[str, list[int]] = field(default_factory=lambda: {k: [0, 0] for k in DROP_STEPS})
    reasons: dict[str, Counter] = field(default_factory=lambda: {k: Counter() for k in DROP_STEPS})
    clusters: dict[str, int] = field(default_factory=lambda: {"exact_duplicate": 0, "near_duplicate": 0})
    kept_docs: int = 0
    kept_chars: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # files: path, reason
    settings: dict[str, Any] = field(default_factory=dict)

    def drop(self, step: str, chars: int, reason: str | None = None) -> None:
        self.dropped[step][0] += 1
        self.dropped[step][1] += chars
        if reason:
            self.reasons[step][reason] += 1

    # a part's report travels as JSON and is added into the run's
    def state(self) -> dict[str, Any]:
        return {"read": [self.read_docs, self.read_chars], "extracted": self.extraction_removed_chars,
                "normalized": self.normalization_removed_chars,
                "pii": asdict(self.pii), "pii_kinds": dict(self.pii_kinds),
                "cleaners": {k: asdict(c) for k, c in self.cleaners.items()}, "dropped": self.dropped,
                "reasons": {k: dict(c) for k, c in self.reasons.items()}, "skipped": self.skipped}

    def add(self, state: dict[str, Any]) -> None:
        self.read_docs += state["read"][0]
        self.read_chars += state["read"][1]
        self.extraction_removed_chars += state["extracted"]
        self.normalization_removed_chars += state["normalized"]
        for counts, other in [(self.pii, state["pii"])] + [
                (self.cleaners.setdefault(k, CleanerCounts()), v) for k, v in state["cleaners"].items()]:
            for key, value in other.items():
                setattr(counts, key, getattr(counts, key) + value)
        self.pii_kinds.update(state["pii_kinds"])
        for step, (docs, chars) in state["dropped"].items():
            self.dropped[step][0] += docs
            self.dropped[step][1] += chars
        for step, reasons in state["reasons"].items():
            self.reasons[step].update(reasons)
        self.skipped.extend(state["skipped"])

    def to_dict(self) -> dict[str, Any]:
        def counts(c: CleanerCounts) -> dict[str, Any]:
            return {"changed": {"documents": c.changed, "characters_removed": c.removed_chars},
                    "dropped": {"documents": c.dropped, "characters": c.dropped_chars}}

        dropped = {}
        for step, (docs, chars) in self.dropped.items():
            dropped[step] = {"documents": docs, "characters": chars}
            if self.reasons[step]:
                dropped[step]["reasons"] = dict(self.reasons[step].most_common())
            if step in self.clusters:
                dropped[step]["clusters"] = self.clusters[step]
        return {
            "read": {"documents": self.read_docs, "characters": self.read_chars},
            "skipped_files": self.skipped,
            "extraction_removed_characters": self.extraction_removed_chars,
            "normalization_removed_characters": self.normalization_removed_chars,
            "pii": {"changed": counts(self.pii)["changed"], "replaced": dict(self.pii_kinds)},
            "cleaners": {name: counts(c) for name, c in self.cleaners.items()},
            "dropped": dropped,
            "kept": {"documents": self.kept_docs, "characters": self.kept_chars},
            "settings": self.settings,
        }

    def lines(self) -> list[str]:
        def row(label: str, docs: int | str, chars: int, note: str = "") -> str:
            docs = f"{docs:>9,} documents" if isinstance(docs, int) else f"{docs:>19}"
            return f"{label:<18}{docs} {chars:>13,} characters" + (f" ({note})" if note else "")

        out = [row("read", self.read_docs, self.read_chars)]
        out += [f"skipped file      {s['path']}: {s['reason']}" for s in self.skipped]
        if self.extraction_removed_chars:
            out.append(row("html extracted", "", -self.extraction_removed_chars))
        out.append(row("normalized", "", -self.normalization_removed_chars))
        if self.settings.get("pii", self.pii.changed > 0):
            kinds = ", ".join(f"{n:,} {k.lower()}" for k, n in self.pii_kinds.most_common()) or "none found"
            out.append(row("pii", 0, -self.pii.removed_chars, f"{self.pii.changed:,} documents changed: {kinds}"))
        for name, c in self.cleaners.items():
            out.append(row(name, -c.dropped, -(c.removed_chars + c.dropped_chars), f"{c.changed:,} documents changed"))
        for step, (docs, chars) in self.dropped.items():
            why = ", ".join(f"{reason} {n:,}" for reason, n in self.reasons[step].most_common(6))
            if step in self.clusters and docs:
                why = f"{self.clusters[step]:,} clusters" + (f"; {why}" if why else "")
            out.append(row(step, -docs, -chars, why))
        out.append(row("kept", self.kept_docs, self.kept_chars))
        return out


# ------------------------------------------------------------------ settings


@dataclass
class Settings:
    """Everything stage 1 needs, picklable so that Ray can send it to its workers (the cleaners
    travel by reference to their module, so plugins must be installed where the workers run)."""

    html: Callable[[str], str | None]
    normalize: Callable[[str], str]
    cleaners: dict[str, Callable[[str], str | None]]
    text_field: str = "text"
    min_chars: int = 64
    language: LanguageSettings | None = None
    quality: QualitySettings | None = None
    pii: bool = True
    near: NearDuplicates | None = None
    describe: dict[str, Any] = field(default_factory=dict)  # the choices, for the report and the cache key

    def key(self, source_id: str) -> str:
        """The cache key of one input's part: its content and every setting that shapes the part."""
        text = json.dumps([PART_FORMAT, source_id, self.describe], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def describe(html_format: str, text_field: str, min_chars: int, language, quality, pii: bool, near,
             html, norm, cleaners) -> dict[str, Any]:
    def name(fn) -> str:
        if isinstance(fn, functools.partial):
            return f"{name(fn.func)}({', '.join(f'{k}={v!r}' for k, v in fn.keywords.items())})"
        return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"

    return {"html_format": html_format, "text_field": text_field, "min_chars": min_chars,
            "filters": settings_dict(language, quality), "pii": pii,
            "near_duplicates": None if near is None else {"threshold": near.threshold, "num_perm": len(near.a),
                                                          "bands": near.bands, "shingle_words": near.shingle},
            "steps": {"html": name(html), "normalize": name(norm), "cleaners": {k: name(f) for k, f in cleaners.items()}}}


# ------------------------------------------------------------------ stage 1: one input at a time


def run_cleaners(cleaners: dict[str, Callable[[str], str | None]], text: str, source: str,
                 report: Report) -> str | None:
    """``text`` through each plugin cleaner in turn; None as soon as one drops it."""
    for name, step in cleaners.items():
        try:
            out = step(text)
        except Exception as exc:  # a plugin's bug: say whose, and on which document
            raise DataError(f"{source}: cleaner {name!r} failed: {type(exc).__name__}: {exc}") from exc
        counts = report.cleaners[name]
        if out is None:
            counts.dropped += 1
            counts.dropped_chars += len(text)
            return None
        if not isinstance(out, str):
            raise DataError(f"cleaner {name!r} returned {type(out).__name__}: a cleaner returns the cleaned text, "
                            "or None to drop the document")
        if out != text:
            counts.changed += 1
            counts.removed_chars += len(text) - len(out)
        text = out
    return text


class _Stage1:
    """The per-document steps, built once per worker (the language model loads once)."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.filters = build_filters(settings.language, settings.quality)
        self.pii = PIIRedactor() if settings.pii else None

    def document(self, where: str, raw: str, kind: str, report: Report) -> str | None:
        s = self.s
        report.read_docs += 1
        report.read_chars += len(raw)
        text = raw
        if kind == "html":
            text = s.html(raw) or ""
            report.extraction_removed_chars += len(raw) - len(text)
        normalized = s.normalize(text) or ""
        report.normalization_removed_chars += len(text) - len(normalized)
        text = normalized
        if text and self.pii is not None:
            redacted = self.pii(text)
            if redacted != text:
                report.pii.changed += 1
                report.pii.removed_chars += len(text) - len(redacted)
            text = redacted
        if text:
            text = run_cleaners(s.cleaners, text, where, report)
            if text is None:
                return None
        if not text:
            report.drop("empty", 0)
            return None
        if len(text) < s.min_chars:
            report.drop("too_short", len(text))
            return None
        if kind != "demo":  # the demo corpus is documentation, not web text: the web filters would gut it
            for step, rule in self.filters:
                reason = rule(text)
                if reason is not None:
                    report.drop(step, len(text), reason)
                    return None
        return text

    def part(self, source: Source) -> bytes:
        """One input's part: a JSON line with its report, then one per kept document
        (where it came from, the text, its MinHash signature)."""
        report = Report(cleaners={name: CleanerCounts() for name in self.s.cleaners})
        lines: list[str] = []
        if self.pii is not None:
            self.pii.counts.clear()
        try:
            for where, raw in read_source(source, self.s.text_field):
                text = self.document(where, raw, source.kind, report)
                if text is None:
                    continue
                row = {"where": where, "text": text}
                if self.s.near is not None:
                    row["minhash"] = base64.b64encode(self.s.near.signature(text).tobytes()).decode()
                lines.append(json.dumps(row, ensure_ascii=False))
        except Unreadable as exc:  # nothing from this file is kept
            report = Report(cleaners={name: CleanerCounts() for name in self.s.cleaners})
            report.skipped.append({"path": source.path, "reason": str(exc)})
            lines = []
        if self.pii is not None:
            report.pii_kinds.update(self.pii.counts)
        head = json.dumps({"format": PART_FORMAT, "source": source.path, "report": report.state()})
        return ("\n".join([head, *lines]) + "\n").encode("utf-8")


# ------------------------------------------------------------------ the parts cache


class Parts:
    """Finished parts of a run, one file each under ``folder``, named by their key."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.jsonl"

    def done(self, key: str) -> bool:
        return self.path(key).exists()

    def write(self, key: str, data: bytes) -> None:
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(key))

    def read(self, key: str) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
        f = open(self.path(key), encoding="utf-8")
        head = json.loads(f.readline())
        if head.get("format") != PART_FORMAT:
            f.close()
            raise DataError(f"{self.path(key)}: written by another llmkit version: delete {self.folder}")

        def rows() -> Iterator[dict[str, Any]]:
            with f:
                for line in f:
                    yield json.loads(line)

        return head, rows()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def run_stage1(sources: list[Source], keys: list[str], settings: Settings, parts: Parts, *, use_ray: bool,
               progress: bool, tqdm) -> int:
    """Make the missing parts; return how many were already done (from an interrupted run)."""
    todo = [(i, s) for i, s in enumerate(sources) if not parts.done(keys[i])]
    bar = tqdm(total=len(sources), initial=len(sources) - len(todo), desc="cleaning", unit=" files",
               disable=not progress)
    if todo:
        if use_ray:
            _stage1_ray(todo, keys, settings, parts, bar)
        else:
            stage = _Stage1(settings)
            for i, source in todo:
                parts.write(keys[i], stage.part(source))
                bar.update(1)
    bar.close()
    return len(sources) - len(todo)


def _ray_part(row: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """One input on a Ray worker; a DataError comes back as a message, not as a Ray failure."""
    global _WORKER_STAGE
    if _WORKER_STAGE is None or _WORKER_STAGE.s.describe != settings.describe:
        _WORKER_STAGE = _Stage1(settings)
    source = Source(row["path"], row["kind"], row["compression"] or None)
    try:
        return {"index": row["index"], "part": _WORKER_STAGE.part(source), "error": ""}
    except DataError as exc:
        return {"index": row["index"], "part": b"", "error": str(exc)}


_WORKER_STAGE: _Stage1 | None = None


def _stage1_ray(todo, keys, settings: Settings, parts: Parts, bar) -> None:
    try:
        import ray
    except ImportError:
        raise DataError("--ray needs Ray: pip install 'llmkit[ray]'") from None
    import logging

    started = not ray.is_initialized()
    if started:
        # RAY_ADDRESS (Ray's own variable) joins an existing cluster; without it a local instance starts
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts files; Ray Data's would count blocks
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        items = [{"index": i, "path": s.path, "kind": s.kind, "compression": s.compression or ""} for i, s in todo]
        # a few files per task: one task per file costs more in scheduling than small files take
        blocks = max(1, min(len(items), len(items) // 4))
        dataset = ray.data.from_items(items, override_num_blocks=blocks).map(
            _ray_part, fn_kwargs={"settings": settings}, num_cpus=1)
        for row in dataset.iter_rows():
            if row["error"]:
                raise DataError(row["error"])
            parts.write(keys[row["index"]], row["part"])
            bar.update(1)
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------ stage 2: across all inputs


def deduplicate(keys: Iterable[str], parts: Parts, report: Report, near: NearDuplicates | None) -> Iterator[str]:
    """The kept documents of every part, in input order, without exact or near duplicates;
    the parts' reports are added to ``report``, with the duplicates and their clusters."""
    exact: dict[bytes, int] = {}  # content hash -> duplicates of it seen (for the cluster count)
    near_hits: Counter[int] = Counter()
    for key in keys:
        head, rows = parts.read(key)
        report.add(head["report"])
        for row in rows:
            text = row["text"]
            h = exact_key(text)
            if h in exact:
                exact[h] += 1
                report.drop("exact_duplicate", len(text))
                continue
            exact[h] = 0
            if near is not None:
                sig = np.frombuffer(base64.b64decode(row["minhash"]), dtype=np.uint32)
                match = near.match(sig)
                if match is not None:
                    near_hits[match] += 1
                    report.drop("near_duplicate", len(text))
                    continue
                near.add(sig)
            report.kept_docs += 1
            report.kept_chars += len(text)
            yield text
    report.clusters["exact_duplicate"] = sum(1 for n in exact.values() if n)
    report.clusters["near_duplicate"] = len(near_hits)


def default_steps() -> tuple[Callable, Callable, dict[str, Callable]]:
    """html, normalize and the plugins' cleaners, from the registry (a plugin may replace the
    first two by registering those names)."""
    from llmkit.plugins import registry
    from llmkit.train.clean import html_to_text

    cleaners = dict(registry("cleaners"))
    return cleaners.pop("html", html_to_text), cleaners.pop("normalize", normalize), cleaners
