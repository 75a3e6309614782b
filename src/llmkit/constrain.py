"""JSON-schema constrained decoding: a token mask built from a schema, so that output always parses.

The grammar engine is xgrammar; llmkit's part is:

* the vocabulary as bytes, read from llmkit's own ``Tokenizer`` (no transformers tokenizer needed),
  sized to the model's logits width, which can be larger than the tokenizer's vocabulary;
* a check of the schema before any grammar is built: its shape (each keyword's value of the kind
  JSON Schema's metaschema gives it); the keywords the mask really enforces (xgrammar silently
  ignores keywords it does not implement: ``not``, ``uniqueItems``, ``if``/``then``,
  ``multipleOf``..., which would let output through that does not validate); and bounds on the
  work it asks for (``SchemaLimits``: size, nesting, counts, regular-expression repetition). Each
  refusal is an ``UnsupportedSchemaError`` that says what and where;
* numbers bounded to what a program can hold: a number the schema leaves open on a side is written
  with at most 16 digits there, so that a model cannot run on writing digits until it is cut off;
* grammars built off any lock that other requests need, under a time budget, and kept in a cache
  bounded in bytes (least recently used out first), as is xgrammar's own;
* ``JSONSchemaProcessor``: a ``SamplingParams.logits_processors`` entry, one per request, that keeps a
  grammar matcher in step with the generated tokens and masks the logits.

The server's ``response_format`` uses the same pieces: ``processor_for_response_format``.
"""

from __future__ import annotations

import json
import re
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from llmkit.errors import LLMKitError

__all__ = [
    "UnsupportedSchemaError",
    "ConstraintViolationError",
    "SchemaLimits",
    "DEFAULT_LIMITS",
    "NUMBER_BOUND",
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


@dataclass(frozen=True)
class SchemaLimits:
    """Bounds on the work that one schema may ask for. Past each one the schema is refused with an
    ``UnsupportedSchemaError`` that names the limit. They bound building a grammar: a grammar
    already built is served from the cache whatever the limits."""

    max_bytes: int = 65_536  # the schema written as JSON
    max_depth: int = 64  # objects and arrays nested in one another in the schema document
    max_properties: int = 500  # named properties, all objects together
    max_enum_values: int = 1_000  # enum values, all enums together
    max_length: int = 100_000  # a string's minLength / maxLength
    max_items: int = 10_000  # an array's minItems / maxItems
    max_pattern_size: int = 2_000  # all patterns written out in full: a{100} counts 100, (a{10}){10} too
    build_seconds: float = 10.0  # building the grammar, from its start to its end


DEFAULT_LIMITS = SchemaLimits()

# The largest number with 16 digits. Where a schema leaves a number open, the mask allows at most
# 16 digits before the point (and 16 after it, and 3 in an exponent): a double holds every
# integer up to 2**53, a 16-digit number, exactly; llama.cpp's schema grammars stop at 16 digits too.
NUMBER_BOUND = 10**16 - 1

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
# What {"type": "json_object"} asks for: a JSON object or array, as a schema, so that it gets the
# same whitespace and number bounds as any other.
_ANY_JSON = {"type": ["object", "array"]}


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
        except RecursionError:
            raise UnsupportedSchemaError("the schema is nested too deeply to read; use $defs and $ref") from None
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


# ------------------------------------------------------------------------------------------- checks


def check_schema(schema: Any, path: str = "#", limits: SchemaLimits = DEFAULT_LIMITS) -> None:
    """Raise ``UnsupportedSchemaError`` unless ``schema`` is a valid JSON schema, within ``limits``,
    whose every keyword the mask enforces. ``path`` names the schema's place in messages."""
    _check_valid(json.loads(_schema_text(schema, path, limits)), path, limits)


def _schema_text(schema: Any, path: str, limits: SchemaLimits) -> str:
    """The schema as compact JSON text, once it is known to be JSON within the depth and size limits."""
    if _deeper_than(schema, limits.max_depth):
        raise _over(path, f"the schema nests objects and arrays more than {limits.max_depth} levels deep",
                    "max_depth", "describe deep or recursive structures with $defs and $ref")
    try:
        text = json.dumps(schema, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise UnsupportedSchemaError(f"{path}: the schema is not JSON: {exc}") from None
    size = len(text.encode("utf-8"))
    if size > limits.max_bytes:
        raise _over(path, f"the schema is {size:,} bytes as JSON, over {limits.max_bytes:,}", "max_bytes",
                    "send a smaller schema")
    return text


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether objects and arrays nest more than ``limit`` levels in value (without recursion, so
    that any depth gets an answer)."""
    stack = [(value, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, Mapping):
            children = value.values()
        elif isinstance(value, (list, tuple)):
            children = value
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _check_valid(schema: Any, path: str, limits: SchemaLimits) -> None:
    """The checks after the size and depth limits: shape, keywords, and counts."""
    if not _is_schema(schema):
        raise UnsupportedSchemaError(f"not a valid JSON schema: at {path}, a schema is an object or a boolean, "
                                     f"not {_brief(schema)}")
    if schema is False:
        raise UnsupportedSchemaError(f"{path}: the schema `false` accepts no value at all")
    _check_keywords(schema, path, limits, _Tally())


_KINDS = ("object", "array", "string", "number", "integer", "boolean", "null")


def _is_schema(value: Any) -> bool:
    return isinstance(value, (Mapping, bool))


def _is_kind(value: Any) -> bool:
    return isinstance(value, str) and value in _KINDS


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _schemas_in(kind: type) -> Callable[[Any], bool]:
    values = (lambda v: v.values()) if kind is Mapping else (lambda v: v)
    return lambda value: isinstance(value, kind) and all(_is_schema(sub) for sub in values(value))


# What the value of each enforced keyword must be, as the JSON Schema metaschema (draft 2020-12)
# says. Checked here, while walking the schema, rather than with jsonschema's metaschema check:
# that check costs so much per subschema that a small schema of many empty alternatives holds a
# CPU for many seconds, and only these keywords are read (all others are refused or ignored).
_SHAPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "type": (lambda v: _is_kind(v) or isinstance(v, list) and len(v) > 0 and all(_is_kind(k) for k in v),
             f"one of {', '.join(_KINDS)}, or a list of them"),
    "properties": (_schemas_in(Mapping), "an object whose values are schemas"),
    "$defs": (_schemas_in(Mapping), "an object whose values are schemas"),
    "definitions": (_schemas_in(Mapping), "an object whose values are schemas"),
    "required": (lambda v: isinstance(v, list) and all(isinstance(name, str) for name in v),
                 "a list of property names"),
    "additionalProperties": (_is_schema, "a schema (an object or a boolean)"),
    "items": (_is_schema, "a schema (an object or a boolean)"),
    "prefixItems": (_schemas_in(list), "a list of schemas"),
    "anyOf": (lambda v: _schemas_in(list)(v) and len(v) > 0, "a non-empty list of schemas"),
    "allOf": (lambda v: _schemas_in(list)(v) and len(v) > 0, "a non-empty list of schemas"),
    "enum": (lambda v: isinstance(v, list), "a list of values"),
    "$ref": (lambda v: isinstance(v, str), "a string"),
    "pattern": (lambda v: isinstance(v, str), "a string"),
    "format": (lambda v: isinstance(v, str), "a string"),
    **{key: (_is_count, "a whole number, 0 or more") for key in ("minItems", "maxItems", "minLength", "maxLength")},
    **{key: (_is_number, "a number") for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")},
}


def _brief(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class _Tally:
    """Counts summed over a whole schema, for the limits that apply to the schema as a whole."""

    properties: int = 0
    enum_values: int = 0
    pattern_size: int = 0


def _over(where: str, what: str, limit: str, hint: str) -> UnsupportedSchemaError:
    return UnsupportedSchemaError(f"{where}: {what} (the limit SchemaLimits.{limit}); {hint}")


def _check_keywords(schema: Any, path: str, limits: SchemaLimits, tally: _Tally) -> None:
    """Every keyword the mask would not enforce, every value of the wrong shape, and every count
    over its limit, refused."""
    if isinstance(schema, bool):
        return
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
        check, expected = _SHAPES.get(key, (None, ""))
        if check is not None and not check(value):
            raise UnsupportedSchemaError(f"not a valid JSON schema: at {where}, {key} must be {expected}, "
                                         f"not {_brief(value)}")
        _check_keyword(key, value, path, limits, tally)
        if key in _SCHEMA_MAPS:
            for name, sub in value.items():
                _check_keywords(sub, f"{where}/{name}", limits, tally)
        elif key in _SCHEMA_LISTS:
            for i, sub in enumerate(value):
                _check_keywords(sub, f"{where}/{i}", limits, tally)
        elif key in _SCHEMA_ONE:
            _check_keywords(value, where, limits, tally)


def _check_keyword(key: str, value: Any, path: str, limits: SchemaLimits, tally: _Tally) -> None:
    where = f"{path}/{key}"
    if key == "format" and value not in SUPPORTED_FORMATS:
        raise UnsupportedSchemaError(
            f"format {value!r} at {path} cannot be enforced; supported formats: {', '.join(sorted(SUPPORTED_FORMATS))}"
        )
    if key == "const" and isinstance(value, (dict, list)):
        raise UnsupportedSchemaError(f"{where}: only a string, number, boolean or null const can be enforced")
    if key == "allOf" and len(value) != 1:
        raise UnsupportedSchemaError(f"{where}: allOf with several schemas cannot be enforced; merge them into one")
    if key == "$ref" and not value.startswith("#"):
        raise UnsupportedSchemaError(f"{where}: only references inside the schema (#/...) are supported, not {value!r}")
    if key in ("minLength", "maxLength") and value > limits.max_length:
        raise _over(where, f"{value:,} characters is over {limits.max_length:,}", "max_length",
                    "ask for a shorter string")
    if key in ("minItems", "maxItems") and value > limits.max_items:
        raise _over(where, f"{value:,} items is over {limits.max_items:,}", "max_items", "ask for fewer items")
    if key == "properties":
        tally.properties += len(value)
        if tally.properties > limits.max_properties:
            raise _over(where, f"the schema names more than {limits.max_properties:,} properties in all",
                        "max_properties", "ask for fewer properties")
    if key == "enum":
        tally.enum_values += len(value)
        if tally.enum_values > limits.max_enum_values:
            raise _over(where, f"the schema's enums offer more than {limits.max_enum_values:,} values in all",
                        "max_enum_values", "offer fewer values")
    if key == "pattern":
        tally.pattern_size += _pattern_size(value)
        if tally.pattern_size > limits.max_pattern_size:
            raise _over(where, f"the schema's patterns, with each repetition written out, come to more than "
                        f"{limits.max_pattern_size:,} characters", "max_pattern_size",
                        "use smaller repetition counts, or minLength/maxLength instead of a counted pattern")


_COUNT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def _pattern_size(pattern: str) -> int:
    """The length of a regular expression with each counted repetition written out: ``a{3}`` is 3,
    ``(ab){2,4}`` is 8, nested counts multiply; ``*``, ``+`` and ``?`` add nothing. Building the
    grammar of a pattern takes time that grows with this size, faster than in proportion."""
    sizes = [0]  # size so far of each open group, the whole pattern first
    last = 0  # size of what a count here would repeat
    i = 0
    while i < len(pattern):
        c = pattern[i]
        count = _COUNT.match(pattern, i) if c == "{" else None
        if c == "(":
            sizes.append(0)
            last, i = 0, i + 1
        elif c == ")" and len(sizes) > 1:
            last = sizes.pop()
            sizes[-1] += last
            i += 1
        elif count:
            digits = count.group(2) or count.group(1)  # {n,m}: m copies; {n} and {n,}: n
            times = int(digits) if len(digits) <= 9 else 10**9
            sizes[-1] += last * (times - 1)
            last, i = last * times, count.end()
        elif c in "*+?":
            i += 1
        else:  # one atom: an escape, a character class, or a character
            i = i + 2 if c == "\\" else _class_end(pattern, i) if c == "[" else i + 1
            last = 1
            sizes[-1] += 1
    return sum(sizes)


def _class_end(pattern: str, i: int) -> int:
    """Where the character class that opens at pattern[i] ends (the index after its "]")."""
    i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


def _bound_numbers(schema: Any) -> Any:
    """A copy of the schema in which each integer or number bounded on one side only gets a bound
    on the other, at NUMBER_BOUND (or at the first bound, if that is beyond it). Numbers open on
    both sides are bounded in the grammar instead (``_bounded_ebnf``), which keeps fractions and
    exponents."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if key in out:
            out[key] = {name: _bound_numbers(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if key in out:
            out[key] = [_bound_numbers(sub) for sub in out[key]]
    for key in _SCHEMA_ONE:
        if key in out:
            out[key] = _bound_numbers(out[key])
    kinds = out.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if not {"integer", "number"} & set(kinds) or "enum" in out or "const" in out:
        return out
    lower = out.get("minimum", out.get("exclusiveMinimum"))
    upper = out.get("maximum", out.get("exclusiveMaximum"))
    if lower is None and upper is not None:
        out["minimum"] = min(-NUMBER_BOUND, upper)
    if upper is None and lower is not None:
        out["maximum"] = max(NUMBER_BOUND, lower)
    return out


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


# ------------------------------------------------------------------------------------------- grammars

# Bytes of built grammars that a compiler keeps, in llmkit's cache and in xgrammar's own.
CACHE_BYTES = 16 << 20


class _Compiler:
    """An xgrammar compiler for one (tokenizer, logits width), and llmkit's cache of the grammars
    built with it. Each grammar is built in a thread of its own, off the lock, so that a slow
    build holds up nothing but the requests that wait for that grammar."""

    def __init__(self, tokenizer, vocab_size: int, cache_bytes: int = CACHE_BYTES):
        import xgrammar as xgr

        encoded, stops = _token_bytes(tokenizer, vocab_size)
        info = xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stops or None,
                                 add_prefix_space=_add_prefix_space(tokenizer))
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=True, cache_limit_bytes=cache_bytes)
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()  # guards the maps below; never held while a grammar is built
        self._cache: OrderedDict[str, Any] = OrderedDict()  # least recently used first
        self._cached_bytes = 0
        self._building: dict[str, tuple[Future, float]] = {}  # key -> (its grammar, monotonic start)

    def cached(self, key: str):
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
            return grammar

    def building(self, key: str) -> bool:
        with self._lock:
            return key in self._building

    def get(self, key: str, build: Callable[[], Any], budget: float):
        """The grammar under ``key``: cached, or from the build under way, or from a new build.
        ``FutureTimeout`` when it is not ready ``budget`` seconds after its build began; the build
        then runs on to its end (a build cannot be interrupted) and its grammar is kept."""
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                return grammar
            if key not in self._building:
                self._building[key] = (Future(), time.monotonic())
                threading.Thread(target=self._build, args=(key, build), name="llmkit-grammar", daemon=True).start()
            future, started = self._building[key]
        return future.result(timeout=max(0.0, started + budget - time.monotonic()))

    def _build(self, key: str, build: Callable[[], Any]) -> None:
        try:
            grammar = build()
        except BaseException as exc:  # handed to whoever waits for it
            with self._lock:
                future, _ = self._building.pop(key)
            future.set_exception(exc)
            return
        with self._lock:
            future, _ = self._building.pop(key)
            self._keep(key, grammar)
        future.set_result(grammar)

    def _keep(self, key: str, grammar) -> None:
        self._cache[key] = grammar
        self._cached_bytes += grammar.memory_size_bytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.memory_size_bytes


_compilers: "weakref.WeakKeyDictionary[Any, dict[int, _Compiler]]" = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def _compiler_for(tokenizer, vocab_size: int) -> _Compiler:
    # One compiler per (tokenizer, width), kept as long as the tokenizer lives: its byte
    # vocabulary is worth building once, and built grammars are worth reusing.
    with _compilers_lock:
        per_tok = _compilers.setdefault(tokenizer, {})
        if vocab_size not in per_tok:
            per_tok[vocab_size] = _Compiler(tokenizer, vocab_size)
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

# xgrammar writes every number that the schema leaves open (and those inside values of any type)
# with these rules, whose digits run on without end; each is swapped for a form with at most 16
# digits before the point, 16 after it and 3 in the exponent. Each rule is swapped only when it
# reads exactly as below, so a different xgrammar cannot be rewritten wrongly (tests notice).
_OPEN_NUMBER_RULES = {
    "basic_integer": ('(("0") | (basic_integer_1 [1-9] [0-9]*))',
                      '(("0") | (basic_integer_1 [1-9] [0-9]{0,15}))'),
    "basic_number_2": ('(("0") | ([1-9] [0-9]*))', '(("0") | ([1-9] [0-9]{0,15}))'),
    "basic_number_3": ('("" | ("." basic_number_digits{1, -1}))', '("" | ("." basic_number_digits{1,16}))'),
    "basic_number_5": ('("" | ([eE] basic_number_4 basic_number_digits{1, -1}))',
                       '("" | ([eE] basic_number_4 basic_number_digits{1,3}))'),
}


def _bounded_ebnf(ebnf: str) -> str:
    lines = []
    for line in ebnf.splitlines():
        name, sep, body = line.partition(" ::= ")
        if sep and name in _OPEN_NUMBER_RULES and body == _OPEN_NUMBER_RULES[name][0]:
            line = f"{name} ::= {_OPEN_NUMBER_RULES[name][1]}"
        lines.append(line)
    return "\n".join(lines).replace(_BOUNDED_CHARS, _JSON_CHARS)


def _json_schema_grammar(schema: Any):
    import xgrammar as xgr

    options = dict(any_whitespace=False, separators=_SEPARATORS, strict_mode=True)
    grammar = xgr.Grammar.from_json_schema(json.dumps(_bound_numbers(schema)), **options)
    return xgr.Grammar.from_ebnf(_bounded_ebnf(str(grammar)))


def _literal(text: str):
    import xgrammar as xgr

    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


def _build_grammar(compiler, schema: Any, wrap: tuple[str, str] | None):
    import xgrammar as xgr

    try:
        grammar = _json_schema_grammar(schema)
        if wrap:
            grammar = xgr.Grammar.concat(_literal(wrap[0]), grammar, _literal(wrap[1]))
        return compiler.compile_grammar(grammar)
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).split(": ", 1)[-1].strip()
        raise UnsupportedSchemaError(f"the schema cannot be enforced: {reason}") from None


def compile_schema(tokenizer, vocab_size: int, schema: Any, wrap: tuple[str, str] | None = None,
                   limits: SchemaLimits = DEFAULT_LIMITS):
    """The compiled grammar (xgrammar ``CompiledGrammar``) for a schema; ``None`` means any JSON
    object or array.

    wrap: (prefix, suffix), literal text that must come before and after the JSON document (the
    server's tool calls: ``<tool_call>`` ... ``</tool_call>``). limits: what building may cost;
    ``UnsupportedSchemaError`` past any of them, including a build that runs past
    ``limits.build_seconds`` (while other schemas build meanwhile).
    """
    # not sort_keys: property order is the order the model writes them in
    text = _schema_text(_ANY_JSON if schema is None else schema, "#", limits)
    key = text + (json.dumps(wrap) if wrap else "")
    comp = _compiler_for(tokenizer, vocab_size)
    grammar = comp.cached(key)
    if grammar is not None:
        return grammar
    schema = json.loads(text)  # plain JSON values, and a copy of its own for the build
    _check_valid(schema, "#", limits)
    try:
        return comp.get(key, lambda: _build_grammar(comp.compiler, schema, wrap), limits.build_seconds)
    except FutureTimeout:
        raise _over("#", f"building the grammar for this schema took longer than {limits.build_seconds:g} s",
                    "build_seconds", "simplify the schema: fewer or shorter patterns, fewer properties, "
                    "alternatives or enum values") from None


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


def json_schema_processor(tokenizer, vocab_size: int, schema: Any, wrap: tuple[str, str] | None = None,
                          limits: SchemaLimits = DEFAULT_LIMITS) -> JSONSchemaProcessor:
    """A fresh processor for one request. ``schema``: dict, JSON text, pydantic model, or None (any
    JSON object or array); ``wrap``: literal (prefix, suffix) around the document."""
    if schema is not None:
        schema, _ = schema_from(schema)
    return JSONSchemaProcessor(compile_schema(tokenizer, vocab_size, schema, wrap, limits), vocab_size)


def processor_for_response_format(tokenizer, vocab_size: int, response_format: Mapping | None,
                                  limits: SchemaLimits = DEFAULT_LIMITS):
    """The processor for an OpenAI ``response_format``, or None for plain text.

    ``{"type": "json_object"}`` -> any JSON object or array; ``{"type": "json_schema", "json_schema":
    {"schema": {...}}}`` -> that schema; ``{"type": "text"}`` -> None.
    """
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return json_schema_processor(tokenizer, vocab_size, None, limits=limits)
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if schema is None:
            raise UnsupportedSchemaError("response_format json_schema needs json_schema.schema")
        return json_schema_processor(tokenizer, vocab_size, schema, limits=limits)
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
