"""JSON-schema constrained decoding: a token mask built from a schema, so that output always parses.

The grammar engine is xgrammar (a schema compiles in ~0.3 s for a 49k vocabulary; the next-token
mask then costs ~5 us). llmkit's part is:

* the vocabulary as bytes, read from llmkit's own ``Tokenizer`` (no transformers tokenizer needed),
  sized to the model's logits width, which can be larger than the tokenizer's vocabulary;
* a check of the schema against the keywords the mask really enforces. xgrammar silently ignores
  keywords it does not implement (``not``, ``uniqueItems``, ``if``/``then``, ``multipleOf``...), which
  would let output through that does not validate; those schemas are refused up front with
  ``UnsupportedSchemaError`` naming the keyword and where it is;
* ``JSONSchemaProcessor``: a ``SamplingParams.logits_processors`` entry, one per request, that keeps a
  grammar matcher in step with the generated tokens and masks the logits.

The server's ``response_format`` uses the same pieces: ``processor_for_response_format``.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from llmkit.errors import LLMKitError

__all__ = [
    "UnsupportedSchemaError",
    "ConstraintViolationError",
    "SUPPORTED_KEYWORDS",
    "schema_from",
    "check_schema",
    "compile_schema",
    "JSONSchemaProcessor",
    "json_schema_processor",
    "processor_for_response_format",
    "validate_output",
]


class UnsupportedSchemaError(LLMKitError, ValueError):
    """A JSON schema that the token mask cannot enforce (the message names the keyword and where)."""


class ConstraintViolationError(LLMKitError):
    """Constrained output that is not a complete, valid document (typically: max_tokens ran out)."""


# Keywords whose meaning the mask enforces (checked one by one in tests/test_constrain.py).
SUPPORTED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
    "maxItems", "enum", "const", "anyOf", "allOf", "$ref", "$defs", "definitions", "minLength",
    "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
})
# Keywords that do not constrain a value: ignored.
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "contentMediaType", "contentEncoding",
})
# Formats the mask enforces (xgrammar's list; others would be ignored silently).
SUPPORTED_FORMATS = frozenset({
    "date", "date-time", "time", "duration", "email", "uuid", "uri", "uri-reference", "ipv4", "ipv6",
    "hostname",
})
_WHY = {
    "oneOf": "use anyOf: the mask cannot check that exactly one alternative matches",
    "not": "the mask cannot exclude values by a schema",
    "if": "conditional schemas are not enforced", "then": "conditional schemas are not enforced",
    "else": "conditional schemas are not enforced",
    "uniqueItems": "the mask cannot compare array items with each other",
    "multipleOf": "divisibility is not enforced",
    "patternProperties": "property names by pattern are not enforced",
    "propertyNames": "property-name schemas are not enforced",
    "minProperties": "property counts are not enforced", "maxProperties": "property counts are not enforced",
    "dependentRequired": "dependencies between properties are not enforced",
    "dependentSchemas": "dependencies between properties are not enforced",
    "dependencies": "dependencies between properties are not enforced",
    "contains": "array 'contains' is not enforced", "minContains": "array 'contains' is not enforced",
    "maxContains": "array 'contains' is not enforced",
    "unevaluatedProperties": "unevaluated* keywords are not enforced",
    "unevaluatedItems": "unevaluated* keywords are not enforced",
}
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties")


def schema_from(schema: Any) -> tuple[dict, type | None]:
    """(JSON schema as a dict, the pydantic model it came from or None).

    Accepts a pydantic model class, a dict, a JSON string, or any type pydantic can describe
    (a dataclass, a TypedDict, ``list[int]``...).
    """
    if isinstance(schema, Mapping):
        return dict(schema), None
    if isinstance(schema, (str, bytes)):
        try:
            value = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise UnsupportedSchemaError(f"the schema is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise UnsupportedSchemaError("a JSON schema must be a JSON object")
        return value, None
    try:
        from pydantic import BaseModel, TypeAdapter
    except ImportError:  # pragma: no cover - pydantic is a dependency
        BaseModel = TypeAdapter = None
    if BaseModel is not None and isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_json_schema(), schema
    if TypeAdapter is not None:
        try:
            return TypeAdapter(schema).json_schema(), schema
        except Exception as exc:
            raise UnsupportedSchemaError(f"cannot make a JSON schema from {schema!r}: {exc}") from None
    raise UnsupportedSchemaError(f"expected a JSON schema (dict or JSON text) or a pydantic model, got {schema!r}")


def check_schema(schema: Any, path: str = "#") -> None:
    """Raise ``UnsupportedSchemaError`` if the mask would not enforce every keyword of ``schema``."""
    if isinstance(schema, bool):
        if schema is False and path == "#":
            raise UnsupportedSchemaError("the schema `false` accepts no value at all")
        return
    if not isinstance(schema, Mapping):
        raise UnsupportedSchemaError(f"{path}: a schema must be an object or a boolean, got {schema!r}")
    for key, value in schema.items():
        where = f"{path}/{key}"
        if key in ANNOTATIONS:
            continue
        if key not in SUPPORTED_KEYWORDS:
            reason = _WHY.get(key, "this keyword is not supported")
            raise UnsupportedSchemaError(
                f"schema keyword {key!r} at {path} cannot be enforced ({reason}). Supported keywords: "
                f"{', '.join(sorted(SUPPORTED_KEYWORDS))}."
            )
        if key == "format" and value not in SUPPORTED_FORMATS:
            raise UnsupportedSchemaError(
                f"format {value!r} at {path} cannot be enforced; supported formats: {', '.join(sorted(SUPPORTED_FORMATS))}"
            )
        if key == "const" and isinstance(value, (dict, list)):
            raise UnsupportedSchemaError(f"{where}: only a string, number, boolean or null const can be enforced")
        if key == "allOf" and len(value) != 1:
            raise UnsupportedSchemaError(f"{where}: allOf with several schemas cannot be enforced; merge them into one")
        if key == "$ref" and not str(value).startswith("#"):
            raise UnsupportedSchemaError(f"{where}: only references inside the schema (#/...) are supported, not {value!r}")
        if key == "type":
            kinds = value if isinstance(value, list) else [value]
            bad = [k for k in kinds if k not in ("object", "array", "string", "number", "integer", "boolean", "null")]
            if bad:
                raise UnsupportedSchemaError(f"{where}: unknown type {bad[0]!r}")
        if key in _SCHEMA_MAPS:
            for name, sub in value.items():
                check_schema(sub, f"{where}/{name}")
        elif key in _SCHEMA_LISTS:
            for i, sub in enumerate(value):
                check_schema(sub, f"{where}/{i}")
        elif key in _SCHEMA_ONE:
            check_schema(value, where)


# ------------------------------------------------------------------------------------------- vocabulary


def _token_bytes(tokenizer, vocab_size: int) -> tuple[list[bytes], list[int]]:
    """Each token id's bytes as it appears in decoded text; b"" for special tokens and unused ids.

    xgrammar treats empty tokens as special: never allowed inside the document.
    """
    from llmkit.tokenizer import _byte_alphabet

    backend = tokenizer.backend
    vocab = backend.get_vocab(with_added_tokens=True)
    added = {i: t for i, t in backend.get_added_tokens_decoder().items()}
    special = tokenizer.special_ids
    n_fallback = sum(f"<0x{b:02X}>" in vocab for b in range(256))
    inverse = {c: b for b, c in _byte_alphabet().items()}
    byte_level = n_fallback < 128 and sum(c in vocab for c in inverse) >= 128
    out = [b""] * vocab_size
    for token, i in vocab.items():
        if i >= vocab_size or i in special:
            continue
        if i in added:  # added tokens are stored as their text, not in the model's byte spelling
            out[i] = added[i].content.encode("utf-8")
        elif byte_level:
            try:
                out[i] = bytes(inverse[c] for c in token)
            except KeyError:
                out[i] = token.encode("utf-8")
        elif n_fallback >= 128 and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out[i] = bytes([int(token[3:5], 16)])
        else:  # SentencePiece-style: U+2581 stands for a space
            out[i] = token.replace("\u2581", " ").encode("utf-8")
    return out, sorted(tokenizer.eos_token_ids)


def _add_prefix_space(tokenizer) -> bool:
    """Whether encoding adds a space in front of the text (SentencePiece), which decoding removes."""
    ids = tokenizer.encode("a")
    token = tokenizer.id_to_token(ids[0]) if ids else ""
    return bool(token) and token.startswith("\u2581")


@dataclass
class _Compiler:
    compiler: Any
    lock: threading.Lock
    cache: dict


_compilers: "weakref.WeakKeyDictionary[Any, dict[int, _Compiler]]" = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def _compiler_for(tokenizer, vocab_size: int) -> _Compiler:
    # One grammar compiler per (tokenizer, width), kept as long as the tokenizer lives: building the
    # byte vocabulary costs ~0.1 s for 49k tokens and compiled schemas are worth reusing.
    import xgrammar as xgr

    with _compilers_lock:
        per_tok = _compilers.setdefault(tokenizer, {})
        if vocab_size not in per_tok:
            encoded, stops = _token_bytes(tokenizer, vocab_size)
            info = xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=vocab_size,
                                     stop_token_ids=stops or None,
                                     add_prefix_space=_add_prefix_space(tokenizer))
            per_tok[vocab_size] = _Compiler(xgr.GrammarCompiler(info, cache_enabled=True), threading.Lock(), {})
        return per_tok[vocab_size]


# Separators as models usually write JSON; any_whitespace=False keeps a small model from padding
# the document with endless spaces and newlines (a common failure without it).
_SEPARATORS = (", ", ": ")


# xgrammar 0.2.9 writes a length-bounded string (minLength / maxLength) as characters from
# [^"\\\r\n]: that lets raw control characters through, which JSON forbids (json.loads then
# fails), and it rules out escapes. Such characters are swapped for plain unescaped JSON
# characters; the bound is kept.
_BOUNDED_CHARS = r'[^\"\\\r\n]'
_JSON_CHARS = r'[^\0-\x1f\"\\]'


def _json_schema_grammar(schema_json: str):
    import xgrammar as xgr

    options = dict(any_whitespace=False, separators=_SEPARATORS, strict_mode=True)
    grammar = xgr.Grammar.from_json_schema(schema_json, **options)
    ebnf = str(grammar)
    if _BOUNDED_CHARS not in ebnf:
        return grammar
    return xgr.Grammar.from_ebnf(ebnf.replace(_BOUNDED_CHARS, _JSON_CHARS))


def _literal(text: str):
    import xgrammar as xgr

    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


def compile_schema(tokenizer, vocab_size: int, schema: Any, wrap: tuple[str, str] | None = None):
    """The compiled grammar (xgrammar ``CompiledGrammar``) for a schema; ``None`` means any JSON value.

    wrap: (prefix, suffix), literal text that must come before and after the JSON document (the
    server's tool calls: ``<tool_call>`` ... ``</tool_call>``).
    """
    import xgrammar as xgr

    comp = _compiler_for(tokenizer, vocab_size)
    # not sort_keys: property order is the order the model writes them in
    key = ("<any json>" if schema is None else json.dumps(schema)) + (json.dumps(wrap) if wrap else "")
    with comp.lock:
        if key not in comp.cache:
            if schema is not None:
                check_schema(schema)
            try:
                grammar = xgr.Grammar.builtin_json_grammar() if schema is None else _json_schema_grammar(json.dumps(schema))
                if wrap:
                    grammar = xgr.Grammar.concat(_literal(wrap[0]), grammar, _literal(wrap[1]))
                comp.cache[key] = comp.compiler.compile_grammar(grammar)
            except RuntimeError as exc:
                reason = str(exc).split(": ", 1)[-1].strip()
                raise UnsupportedSchemaError(f"the schema cannot be enforced: {reason}") from None
        return comp.cache[key]


class JSONSchemaProcessor:
    """A logits processor (``SamplingParams.logits_processors``) that allows only tokens that keep
    the output a prefix of a document valid under the grammar; at the end only end-of-sequence.

    Stateful: one per request. It feeds the matcher each token the engine sampled since its last
    call, so it works with any engine that calls processors once per step with the output so far.
    """

    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.consumed = 0

    def __call__(self, generated_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        for token in generated_ids[self.consumed:]:
            if not self.matcher.accept_token(int(token)):
                raise ConstraintViolationError(f"token {token} does not continue the constrained output")
        self.consumed = len(generated_ids)
        if self.matcher.is_terminated():
            return logits
        self.matcher.fill_next_token_bitmask(self.bitmask)
        masked = logits.float().cpu().clone() if logits.device.type != "cpu" or logits.dtype != torch.float32 \
            else logits.clone()
        self._xgr.apply_token_bitmask_inplace(masked, self.bitmask, vocab_size=self.vocab_size)
        return masked.to(logits.device, logits.dtype)

    @property
    def completed(self) -> bool:
        return self.matcher.is_completed()


def json_schema_processor(tokenizer, vocab_size: int, schema: Any,
                          wrap: tuple[str, str] | None = None) -> JSONSchemaProcessor:
    """A fresh processor for one request. ``schema``: dict, JSON text, pydantic model, or None (any JSON);
    ``wrap``: literal (prefix, suffix) around the document."""
    if schema is not None:
        schema, _ = schema_from(schema)
    return JSONSchemaProcessor(compile_schema(tokenizer, vocab_size, schema, wrap), vocab_size)


def processor_for_response_format(tokenizer, vocab_size: int, response_format: Mapping | None):
    """The processor for an OpenAI ``response_format``, or None for plain text.

    ``{"type": "json_object"}`` -> any JSON value; ``{"type": "json_schema", "json_schema":
    {"schema": {...}}}`` -> that schema; ``{"type": "text"}`` -> None.
    """
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return json_schema_processor(tokenizer, vocab_size, None)
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if schema is None:
            raise UnsupportedSchemaError("response_format json_schema needs json_schema.schema")
        return json_schema_processor(tokenizer, vocab_size, schema)
    raise UnsupportedSchemaError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)")


def validate_output(text: str, schema: dict | None) -> Any:
    """Parse ``text`` and validate it against ``schema``; ``ConstraintViolationError`` if it fails."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConstraintViolationError(
            f"the output is not complete JSON ({exc.msg} at character {exc.pos}); it was probably cut off "
            f"by max_tokens: raise max_tokens. Output: {text[:200]!r}"
        ) from None
    if schema is not None:
        cls = jsonschema.validators.validator_for(schema)
        errors = sorted(cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(value), key=str)
        if errors:
            raise ConstraintViolationError(f"the output does not match the schema: {errors[0].message}")
    return value
