"""The redaction itself: regular expressions plus a checksum where one exists (Luhn for cards,
mod-97 for IBANs), so that order numbers and the like are not taken for card numbers."""

from __future__ import annotations

import re
from dataclasses import dataclass


def _luhn_ok(digits: str) -> bool:
    total, double = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if double:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        double = not double
    return total % 10 == 0


def _card_ok(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    return 13 <= len(digits) <= 19 and _luhn_ok(digits)


def _iban_ok(match: str) -> bool:
    s = re.sub(r"\s", "", match).upper()
    s = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in s)) % 97 == 1


def _ipv4_ok(match: str) -> bool:
    return all(0 <= int(part) <= 255 for part in match.split("."))


# (label, pattern, validator). Order matters: earlier kinds claim their text first (a card
# number is not also reported as a phone number).
PATTERNS: list[tuple[str, re.Pattern, object]] = [
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"), None),
    ("IBAN", re.compile(r"\b[A-Z]{2}\d{2}(?:\s?[A-Z0-9]{4}){2,7}(?:\s?[A-Z0-9]{1,3})?\b"), _iban_ok),
    ("CARD", re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), _card_ok),
    ("SSN", re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"), None),
    ("IP", re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"), _ipv4_ok),
    ("PHONE", re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){1,4}(?!\w)"),
     lambda m: 9 <= len(re.sub(r"\D", "", m)) <= 15),
]


@dataclass
class Finding:
    kind: str
    start: int
    end: int
    text: str


def find(text: str, kinds: set[str] | None = None) -> list[Finding]:
    """Every PII span in ``text`` (non-overlapping, in order of position)."""
    taken: list[Finding] = []
    for kind, pattern, valid in PATTERNS:
        if kinds is not None and kind not in kinds:
            continue
        for m in pattern.finditer(text):
            if valid is not None and not valid(m.group()):
                continue
            if any(m.start() < f.end and f.start < m.end() for f in taken):
                continue
            taken.append(Finding(kind, m.start(), m.end(), m.group()))
    return sorted(taken, key=lambda f: f.start)


def redact(text: str, kinds: set[str] | None = None) -> str:
    """``text`` with each PII span replaced by ``[KIND]``."""
    out, at = [], 0
    for f in find(text, kinds):
        out.append(text[at:f.start])
        out.append(f"[{f.kind}]")
        at = f.end
    out.append(text[at:])
    return "".join(out)
