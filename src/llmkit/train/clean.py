"""Turning raw documents into clean text: HTML to text, Unicode and whitespace normalisation,
exact and near-duplicate removal (MinHash with locality-sensitive hashing)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

import numpy as np

# ------------------------------------------------------------------ HTML


def html_to_text(html: str) -> str:
    """The main content of an HTML page as text (see ``llmkit.train.extract``): the built-in
    ``html`` step of ``llmkit prepare``, which a plugin may replace."""
    from llmkit.train.extract import html_to_text as extract

    return extract(html)


# ------------------------------------------------------------------ normalisation

# C0/C1 control characters except tab and newline; also lone surrogates and the BOM
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\ud800-\udfff]")


def normalize(text: str) -> str:
    """NFC normalisation, control characters removed, line endings unified, trailing spaces
    stripped, runs of blank lines collapsed to one. Spaces and tabs inside a line are kept as they
    are: in code they are meaning (indentation, alignment, a Makefile's tabs), and the extractor
    has already collapsed the layout whitespace of prose."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n").rstrip()


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

    def _keys(self, sig: np.ndarray) -> list[bytes]:
        return [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]

    def match(self, sig: np.ndarray) -> int | None:
        """The index of a remembered document that ``sig`` nearly duplicates, or None."""
        for band, key in enumerate(self._keys(sig)):
            other = self.buckets[band].get(key)
            if other is not None and float(np.mean(self.signatures[other] == sig)) >= self.threshold:
                return other
        return None

    def add(self, sig: np.ndarray) -> int:
        """Remember a document by its signature; return its index."""
        index = len(self.signatures)
        self.signatures.append(sig)
        for band, key in enumerate(self._keys(sig)):
            self.buckets[band].setdefault(key, index)
        return index

    def seen(self, text: str) -> bool:
        """True if ``text`` nearly duplicates a document kept before; else remember it, False."""
        sig = self.signature(text)
        if self.match(sig) is not None:
            return True
        self.add(sig)
        return False
