"""Reading ``llmkit prepare``'s inputs: which files, in which format, and their raw documents.

A file that cannot be read as what its name says (binary data, text that is not UTF-8, a corrupt
archive or PDF) raises ``Unreadable``: ``prepare`` reports it with its path (and line) and skips
the whole file, so that nothing from it is silently taken as a document. A file that is readable
but malformed in a way its author must fix (a JSONL line that is not JSON, a missing field)
stops ``prepare`` with a ``DataError`` instead, as before.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from llmkit.errors import jsonl_row
from llmkit.train.errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
PDF_SUFFIXES = {".pdf"}
COMPRESSED_SUFFIXES = {".gz", ".zst"}
KNOWN = TEXT_SUFFIXES | HTML_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES | PDF_SUFFIXES
SNIFF_BYTES = 8192


class Unreadable(Exception):
    """A file that is not what its name says; the message says what is wrong with it."""


@dataclass(frozen=True)
class Source:
    """One input: a file (``kind`` from its name: text, html, jsonl, parquet, pdf; ``compression``
    gz, zst or None), or the built-in demo corpus (kind ``demo``)."""

    path: str
    kind: str
    compression: str | None = None


def _kind(path: Path) -> tuple[str | None, str | None]:
    suffixes = [s.lower() for s in path.suffixes]
    compression = None
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        compression = suffixes.pop()[1:]
    suffix = suffixes[-1] if suffixes else ""
    for kind, known in (("text", TEXT_SUFFIXES), ("html", HTML_SUFFIXES), ("jsonl", JSONL_SUFFIXES),
                        ("parquet", PARQUET_SUFFIXES), ("pdf", PDF_SUFFIXES)):
        if suffix in known:
            return kind, compression
    return None, compression


def find_sources(inputs) -> list[Source]:
    """Every input file, in a stable order. In a folder, files with a known suffix (optionally
    compressed: ``.jsonl.gz``, ``.html.zst``); a file named directly is read whatever its name,
    as text unless its suffix says otherwise (and skipped if it is not text)."""
    sources: list[Source] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p)[0] is not None)
            if not found:
                raise DataError(f"{path}: no .txt, .md, .html, .jsonl, .parquet or .pdf files in this folder "
                                "(also compressed .gz or .zst)")
            sources.extend(Source(str(p), *_kind(p)) for p in found)
        elif path.is_file():
            kind, compression = _kind(path)
            sources.append(Source(str(path), kind or "text", compression))
        else:
            raise DataError(f"{path} does not exist")
    return sources


# ------------------------------------------------------------------ bytes


def _open(source: Source) -> IO[bytes]:
    """The file's bytes, decompressed as they are read."""
    raw = open(source.path, "rb")
    if source.compression == "gz":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if source.compression == "zst":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise DataError(f"{source.path}: reading .zst files needs the zstandard package: "
                            "pip install 'llmkit[data]'") from None
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)  # type: ignore[return-value]
    return raw


def _read_all(source: Source) -> bytes:
    try:
        with _open(source) as f:
            return f.read()
    except (OSError, EOFError) as exc:  # gzip/zstd corruption arrives as OSError subclasses or EOFError
        raise Unreadable(_corrupt(source, exc)) from None
    except Exception as exc:
        if type(exc).__module__.startswith("zstandard"):
            raise Unreadable(_corrupt(source, exc)) from None
        raise


def _corrupt(source: Source, exc: BaseException) -> str:
    if source.compression:
        return f"not a valid .{source.compression} file ({exc})"
    return f"cannot read it ({getattr(exc, 'strerror', None) or exc})"


def _binary(data: bytes) -> int | None:
    """Where a NUL byte is near the start, or None. NUL bytes mark an image, an archive, a model
    file, a database; never text (UTF-16 text, which has them too, is recognised by its byte-order
    mark before this)."""
    at = data.find(b"\x00", 0, SNIFF_BYTES)
    return None if at < 0 else at


def _decode(data: bytes, what: str = "text") -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise Unreadable(f"not valid UTF-16 {what} (byte {exc.start})") from None
    if (at := _binary(data)) is not None:
        raise Unreadable(f"binary data, not {what} (a NUL byte at offset {at})")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise Unreadable(f"line {line}: not UTF-8 {what} (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "convert it to UTF-8 (iconv -t UTF-8)") from None


# ------------------------------------------------------------------ documents per kind


def _text(source: Source) -> Iterator[tuple[str, str]]:
    yield source.path, _decode(_read_all(source))


def _html(source: Source) -> Iterator[tuple[str, str]]:
    """Pages declare their own encoding (a meta charset, a BOM): resiliparse reads it."""
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    data = _read_all(source)
    if (at := _binary(data)) is not None and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise Unreadable(f"binary data, not an HTML page (a NUL byte at offset {at})")
    yield source.path, bytes_to_str(data, detect_encoding(data))


def _jsonl_rows(source: Source) -> Iterator[tuple[int, dict]]:
    try:
        with _open(source) as f:
            for number, line in enumerate(f, 1):
                if number == 1 and _binary(line) is not None:
                    raise Unreadable("line 1: binary data, not JSON lines")
                try:
                    text = line.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise Unreadable(f"line {number}: not UTF-8 (byte 0x{line[exc.start]:02x} at column "
                                     f"{exc.start + 1}); convert the file to UTF-8 (iconv -t UTF-8)") from None
                row = jsonl_row(source.path, number, text)
                if row is not None:
                    yield number, row
    except (OSError, EOFError) as exc:
        raise Unreadable(_corrupt(source, exc)) from None


def _jsonl(source: Source, field: str) -> Iterator[tuple[str, str]]:
    for number, row in _jsonl_rows(source):
        where = f"{source.path}:{number}"
        if isinstance(row.get(field), str):
            yield where, row[field]
        elif isinstance(row.get("messages"), list):
            try:
                text = "\n\n".join(str(m["content"]) for m in row["messages"] if m.get("content"))
            except (TypeError, KeyError, AttributeError):
                raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects") from None
            yield where, text
        else:
            raise DataError(f"{where}: no {field!r} string or 'messages' list (keys: {sorted(row)}); "
                            "--text-field names the field that holds the text")


def _parquet(source: Source, field: str) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{source.path}: reading .parquet files needs pyarrow: pip install 'llmkit[data]'") from None
    import pyarrow as pa

    try:
        data = _read_all(source) if source.compression else None
        parquet = pq.ParquetFile(pa.BufferReader(data) if data is not None else source.path)
        if field not in parquet.schema_arrow.names:
            raise DataError(f"{source.path}: no column {field!r} (columns: {parquet.schema_arrow.names}); "
                            "--text-field names the column that holds the text")
        row = 0
        for batch in parquet.iter_batches(columns=[field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                row += 1
                if isinstance(value, str):
                    yield f"{source.path}#{row}", value
    except (pa.ArrowException, OSError) as exc:
        raise Unreadable(f"not a readable Parquet file ({exc})") from None


def _pdf(source: Source) -> Iterator[tuple[str, str]]:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError:
        raise DataError(f"{source.path}: reading .pdf files needs pypdf: pip install 'llmkit[data]'") from None
    try:
        reader = PdfReader(io.BytesIO(_read_all(source)))
        if reader.is_encrypted:
            raise Unreadable("the PDF is encrypted")
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, OSError) as exc:
        raise Unreadable(f"not a readable PDF ({type(exc).__name__}: {exc})") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise Unreadable("the PDF has no text layer (a scan?): run OCR on it first")
    yield source.path, text


def read_source(source: Source, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(where, raw text) for each document of one input; ``where`` is the path, plus ``:line`` for
    JSON lines and ``#row`` for Parquet. HTML comes back as the page, for the extractor."""
    if source.kind == "demo":
        from llmkit.train.demo import stdlib_documents

        yield from stdlib_documents()
    elif source.kind == "jsonl":
        yield from _jsonl(source, text_field)
    elif source.kind == "parquet":
        yield from _parquet(source, text_field)
    elif source.kind == "pdf":
        yield from _pdf(source)
    elif source.kind == "html":
        yield from _html(source)
    else:
        yield from _text(source)
