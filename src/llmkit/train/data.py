"""``llmkit prepare``: raw files -> clean documents -> token ids packed in binary shards.

Two streaming passes, so memory does not grow with the corpus (beyond one hash per document for
deduplication): pass 1 reads, cleans (normalisation, then the cleaners plugins register through
``register_cleaners``), filters and deduplicates into a temporary JSONL file (and trains a
tokenizer from it when asked); pass 2 tokenizes that file into shards. Everything is
written into a temporary folder renamed into place at the end: a failure writes nothing.

Layout of the output folder::

    meta.json            tokenizer, dtype, shards with token counts, cleaning report, sources (sha256)
    tokenizer/           tokenizer.json + tokenizer_config.json
    train-000.bin ...    token ids (uint16 when the vocabulary fits, else uint32), documents
    val-000.bin ...      separated by the end-of-text token
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from llmkit.errors import read_jsonl  # shared with evaluation
from llmkit.fsutil import atomic_dir
from llmkit.train.clean import NearDuplicates, exact_key, html_to_text, normalize
from llmkit.train.errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
ENDOFTEXT = "<|endoftext|>"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ------------------------------------------------------------------ reading

def _files(inputs: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    known = TEXT_SUFFIXES | HTML_SUFFIXES | JSONL_SUFFIXES
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in known)
            if not found:
                raise DataError(f"{path}: no .txt, .md, .html or .jsonl files in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path} does not exist")
    return files


def _jsonl_documents(path: Path) -> Iterator[tuple[str, str]]:
    for number, row in read_jsonl(path):
        if isinstance(row.get("text"), str):
            yield f"{path}:{number}", row["text"]
        elif isinstance(row.get("messages"), list):
            try:
                text = "\n\n".join(str(m["content"]) for m in row["messages"] if m.get("content"))
            except (TypeError, KeyError, AttributeError):
                raise DataError(f"{path}:{number}: 'messages' must be a list of {{role, content}} objects") from None
            yield f"{path}:{number}", text
        else:
            raise DataError(f"{path}:{number}: no 'text' string or 'messages' list (keys: {sorted(row)})")


def read_documents(files: list[Path], html: Callable[[str], str | None] = html_to_text) -> Iterator[tuple[str, str]]:
    """(source, raw text) for every document in the given files; ``html`` turns a page into text."""
    for path in files:
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            yield from _jsonl_documents(path)
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise DataError(f"{path}: cannot read it ({exc.strerror})") from None
        yield str(path), (html(text) or "") if suffix in HTML_SUFFIXES else text


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ cleaning report

@dataclass
class CleanerCounts:
    """What one plugin cleaner did: documents it changed (and the characters that removed), and
    documents it dropped (and their characters)."""

    changed: int = 0
    removed_chars: int = 0
    dropped: int = 0
    dropped_chars: int = 0


@dataclass
class Report:
    """Documents and characters seen, and dropped at each step."""

    read_docs: int = 0
    read_chars: int = 0
    dropped: dict[str, list[int]] = field(default_factory=lambda: {
        "empty": [0, 0], "too_short": [0, 0], "exact_duplicate": [0, 0], "near_duplicate": [0, 0]})
    kept_docs: int = 0
    kept_chars: int = 0
    normalization_removed_chars: int = 0
    cleaners: dict[str, CleanerCounts] = field(default_factory=dict)  # the plugins', by name

    def drop(self, reason: str, chars: int) -> None:
        self.dropped[reason][0] += 1
        self.dropped[reason][1] += chars

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": {"documents": self.read_docs, "characters": self.read_chars},
            "normalization_removed_characters": self.normalization_removed_chars,
            "cleaners": {name: {"changed": {"documents": c.changed, "characters_removed": c.removed_chars},
                                "dropped": {"documents": c.dropped, "characters": c.dropped_chars}}
                         for name, c in self.cleaners.items()},
            "dropped": {k: {"documents": d, "characters": c} for k, (d, c) in self.dropped.items()},
            "kept": {"documents": self.kept_docs, "characters": self.kept_chars},
        }

    def lines(self) -> list[str]:
        out = [f"read        {self.read_docs:>9,} documents {self.read_chars:>13,} characters"]
        out.append(f"normalized  {'':>9} {'':>9} {-self.normalization_removed_chars:>13,} characters")
        for name, c in self.cleaners.items():
            out.append(f"{name:<16}{-c.dropped:>5,} documents {-(c.removed_chars + c.dropped_chars):>13,} characters "
                       f"({c.changed:,} documents changed)")
        for k, (d, c) in self.dropped.items():
            out.append(f"{k:<16}{-d:>5,} documents {-c:>13,} characters")
        out.append(f"kept        {self.kept_docs:>9,} documents {self.kept_chars:>13,} characters")
        return out


# ------------------------------------------------------------------ plugin cleaners

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


# ------------------------------------------------------------------ tokenizers

def train_tokenizer(texts: Iterable[str], vocab_size: int, progress: bool = False):
    """A byte-level BPE tokenizer (HF ``tokenizers``) with <|endoftext|> and ChatML tokens, wrapped
    as an llmkit Tokenizer whose chat template is ChatML."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from llmkit.tokenizer import Tokenizer

    specials = [ENDOFTEXT, "<|im_start|>", "<|im_end|>"]
    if vocab_size < 256 + len(specials) + 1:
        raise DataError(f"--vocab-size {vocab_size} is too small: a byte-level tokenizer needs at least 260")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, special_tokens={"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT,
                                              "pad_token": ENDOFTEXT},
                     chat_template=CHATML, extra_eos_token_ids=[backend.token_to_id("<|im_end|>")])


def load_tokenizer(name: str | Path):
    """The tokenizer of a model: a folder with tokenizer.json, or anything ``llmkit.load`` takes."""
    from llmkit.tokenizer import Tokenizer

    path = Path(name)
    if path.is_dir() and (path / "tokenizer.json").exists():
        return Tokenizer.from_folder(path)
    import llmkit

    return llmkit.load(str(name), progress=False).tokenizer


def separator_id(tokenizer) -> int:
    for candidate in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.token_to_id(ENDOFTEXT)):
        if candidate is not None:
            return candidate
    raise DataError("the tokenizer has no end-of-sequence or beginning-of-sequence token to separate documents")


# ------------------------------------------------------------------ prepare

def _is_val(index: int, total: int, fraction: float) -> bool:
    """Spread the validation documents evenly through the corpus; at least one when there are two
    or more documents and a non-zero fraction."""
    if fraction <= 0 or total < 2:
        return False
    if math.floor(total * fraction) == 0:
        return index == total - 1
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


class _ShardWriter:
    def __init__(self, folder: Path, split: str, dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.limit = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.file = None
        self.total = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None or self.shards[-1]["tokens"] >= self.limit:
                self._next()
            room = self.limit - self.shards[-1]["tokens"]
            part, ids = ids[:room], ids[room:]
            part.astype(self.dtype).tofile(self.file)
            self.shards[-1]["tokens"] += len(part)
            self.total += len(part)

    def _next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):03d}.bin"
        self.file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None


def prepare(inputs: Iterable[str | Path] = (), out: str | Path = "data", *, tokenizer: str | Path | None = None,
            vocab_size: int = 8192, val_fraction: float = 0.05, min_chars: int = 64,
            near_duplicates: float | None = 0.8, demo: bool = False, shard_tokens: int = 100_000_000,
            progress: bool = True, log=print) -> dict[str, Any]:
    """Clean, deduplicate, tokenize and pack documents into ``out``; return the metadata written.

    tokenizer: a model (folder or name) whose tokenizer to use; None trains a byte-level BPE of
    ``vocab_size``. near_duplicates: MinHash similarity threshold, None to keep near duplicates.
    demo: add the embedded corpus (the Python standard library's docstrings and documentation).
    """
    from tqdm import tqdm

    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    files = _files(inputs)
    if not files and not demo:
        raise DataError("no input: give files or folders to prepare, or --demo for the built-in corpus")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").exists():
        raise DataError(f"{out} exists and is not a prepared data folder: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        meta = _prepare(files, tmp, tokenizer, vocab_size, val_fraction, min_chars, near_duplicates, demo,
                        shard_tokens, progress, log, tqdm)
    return meta


def _prepare(files, tmp: Path, tokenizer_name, vocab_size, val_fraction, min_chars, near_threshold, demo,
             shard_tokens, progress, log, tqdm) -> dict[str, Any]:
    from llmkit.plugins import registry

    # "html" and "normalize" are prepare's own steps (a plugin may replace them by name); every other
    # registered cleaner runs after normalisation, before the length and duplicate filters
    cleaners = dict(registry("cleaners"))
    html, norm = cleaners.pop("html", html_to_text), cleaners.pop("normalize", normalize)
    sources = [{"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files]
    documents: Iterable[tuple[str, str]] = read_documents(files, html)
    if demo:
        from itertools import chain

        from llmkit.train.demo import stdlib_documents, stdlib_root

        import sys

        sources.append({"path": f"demo: Python {sys.version.split()[0]} standard library at {stdlib_root()}"})
        documents = chain(documents, stdlib_documents())

    # pass 1: clean (normalize, then the plugins' cleaners), filter, deduplicate -> clean.jsonl
    report = Report(cleaners={name: CleanerCounts() for name in cleaners})
    exact: set[bytes] = set()
    near = NearDuplicates(threshold=near_threshold) if near_threshold else None
    clean_path = tmp / "clean.jsonl"
    with open(clean_path, "w", encoding="utf-8") as f:
        for source, raw in tqdm(documents, desc="cleaning", unit=" docs", disable=not progress):
            report.read_docs += 1
            report.read_chars += len(raw)
            text = norm(raw) or ""
            report.normalization_removed_chars += len(raw) - len(text)
            text = run_cleaners(cleaners, text, source, report) if text else text
            if text is None:
                continue
            if not text:
                report.drop("empty", 0)
                continue
            if len(text) < min_chars:
                report.drop("too_short", len(text))
                continue
            key = exact_key(text)
            if key in exact:
                report.drop("exact_duplicate", len(text))
                continue
            exact.add(key)
            if near is not None and near.seen(text):
                report.drop("near_duplicate", len(text))
                continue
            report.kept_docs += 1
            report.kept_chars += len(text)
            f.write(json.dumps(text, ensure_ascii=False) + "\n")
    del exact, near
    if report.kept_docs == 0:
        raise DataError(f"no documents left after cleaning ({report.read_docs} read; "
                        f"minimum length {min_chars} characters): give more text or lower --min-chars")
    total = report.kept_docs

    def clean_texts(split: str | None = None) -> Iterator[str]:
        with open(clean_path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if split is None or (split == "val") == _is_val(i, total, val_fraction):
                    yield json.loads(line)

    # tokenizer
    if tokenizer_name is None:
        tok = train_tokenizer(clean_texts("train"), vocab_size, progress=progress)
        tokenizer_source = f"new byte-level BPE, vocabulary {tok.vocab_size}"
    else:
        tok = load_tokenizer(tokenizer_name)
        tokenizer_source = str(tokenizer_name)
    tok.save(tmp / "tokenizer")
    sep = separator_id(tok)
    vocab = tok.vocab_size
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32

    # pass 2: tokenize into shards
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
    unigram = np.zeros(vocab, dtype=np.int64)
    val_unigram = np.zeros(vocab, dtype=np.int64)
    docs = {"train": 0, "val": 0}
    bar = tqdm(total=total, desc="tokenizing", unit=" docs", disable=not progress)
    batch: list[str] = []
    index = 0

    def flush() -> None:
        nonlocal index
        for ids in tok.encode_batch(batch):
            split = "val" if _is_val(index, total, val_fraction) else "train"
            arr = np.asarray(ids + [sep], dtype=np.int64)
            writers[split].write(arr)
            np.add.at(unigram if split == "train" else val_unigram, arr, 1)
            docs[split] += 1
            index += 1
        bar.update(len(batch))
        batch.clear()

    for text in clean_texts():
        batch.append(text)
        if len(batch) == 256:
            flush()
    flush()
    bar.close()
    for w in writers.values():
        w.close()
    clean_path.unlink()

    # unigram baseline: the cross-entropy on validation of a model that ignores context (add-one smoothed)
    baseline = None
    if val_unigram.sum():
        p = (unigram + 1) / (unigram.sum() + vocab)
        baseline = float(-(val_unigram * np.log(p)).sum() / val_unigram.sum())
    meta = {
        "format": "llmkit-tokens-v1",
        "tokenizer": "tokenizer",
        "tokenizer_source": tokenizer_source,
        "vocab_size": vocab,
        "separator_id": sep,
        "dtype": np.dtype(dtype).name,
        "train": {"documents": docs["train"], "tokens": writers["train"].total, "shards": writers["train"].shards},
        "val": {"documents": docs["val"], "tokens": writers["val"].total, "shards": writers["val"].shards},
        "unigram_val_loss": baseline,
        "cleaning": report.to_dict(),
        "sources": sources,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for line in report.lines():
        log(line)
    log(f"tokens      train {writers['train'].total:,} ({docs['train']} documents), "
        f"validation {writers['val'].total:,} ({docs['val']} documents), vocabulary {vocab}")
    if baseline is not None:
        log(f"unigram baseline validation loss {baseline:.3f} (perplexity {math.exp(baseline):.1f})")
    return meta


# ------------------------------------------------------------------ reading shards back

class TokenData:
    """A prepared folder's shards, memory-mapped, seen as one stream per split."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            raise DataError(f"{self.folder}: no meta.json; make the folder with `llmkit prepare ... --out {folder}`")
        self.meta = json.loads(meta_path.read_text())
        self.vocab_size = int(self.meta["vocab_size"])
        dtype = np.dtype(self.meta["dtype"])
        self.splits: dict[str, list[np.ndarray]] = {}
        for split in ("train", "val"):
            arrays = []
            for shard in self.meta[split]["shards"]:
                if shard["tokens"]:
                    arrays.append(np.memmap(self.folder / shard["file"], dtype=dtype, mode="r",
                                            shape=(shard["tokens"],)))
            self.splits[split] = arrays
        self.starts = {s: np.cumsum([0] + [len(a) for a in arrs]) for s, arrs in self.splits.items()}

    def tokens(self, split: str) -> int:
        return int(self.starts[split][-1])

    def tokenizer(self):
        from llmkit.tokenizer import Tokenizer

        return Tokenizer.from_folder(self.folder / self.meta["tokenizer"])

    def window(self, split: str, start: int, length: int) -> np.ndarray:
        """``length`` tokens from ``start`` of the split's stream (crossing shard ends)."""
        arrays, starts = self.splits[split], self.starts[split]
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(starts, start, side="right") - 1)
        pos = start - int(starts[shard])
        while filled < length:
            part = arrays[shard][pos : pos + length - filled]
            out[filled : filled + len(part)] = part
            filled += len(part)
            shard, pos = shard + 1, 0
        return out
