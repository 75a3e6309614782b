"""Data preparation: main-content extraction on pages shaped like real sites (code kept byte for
byte), every input format, unreadable files reported and skipped, the language / Gopher / C4
filters and PII redaction, deduplication across files, the report, resuming, Ray, and the CLI."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmkit.errors import read_jsonl
from llmkit.train.clean import NearDuplicates, normalize
from llmkit.train.data import TokenData, prepare
from llmkit.train.errors import DataError
from llmkit.train.extract import html_to_text
from llmkit.train.filters import (C4Settings, GopherQualitySettings, GopherRepetitionSettings, LanguageFilter,
                                  LanguageSettings, PIIRedactor, c4, gopher_quality, gopher_repetition)

PAGES = Path(__file__).parent / "data" / "html"
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega").split()
QUIET = dict(progress=False, log=lambda *_: None)
NO_FILTERS = dict(lang=None, quality=False)


def _page(name: str) -> str:
    return (PAGES / f"{name}.html").read_text()


def _has_block(text: str, code: str) -> bool:
    """``code`` appears in ``text`` as whole lines, every byte of every line as written."""
    return f"\n{code}\n" in f"\n{text}\n"


# ------------------------------------------------------------------ HTML fixtures and what they must give

BOOK_CODE = [
    """#![allow(unused)]
fn main() {
/// Token struct
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub kind: TokenKind,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenKind {
    Ident(String),
    Number(i64),
    Plus,
    Minus,
    LParen,
    RParen,
}
}""",
    """pub fn lex(src: &str) -> Result<Vec<Token>, LexError> {
    let bytes = src.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b' ' | b'\\t' | b'\\n' => i += 1,
            b'0'..=b'9' => {
                let start = i;
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                let value = src[start..i].parse().unwrap();
                tokens.push(Token { kind: TokenKind::Number(value), start, end: i });
            }
            _ => return Err(LexError::unexpected(src, i)),
        }
    }
    Ok(tokens)
}""",
]
SPHINX_CODE = [
    """from netkit import Retry, Session

session = Session(
    retry=Retry(
        attempts=5,
        backoff=0.5,
        statuses={429, 502, 503},
    ),
)
response = session.get("https://api.example.com/items")""",
    """def delay(self, attempt: int) -> float:
    base = self.backoff * 2 ** attempt
    if not self.jitter:
        return base
    return base + random.uniform(0, base)""",
]
FORUM_CODE = [
    """import pandas as pd

df = pd.read_csv("readings.csv")
means = df.groupby("sensor")["temperature"].mean()
print(means)""",
    """import pandas as pd

sums, counts = {}, {}
for chunk in pd.read_csv("readings.csv", chunksize=1_000_000,
                         usecols=["sensor", "temperature"]):
    grouped = chunk.groupby("sensor")["temperature"]
    for sensor, total in grouped.sum().items():
        sums[sensor] = sums.get(sensor, 0.0) + total
    for sensor, n in grouped.count().items():
        counts[sensor] = counts.get(sensor, 0) + n

for sensor in sorted(sums):
    print(f"{sensor}\\t{sums[sensor] / counts[sensor]:.2f}")""",
]

EXPECTED = {
    "docs_book": dict(
        content=["Before a compiler can understand a program", "In this chapter we build a small lexer",
                 "Representing Tokens", "Notice that the loop never backs up", "count the newline characters",
                 "LParen, Ident, Minus, Number, RParen", "the next chapter turns the flat list of tokens"],
        chrome=["Keyboard shortcuts", "to navigate between chapters", "Press ? to show this help", "Foreword",
                "Getting Started", "Hello, World!", "Type Checking", "Search this book", "Print this book",
                "Coal", "Navy", "Previous chapter"],
        code=BOOK_CODE),
    "docs_sphinx": dict(
        content=["Networks fail in ways that fix themselves", "A session retries nothing by default",
                 "Between attempts the session sleeps", "Only requests that are safe to repeat",
                 "Retrying a request that changes state"],
        chrome=["Search docs", "View page source", "Installation", "Quickstart", "Changelog", "API reference",
                "Copyright 2024", "Built with", "Previous", "\n1\n2\n3\n4\n5\n"],
        code=SPHINX_CODE),
    "news_article": dict(
        content=["River town votes to rebuild its flood defences", "The town council voted on Wednesday evening",
                 "We have been asking for this since the first flood", "We cannot stop the river rising",
                 "the new concrete wall along one and a half kilometres", "National flood agency",
                 "Opposition councillors who voted against", "drop-in sessions at the library"],
        chrome=["We value your privacy", "143 partners", "Accept all cookies", "Subscribe from", "Sign in",
                "Puzzles and crosswords", "More sections", "Breaking:", "Most read", "Valley United clinch",
                "Related stories", "Advertise with us", "All rights reserved", "morning briefing",
                "Advertisement", "Skip to main content", "Share on Facebook"],
        code=[]),
    "forum_thread": dict(
        content=["I have a CSV export from our sensor logger", "Is there a way to do this without buying more?",
                 "You do not need the whole file in memory", "pandas then never parses the columns",
                 "That worked perfectly, thank you", "the standard library alone can do this too"],
        chrome=["Quick links", "Unanswered topics", "The team", "Delete cookies", "Powered by", "Jump to",
                "Advanced search", "Board index", "Show and Tell", "Return to"],
        code=FORUM_CODE),
}


@pytest.mark.parametrize("fmt", ["text", "markdown"])
@pytest.mark.parametrize("page", sorted(EXPECTED))
def test_main_content_in_chrome_out_code_byte_for_byte(page, fmt):
    text = html_to_text(_page(page), fmt)
    expected = EXPECTED[page]
    assert [s for s in expected["content"] if s not in text] == []
    assert [s for s in expected["chrome"] if s in text] == []
    for code in expected["code"]:
        assert _has_block(text, code), f"code block changed:\n{code}"
        if fmt == "markdown":
            assert _has_block(text, f"```\n{code}\n```")


def test_markdown_marks_headings_lists_and_code():
    md = html_to_text(_page("docs_book"), "markdown")
    assert "\n## Representing Tokens\n" in md and "\n# Lexing Source Text\n" in md
    assert "\n- count the newline characters before the offset to get the line number;\n" in md
    text = html_to_text(_page("docs_book"), "text")
    assert "#" not in text.replace("#![allow", "").replace("#[derive", "") and "```" not in text


def test_normalize_keeps_code_whitespace_and_cleans_the_rest():
    text = "Cafe\u0301\x00\x07 here   now  \r\n\r\n\r\n\r\n    indented\tcode\ufeff  \n"
    assert normalize(text) == "Caf\u00e9 here   now\n\n    indented\tcode"
    assert normalize("\n\n    x = 1  # aligned\n\ty\n") == "    x = 1  # aligned\n\ty"


def test_code_survives_the_whole_pipeline_into_the_shards(tmp_path):
    """Extraction, normalisation, PII redaction and filters leave code lines as the page had them:
    decoding the shards (byte-level BPE is lossless) gives every block back."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("docs_book", "docs_sphinx", "news_article"):
        (src / f"{name}.html").write_text(_page(name))
    prepare([src], tmp_path / "data", vocab_size=300, val_fraction=0, **QUIET)
    data = TokenData(tmp_path / "data")
    text = data.tokenizer().decode(data.window("train", 0, data.tokens("train")).tolist())
    for code in BOOK_CODE + SPHINX_CODE:
        assert _has_block(text, code)
    assert "Keyboard shortcuts" not in text and "Accept all cookies" not in text


# ------------------------------------------------------------------ inputs


COMMON = ("people water river town council winter house street bridge school market road family morning "
          "evening letter answer question reason number plan work money week year month hour garden field "
          "window door table kitchen friend child teacher doctor farmer driver music story paper book film "
          "built voted asked found moved opened closed wrote carried helped started finished waited walked "
          "quickly slowly early late often never always again together almost nearly simply clearly very "
          "small large old new young long short quiet busy bright cold warm green heavy careful local").split()


def _english(seed: int, words: int = 80) -> str:
    """Plausible English prose: common words with the usual stop words, sentences ending in a full
    stop, no phrase repeated (so the quality and repetition rules keep it)."""
    rng = np.random.default_rng(seed)
    stop = ("the", "of", "and", "to", "that", "with", "a", "in", "was", "have")
    sentences, n = [], 0
    while n < words:
        length = int(rng.integers(8, 16))
        picks = [rng.choice(stop) if rng.random() < 0.35 else rng.choice(COMMON) for _ in range(length)]
        sentences.append(" ".join(picks).capitalize() + ".")
        n += length
    return f"Report {seed}. " + " ".join(sentences)


def test_a_binary_file_is_reported_and_skipped_never_a_document(tmp_path):
    good = tmp_path / "notes.txt"
    good.write_text(_english(1))
    blob = tmp_path / "weights.bin"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    lines: list[str] = []
    meta = prepare([good, blob], tmp_path / "data", vocab_size=300, val_fraction=0, progress=False, log=lines.append)
    report = meta["cleaning"]
    assert report["read"]["documents"] == 1 == report["kept"]["documents"]
    assert report["skipped_files"] == [{"path": str(blob), "reason": "binary data, not text (a NUL byte at offset 8)"}]
    assert any(line.startswith("skipped file") and str(blob) in line and "binary" in line for line in lines)


def test_invalid_utf8_in_jsonl_names_file_and_line_and_skips_the_file(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_bytes(json.dumps({"text": _english(2)}).encode() + b"\n" + b'{"text": "caf\xe9 au lait"}\n')
    good = tmp_path / "more.jsonl"
    good.write_text(json.dumps({"text": _english(3)}) + "\n")
    lines: list[str] = []
    meta = prepare([bad, good], tmp_path / "data", vocab_size=300, val_fraction=0, progress=False, log=lines.append)
    skipped = meta["cleaning"]["skipped_files"]
    assert [s["path"] for s in skipped] == [str(bad)] and skipped[0]["reason"].startswith("line 2: not UTF-8")
    assert meta["cleaning"]["read"]["documents"] == 1  # line 1 of the bad file is not taken either
    assert any(str(bad) in line and "line 2: not UTF-8 (byte 0xe9" in line for line in lines)


def test_read_jsonl_names_the_line_of_invalid_utf8(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(DataError, match=r"eval\.jsonl:2: not UTF-8 \(byte 0xff"):
        list(read_jsonl(path))


def test_malformed_jsonl_names_the_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line, long enough to keep around for the test"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        prepare([bad], tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


def test_compressed_inputs_and_a_corrupt_archive(tmp_path):
    import zstandard

    src = tmp_path / "src"
    src.mkdir()
    with gzip.open(src / "rows.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": _english(4)}) + "\n" + json.dumps({"body": _english(5)}) + "\n")
    (src / "page.html.gz").write_bytes(gzip.compress(_page("docs_sphinx").encode()))
    (src / "notes.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(_english(6).encode()))
    (src / "broken.txt.gz").write_bytes(gzip.compress(_english(7).encode())[:-12])
    meta = prepare([src], tmp_path / "data", vocab_size=300, val_fraction=0, text_field="body", **QUIET)
    report = meta["cleaning"]
    assert report["read"]["documents"] == 4 == report["kept"]["documents"]
    assert [s["path"] for s in report["skipped_files"]] == [str(src / "broken.txt.gz")]
    assert "not a valid .gz file" in report["skipped_files"][0]["reason"]


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2, 3], "content": [_english(8), None, _english(9)]}), tmp_path / "t.parquet")
    meta = prepare([tmp_path / "t.parquet"], tmp_path / "data", vocab_size=300, val_fraction=0,
                   text_field="content", **QUIET)
    assert meta["cleaning"]["kept"]["documents"] == 2
    with pytest.raises(DataError, match=r"no column 'text' \(columns: \['id', 'content'\]\)"):
        prepare([tmp_path / "t.parquet"], tmp_path / "other", **QUIET)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(DataError, match=r"needs pyarrow: pip install 'llmkit\[data\]'"):
        prepare([tmp_path / "t.parquet"], tmp_path / "data", **QUIET)


def _pdf(text: str) -> bytes:
    """A one-page PDF with ``text`` in the standard Helvetica font, written by hand."""
    stream = f"BT /F1 11 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


def test_pdf_text_and_a_broken_pdf(tmp_path):
    pytest.importorskip("pypdf")
    sentence = "The lower river flooded twice and the town council voted to build a new wall of concrete."
    (tmp_path / "report.pdf").write_bytes(_pdf(sentence))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    meta = prepare([tmp_path / "report.pdf", tmp_path / "broken.pdf"], tmp_path / "data", vocab_size=300,
                   val_fraction=0, min_chars=10, **NO_FILTERS, **QUIET)
    assert meta["cleaning"]["kept"]["documents"] == 1
    assert [s["path"] for s in meta["cleaning"]["skipped_files"]] == [str(tmp_path / "broken.pdf")]
    data = TokenData(tmp_path / "data")
    assert sentence in data.tokenizer().decode(data.window("train", 0, data.tokens("train")).tolist())


# ------------------------------------------------------------------ filters


def test_language_identification_keeps_the_languages_asked_for():
    keep_en = LanguageFilter(LanguageSettings(("en",), 0.65))
    french = "Le conseil municipal a voté mercredi soir la reconstruction des digues le long de la rivière."
    english = "The town council voted on Wednesday evening to rebuild the flood walls along the lower river."
    assert keep_en(english) is None and keep_en(french) == "fr"
    assert LanguageFilter(LanguageSettings(("en", "fr"), 0.65))(french) is None


def test_gopher_quality_rules():
    s = GopherQualitySettings()
    good = _english(10, 120)
    assert gopher_quality(good, s) is None
    assert gopher_quality("The river rose and the town was flooded.", s) == "too_few_words"
    assert gopher_quality(" ".join(["alpha beta gamma delta"] * 30), s) == "stop_words"
    assert gopher_quality(good + " #tag" * 40, s) == "symbol_word_ratio"
    assert gopher_quality("\n".join(f"• the item {i} of the list and more" for i in range(30)), s) == "bullet_lines"
    assert gopher_quality(" ".join(["supercalifragilistic"] * 60) + " the and", s) == "mean_word_length"


def test_gopher_repetition_rules():
    s = GopherRepetitionSettings()
    assert gopher_repetition(_english(11, 200), s) is None
    menu = "\n".join(["Home", "About us", "Contact"] * 10 + [_english(12)])
    assert gopher_repetition(menu, s) == "duplicate_lines"
    spam = " ".join(["buy cheap watches online today"] * 30)
    assert gopher_repetition(spam, s) is not None


def test_c4_rules_decide_for_the_whole_document():
    s = C4Settings()
    assert c4(_english(13) + " Another sentence. And one more! Is this five? Yes it is.", s) is None
    assert c4("Lorem ipsum dolor sit amet. " * 10, s) == "lorem_ipsum"
    assert c4("\n".join(f"menu entry {i}" for i in range(20)) + "\nOne. Two. Three. Four. Five.", s) == \
        "terminal_punctuation"
    code_page = _english(14) + " One. Two. Three. Four.\nfn main() {\n    x();\n}"
    assert c4(code_page, s) is None  # C4's own rule would drop it for the '{'
    assert c4(code_page, C4Settings(curly_bracket=True)) == "curly_bracket"


def test_pii_redaction_finds_emails_ips_and_phones_and_leaves_numbers_alone():
    redact = PIIRedactor()
    text = ("Write to jane.doe+news@example.co.uk or call +44 20 7946 0958 or (555) 123-4567; the server at "
            "192.168.10.1 and 2001:db8:85a3::8a2e:370:7334 logged it. Version 1.2.3, on 2024-03-14, order "
            "12345678, cost 1,250.00, port 8080.")
    assert redact(text) == ("Write to [EMAIL] or call [PHONE] or [PHONE]; the server at [IP] and [IP] logged it. "
                            "Version 1.2.3, on 2024-03-14, order 12345678, cost 1,250.00, port 8080.")
    assert dict(redact.counts) == {"EMAIL": 1, "IP": 2, "PHONE": 2}


def test_filters_drop_and_the_report_says_why_with_thresholds(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text(_english(20, 120) + " Contact me at someone@example.com today.")
    (src / "french.txt").write_text("Le conseil municipal a voté mercredi soir la reconstruction des digues. " * 8)
    (src / "menu.txt").write_text("\n".join(["Home", "About us", "Contact", "Blog"] * 12) + "\n" + _english(21))
    (src / "lorem.txt").write_text(_english(22, 120) + " Lorem ipsum dolor sit amet.")
    lines: list[str] = []
    meta = prepare([src], tmp_path / "data", vocab_size=300, val_fraction=0, progress=False, log=lines.append)
    report = meta["cleaning"]
    assert report["dropped"]["language"]["documents"] == 1 and report["dropped"]["language"]["reasons"] == {"fr": 1}
    assert report["dropped"]["gopher_repetition"]["reasons"] == {"duplicate_lines": 1}
    assert report["dropped"]["c4"]["reasons"] == {"lorem_ipsum": 1}
    assert report["kept"]["documents"] == 1
    assert report["pii"] == {"changed": {"documents": 1, "characters_removed": len("someone@example.com") - 7},
                             "replaced": {"EMAIL": 1}}
    settings = report["settings"]["filters"]
    assert settings["language"]["languages"] == ["en"] and settings["language"]["threshold"] == 0.65
    assert settings["gopher_quality"]["min_words"] == 50 and settings["c4"]["curly_bracket"] is False
    printed = {line.split()[0]: line for line in lines}
    assert "(fr 1)" in printed["language"] and "-1 documents" in printed["c4"] and "1 email" in printed["pii"]
    data = TokenData(tmp_path / "data")
    assert "Contact me at [EMAIL] today." in data.tokenizer().decode(data.window("train", 0, data.tokens("train")).tolist())


# ------------------------------------------------------------------ duplicates


def test_near_duplicates_found_and_distinct_texts_kept():
    rng = np.random.default_rng(1)
    a = " ".join(rng.choice(WORDS, size=200))
    b = a.replace(a.split()[100], "CHANGED", 1)
    c = " ".join(rng.choice(WORDS, size=200))
    near = NearDuplicates(threshold=0.8)
    assert [near.seen(a), near.seen(b), near.seen(c)] == [False, True, False]


def test_duplicates_across_files_counted_in_clusters(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    a, b = _english(30, 200), _english(31, 200)
    (src / "a.txt").write_text(a)
    (src / "a-copy.md").write_text(a)
    with open(src / "rows.jsonl", "w") as f:  # three near copies of a, one of b
        for variant in (a.replace("Report 30.", "Report thirty."), b, b + " With one more sentence.",
                        a + " And a last word.", "Note: " + a):
            f.write(json.dumps({"text": variant}) + "\n")
    meta = prepare([src], tmp_path / "data", vocab_size=300, val_fraction=0, **QUIET)
    dropped = meta["cleaning"]["dropped"]
    assert dropped["exact_duplicate"]["documents"] == 1 and dropped["exact_duplicate"]["clusters"] == 1
    assert dropped["near_duplicate"]["documents"] == 4 and dropped["near_duplicate"]["clusters"] == 2
    assert meta["cleaning"]["kept"]["documents"] == 2


# ------------------------------------------------------------------ the whole command


def _corpus(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}. " + " ".join(rng.choice(WORDS, size=120)) + ".\n")
    (folder / "copy.txt").write_text((folder / "doc00.txt").read_text())
    (folder / "short.txt").write_text("too short")
    (folder / "page.html").write_text(_page("news_article"))
    with open(folder / "rows.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"text": f"Row {i}: " + " ".join(rng.choice(WORDS, size=80))}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "Say the alphabet in Greek please."},
                                         {"role": "assistant", "content": " ".join(WORDS)}]}) + "\n")
    return folder


def test_prepare_writes_shards_tokenizer_and_report(tmp_path):
    src = _corpus(tmp_path / "src")
    meta = prepare([src], tmp_path / "data", vocab_size=300, val_fraction=0.1, **NO_FILTERS, **QUIET)
    clean = meta["cleaning"]
    assert clean["read"]["documents"] == 12 + 3 + 5
    assert clean["dropped"]["exact_duplicate"]["documents"] == 1
    assert clean["dropped"]["too_short"]["documents"] == 1
    assert clean["kept"]["documents"] == 18 == meta["train"]["documents"] + meta["val"]["documents"]
    assert meta["val"]["documents"] >= 1 and meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    assert all(len(s["sha256"]) == 64 for s in meta["sources"])
    data = TokenData(tmp_path / "data")
    stream = data.window("train", 0, data.tokens("train"))
    assert stream.max() < 300 and (stream == meta["separator_id"]).sum() == meta["train"]["documents"]
    assert 0 < meta["unigram_val_loss"] < np.log(300)
    assert not (tmp_path / ".data.parts").exists()  # the cache of finished files goes once the run succeeds


def test_prepare_with_an_existing_tokenizer(tmp_path, tiny_tokenizer_dir):
    src = _corpus(tmp_path / "src")
    meta = prepare([src], tmp_path / "data", tokenizer=tiny_tokenizer_dir, **NO_FILTERS, **QUIET)
    from llmkit.tokenizer import Tokenizer

    assert meta["vocab_size"] == 400 and meta["separator_id"] == Tokenizer.from_folder(tiny_tokenizer_dir).eos_token_id


def test_an_interrupted_run_resumes_without_redoing_finished_files(tmp_path):
    src = _corpus(tmp_path / "src")
    (src / "zz-last.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')  # sorted last: fails the run there
    with pytest.raises(DataError, match=r"zz-last\.jsonl:2"):
        prepare([src], tmp_path / "data", vocab_size=300, **NO_FILTERS, **QUIET)
    parts = tmp_path / ".data.parts"
    assert len(list(parts.glob("*.jsonl"))) == 16 and not (tmp_path / "data").exists()

    (src / "zz-last.jsonl").write_text(json.dumps({"text": _english(40)}) + "\n")
    lines: list[str] = []
    resumed = prepare([src], tmp_path / "data", vocab_size=300, val_fraction=0, progress=False, log=lines.append,
                      **NO_FILTERS)
    assert "resumed: 16 of 17 files were already cleaned" in lines[0]
    assert not parts.exists()
    fresh = prepare([src], tmp_path / "fresh", vocab_size=300, val_fraction=0, **NO_FILTERS, **QUIET)
    assert resumed["cleaning"] == fresh["cleaning"]
    assert (tmp_path / "data" / "train-000.bin").read_bytes() == (tmp_path / "fresh" / "train-000.bin").read_bytes()


@pytest.mark.slow
def test_ray_gives_the_same_output_as_in_process(tmp_path):
    ray = pytest.importorskip("ray")
    src = _corpus(tmp_path / "src")
    for name in ("docs_book", "forum_thread"):
        (src / f"{name}.html").write_text(_page(name))
    local = prepare([src], tmp_path / "local", vocab_size=300, val_fraction=0.1, **QUIET)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        on_ray = prepare([src], tmp_path / "ray", vocab_size=300, val_fraction=0.1, use_ray=True, **QUIET)
    finally:
        ray.shutdown()
    assert on_ray["cleaning"] == local["cleaning"] and on_ray["cleaning"]["kept"]["documents"] > 0
    for shard in ("train-000.bin", "val-000.bin"):
        assert (tmp_path / "ray" / shard).read_bytes() == (tmp_path / "local" / shard).read_bytes()


def test_cli_prepare_with_the_new_options(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "page.html").write_text(_page("docs_book"))
    (src / "photo.jpg.txt").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(500))
    cmd = [sys.executable, "-m", "llmkit.cli", "prepare", str(src), "--out", str(tmp_path / "data"), "--quiet",
           "--vocab-size", "300", "--val-fraction", "0", "--html-format", "markdown", "--lang", "any", "--no-quality",
           "--no-pii"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"skipped file      {src / 'photo.jpg.txt'}: binary data" in r.stdout and "wrote" in r.stdout
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["cleaning"]["settings"]["html_format"] == "markdown" and meta["cleaning"]["settings"]["pii"] is False
    data = TokenData(tmp_path / "data")
    text = data.tokenizer().decode(data.window("train", 0, data.tokens("train")).tolist())
    assert f"```\n{BOOK_CODE[1]}\n```" in text and "\n## Representing Tokens\n" in text
    bad = subprocess.run(cmd[:-1] + ["--html-format", "pdf"], capture_output=True, text=True)
    assert bad.returncode != 0 and "pdf" in bad.stderr


# ------------------------------------------------------------------ plugin cleaners

CLEANER_PLUGINS = {
    "cleaners": """
import re

from llmkit.plugins import hookimpl


def redact_keys(text):
    return re.sub(r"key-[0-9]+", "[KEY]", text)


def drop_drafts(text):
    return None if text.startswith("DRAFT") else text


@hookimpl
def register_cleaners(register):
    register("redact-keys", redact_keys)
    register("drop-drafts", drop_drafts)
""",
    "miscounting": """
from llmkit.plugins import hookimpl


@hookimpl
def register_cleaners(register):
    register("count-words", lambda text: len(text.split()))
""",
}


@pytest.fixture
def cleaner_plugins(tmp_path, monkeypatch):
    """Two plugin 'packages' with cleaners, installed the way pip would: modules plus dist-info entry points."""
    from llmkit import plugins

    site = tmp_path / "site"
    for name, code in CLEANER_PLUGINS.items():
        (site / f"{name}_plugin-1.0.dist-info").mkdir(parents=True)
        (site / f"{name}_plugin.py").write_text(code)
        (site / f"{name}_plugin-1.0.dist-info" / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}-plugin\nVersion: 1.0\n")
        (site / f"{name}_plugin-1.0.dist-info" / "entry_points.txt").write_text(f"[llmkit]\n{name} = {name}_plugin\n")
    monkeypatch.syspath_prepend(str(site))

    def select(name: str) -> None:
        monkeypatch.setenv("LLMKIT_PLUGINS", name)
        plugins.reset()

    yield select
    plugins.reset()
    for name in CLEANER_PLUGINS:
        sys.modules.pop(f"{name}_plugin", None)


def test_prepare_runs_the_plugins_cleaners_and_reports_them(cleaner_plugins, tmp_path):
    cleaner_plugins("cleaners")
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    src.mkdir()
    docs = {"a": "Use key-1234 and key-99 to open.", "b": "No secrets here.", "c": "DRAFT: key-5 is the key.",
            "d": "Plain text again."}
    docs = {name: f"{text} {' '.join(rng.choice(WORDS, size=40))}" for name, text in docs.items()}
    for name, text in docs.items():
        (src / f"{name}.txt").write_text(text)
    lines: list[str] = []
    meta = prepare([src], tmp_path / "data", vocab_size=300, val_fraction=0, progress=False, log=lines.append,
                   **NO_FILTERS)

    report = meta["cleaning"]
    assert report["cleaners"] == {
        # key-1234 -> [KEY] removes 3 characters, key-99 one, key-5 none (the document still changed)
        "redact-keys": {"changed": {"documents": 2, "characters_removed": 4}, "dropped": {"documents": 0, "characters": 0}},
        "drop-drafts": {"changed": {"documents": 0, "characters_removed": 0},
                        "dropped": {"documents": 1, "characters": len(docs["c"])}},
    }
    assert report["kept"]["documents"] == meta["train"]["documents"] == 3
    printed = [line.split()[:5] for line in lines]
    assert ["redact-keys", "0", "documents", "-4", "characters"] in printed
    assert ["drop-drafts", "-1", "documents", f"-{len(docs['c'])}", "characters"] in printed
    data = TokenData(tmp_path / "data")
    text = data.tokenizer().decode(data.window("train", 0, data.tokens("train")).tolist())
    assert "Use [KEY] and [KEY] to open." in text and "No secrets here." in text
    assert "key-" not in text and "DRAFT" not in text


def test_a_cleaner_that_breaks_its_contract_is_named_and_nothing_is_written(cleaner_plugins, tmp_path):
    cleaner_plugins("miscounting")
    src = _corpus(tmp_path / "src")
    with pytest.raises(DataError, match="cleaner 'count-words' returned int"):
        prepare([src], tmp_path / "data", vocab_size=300, **QUIET)
    assert not (tmp_path / "data").exists()
