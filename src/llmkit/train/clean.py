"""Turning raw documents into clean text: HTML to text, Unicode and whitespace normalisation,
exact and near-duplicate removal (MinHash with locality-sensitive hashing)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from html.parser import HTMLParser

import numpy as np

# ------------------------------------------------------------------ HTML

_DROP = {"script", "style", "nav", "header", "footer", "aside", "noscript", "template", "svg", "form",
         "head", "iframe", "button", "menu"}
_BLOCK = {"p", "div", "section", "article", "main", "br", "li", "ul", "ol", "table", "tr", "h1", "h2", "h3",
          "h4", "h5", "h6", "pre", "blockquote", "dd", "dt", "dl", "hr", "figure", "figcaption", "td", "th"}
_VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "track", "wbr"}


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.dropping = 0  # depth inside dropped elements

    def handle_starttag(self, tag, attrs):
        if tag in _DROP:
            if tag not in _VOID:
                self.dropping += 1
        elif tag in _BLOCK and not self.dropping:
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag):
        if tag in _DROP:
            self.dropping = max(0, self.dropping - 1)
        elif tag in _BLOCK and not self.dropping:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.dropping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page: scripts, styles and navigation dropped, paragraph breaks kept."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    # inside a paragraph, source line breaks are just spaces
    text = "".join(parser.parts)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


# ------------------------------------------------------------------ normalisation

# C0/C1 control characters except tab and newline; also lone surrogates and the BOM
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\ud800-\udfff]")


def normalize(text: str) -> str:
    """NFC normalisation, control characters removed, line endings unified, trailing spaces
    stripped, runs of blank lines collapsed to one. Leading indentation is kept (code)."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = text.replace("\t", "    ")
    lines = [re.sub(r"(?<=\S) {2,}", " ", line.rstrip()) for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# ------------------------------------------------------------------ duplicates

def exact_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class NearDuplicates:
    """MinHash signatures over word 5-shingles, bucketed by bands (LSH); a document is a near
    duplicate when it shares a band with a kept document whose estimated Jaccard similarity is at
    least ``threshold``. 16 bands of 8 rows make pairs above ~0.7 similarity candidates (Leskovec,
    Rajaraman, Ullman, *Mining of Massive Datasets*, ch. 3)."""

    _PRIME = (1 << 61) - 1

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, bands: int = 16, shingle: int = 5,
                 seed: int = 0):
        if num_perm % bands:
            raise ValueError("num_perm must be a multiple of bands")
        self.threshold, self.bands, self.rows, self.shingle = threshold, bands, num_perm // bands, shingle
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 1 << 31, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint64)
        self.buckets: list[dict[bytes, int]] = [dict() for _ in range(bands)]
        self.signatures: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray:
        words = text.split()
        n = self.shingle
        grams = [" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))]
        h = np.fromiter((zlib.crc32(g.encode("utf-8")) for g in set(grams)), dtype=np.uint64)
        # (a*h + b) mod 2^32 per permutation: uint64 arithmetic wraps, the low 32 bits mix well enough
        hashed = (h[:, None] * self.a[None, :] + self.b[None, :]) & np.uint64(0xFFFFFFFF)
        return hashed.min(axis=0).astype(np.uint32)

    def seen(self, text: str) -> bool:
        """True if ``text`` nearly duplicates a document kept before; else remember it, False."""
        sig = self.signature(text)
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        for band, key in enumerate(keys):
            other = self.buckets[band].get(key)
            if other is not None and float(np.mean(self.signatures[other] == sig)) >= self.threshold:
                return True
        index = len(self.signatures)
        self.signatures.append(sig)
        for band, key in enumerate(keys):
            self.buckets[band].setdefault(key, index)
        return False
