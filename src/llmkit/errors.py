"""Exception types (and the one JSONL reader whose errors they describe). Deeper code raises these; the CLI and server turn them into messages and exit codes.

Every message says what happened and what to do about it, in the user's words.
"""


from typing import Iterator


class LLMKitError(Exception):
    """Base of every error llmkit raises on purpose."""


class ModelNotFoundError(LLMKitError):
    """A model name or path that the store and the file system do not know."""


class ModelFormatError(LLMKitError):
    """A checkpoint that is truncated, corrupt, or not in a format llmkit reads."""


class UnsupportedArchitectureError(LLMKitError):
    """A checkpoint whose architecture no registered architecture handles."""


class ContextLengthError(LLMKitError, ValueError):
    """A prompt (plus the tokens asked for) longer than the model's context window."""


class InvalidSamplingError(LLMKitError, ValueError):
    """A sampling or generation setting outside its valid range."""


class PullError(LLMKitError):
    """A model could not be fetched or verified; the store is left as it was."""


class DataError(LLMKitError, ValueError):
    """A data file (training or evaluation) that cannot be used: the message names the file and line."""


def read_jsonl(path) -> "Iterator[tuple[int, dict]]":
    """(line number, object) for each non-empty line of a JSONL file; a malformed line (not UTF-8,
    not JSON, not an object) raises DataError naming the file and the line."""
    import json

    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                "convert the file to UTF-8") from None
            row = jsonl_row(path, number, line)
            if row is not None:
                yield number, row


def jsonl_row(path, number: int, line: str) -> "dict | None":
    """One line of a JSONL file as an object, None for a blank line; DataError naming the file and
    the line for anything else."""
    import json

    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
    return row
