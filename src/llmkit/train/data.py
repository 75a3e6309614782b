"""``llmkit prepare``: raw files -> clean documents -> token ids packed in binary shards.

Cleaning (``llmkit.train.pipeline``) works file by file, in this process or on Ray, into a cache of
finished parts beside ``out`` (so an interrupted run resumes where it stopped), then removes exact
and near duplicates across all files into a temporary JSONL file; a new tokenizer is trained from
that file when asked, and a second pass tokenizes it into shards. Memory does not grow with the
corpus beyond one hash and one MinHash signature per kept document. Everything is written into a
temporary folder renamed into place at the end: a failure writes nothing.

Layout of the output folder::

    meta.json            tokenizer, dtype, shards with token counts, cleaning report, sources (sha256)
    tokenizer/           tokenizer.json + tokenizer_config.json
    train-000.bin ...    token ids (uint16 when the vocabulary fits, else uint32), documents
    val-000.bin ...      separated by the end-of-text token
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from llmkit.errors import read_jsonl  # noqa: F401  (shared with evaluation and fine-tuning)
from llmkit.fsutil import atomic_dir
from llmkit.train import clean, extract
from llmkit.train.clean import NearDuplicates
from llmkit.train.errors import DataError
from llmkit.train.filters import LanguageSettings, QualitySettings
from llmkit.train.pipeline import (CleanerCounts, Parts, Report, Settings, default_steps,  # noqa: F401
                                   deduplicate, describe, run_cleaners, run_stage1)
from llmkit.train.read import Source, find_sources

ENDOFTEXT = "<|endoftext|>"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
            html_format: str = "text", text_field: str = "text", lang: Sequence[str] | str | None = ("en",),
            lang_threshold: float = 0.65, quality: bool | QualitySettings = True, pii: bool = True,
            use_ray: bool = False, progress: bool = True, log=print) -> dict[str, Any]:
    """Clean, filter, deduplicate, tokenize and pack documents into ``out``; return the metadata written.

    tokenizer: a model (folder or name) whose tokenizer to use; None trains a byte-level BPE of
    ``vocab_size``. near_duplicates: MinHash similarity threshold, None to keep near duplicates.
    demo: add the embedded corpus (the Python standard library's docstrings and documentation).
    html_format: "text" or "markdown" for web pages. text_field: the JSONL field or Parquet column.
    lang: languages to keep (fastText codes: "en", "fr", ...), None or "any" to keep every language;
    lang_threshold: the lowest probability kept. quality: the Gopher and C4 rules (False: off; a
    ``QualitySettings`` to change thresholds). pii: replace e-mail addresses, IP addresses and
    phone numbers. use_ray: clean the files on Ray (a local instance, or the cluster RAY_ADDRESS names).
    """
    from tqdm import tqdm

    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if html_format not in extract.FORMATS:
        raise DataError(f"--html-format must be one of {', '.join(extract.FORMATS)}, got {html_format!r}")
    if not 0 <= lang_threshold <= 1:
        raise DataError(f"--lang-threshold must be in [0, 1], got {lang_threshold}")
    sources = find_sources(inputs)
    if not sources and not demo:
        raise DataError("no input: give files or folders to prepare, or --demo for the built-in corpus")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").exists():
        raise DataError(f"{out} exists and is not a prepared data folder: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(lang, str):
        lang = None if lang.strip().lower() in ("any", "all", "") else [c.strip() for c in lang.split(",") if c.strip()]
    language = LanguageSettings(tuple(lang), lang_threshold) if lang else None
    quality_settings = quality if isinstance(quality, QualitySettings) else (QualitySettings() if quality else None)

    html, norm, cleaners = default_steps()
    if html is clean.html_to_text:  # the built-in extractor, in the format asked for
        html = functools.partial(extract.html_to_text, format=html_format)
    near = NearDuplicates(threshold=near_duplicates) if near_duplicates else None
    settings = Settings(html=html, normalize=norm, cleaners=cleaners, text_field=text_field, min_chars=min_chars,
                        language=language, quality=quality_settings, pii=pii, near=near)
    settings.describe = describe(html_format, text_field, min_chars, language, quality_settings, pii, near,
                                 html, norm, cleaners)

    files = [{"path": s.path, "sha256": sha256_file(Path(s.path)), "bytes": os.path.getsize(s.path)} for s in sources]
    keys = [settings.key(f"{f['path']}:{f['sha256']}") for f in files]
    if demo:
        from llmkit.train.demo import stdlib_root

        sources.append(Source("demo", "demo"))
        files.append({"path": f"demo: Python {sys.version.split()[0]} standard library at {stdlib_root()}"})
        keys.append(settings.key(files[-1]["path"]))
    parts = Parts(out.parent / f".{out.name}.parts")
    resumed = run_stage1(sources, keys, settings, parts, use_ray=use_ray, progress=progress, tqdm=tqdm)
    if resumed:
        log(f"resumed: {resumed} of {len(sources)} files were already cleaned (in {parts.folder})")
    with atomic_dir(out) as tmp:
        meta = _prepare(keys, parts, files, settings, tmp, tokenizer, vocab_size, val_fraction, shard_tokens,
                        progress, log, tqdm)
    parts.remove()
    return meta


def _prepare(keys, parts: Parts, sources, settings: Settings, tmp: Path, tokenizer_name, vocab_size, val_fraction,
             shard_tokens, progress, log, tqdm) -> dict[str, Any]:
    # stage 2: exact and near duplicates across every file -> clean.jsonl
    report = Report(cleaners={name: CleanerCounts() for name in settings.cleaners})
    report.settings = settings.describe
    clean_path = tmp / "clean.jsonl"
    with open(clean_path, "w", encoding="utf-8") as f:
        for text in tqdm(deduplicate(keys, parts, report, settings.near), desc="deduplicating", unit=" docs",
                         disable=not progress):
            f.write(json.dumps(text, ensure_ascii=False) + "\n")
    if report.kept_docs == 0:
        for line in report.lines():
            log(line)
        raise DataError(f"no documents left after cleaning ({report.read_docs} read, {len(report.skipped)} files "
                        f"skipped; the report above says what removed them): give more text, or loosen the "
                        "filters (--min-chars, --lang, --no-quality)")
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
