"""JSON-schema constrained decoding: the mask enforces what it claims, refuses what it cannot,
and decoding under it always yields a document that parses and validates."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from llmkit.constrain import (
    JSONSchemaProcessor, UnsupportedSchemaError, _token_bytes, check_schema, compile_schema,
    json_schema_processor, processor_for_response_format, schema_from, validate_output,
)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from llmkit.tokenizer import Tokenizer

    return Tokenizer.from_folder(tiny_tokenizer_dir)


VOCAB = 416  # wider than the tokenizer (400), as model logits often are


def accepts(tok, schema, text) -> bool:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compile_schema(tok, VOCAB, schema))
    return matcher.accept_string(text) and matcher.is_completed()


# (schema, documents it must accept, documents it must reject); json.dumps spacing
ENFORCED = [
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
     ['{"a": 1}'], ['{}', '{"a": "x"}', '{"a": 1, "b": 2}']),
    ({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "boolean"}},
                                                 "required": ["b"]}}, "required": ["a"]},
     ['{"a": {"b": true}}'], ['{"a": {}}', '{"a": {"b": 1}}']),
    ({"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 2},
     ["[1.5]", "[1, -2e3]"], ["[]", "[1, 2, 3]", '["x"]']),
    ({"type": "string", "minLength": 2, "maxLength": 3}, ['"ab"'], ['"a"', '"abcd"', '"a\tb"', '"\x0fb"']),
    ({"type": "string"}, ['"a b"'], ['"a\tb"']),
    ({"type": "string", "pattern": "^.*$"}, ['"a b"'], ['"a\tb"']),
    ({"type": "string", "pattern": "^[a-z]+$"}, ['"abc"'], ['"aBc"']),
    ({"type": "string", "format": "date"}, ['"2024-02-29"'], ['"yesterday"']),
    ({"type": "integer", "minimum": 1, "maximum": 5}, ["3"], ["0", "6", "2.5"]),
    ({"type": "number", "exclusiveMinimum": 0}, ["0.5"], ["0", "-1"]),
    ({"enum": ["red", "green", 3]}, ['"red"', "3"], ['"blue"', "4"]),
    ({"const": "x"}, ['"x"'], ['"y"']),
    ({"type": ["string", "null"]}, ['"s"', "null"], ["1"]),
    ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, ["1", "false"], ['"1"']),
    ({"$defs": {"P": {"type": "integer"}}, "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}},
      "required": ["p"]}, ['{"p": 2}'], ['{"p": "2"}']),
    ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
     ['[1, "a"]'], ['["a", 1]', '[1, "a", 2]']),
]


@pytest.mark.parametrize("schema,good,bad", ENFORCED, ids=[json.dumps(s)[:40] for s, _, _ in ENFORCED])
def test_supported_keywords_are_enforced(tok, schema, good, bad):
    import jsonschema

    for text in good:
        assert accepts(tok, schema, text), text
        jsonschema.validate(json.loads(text), schema)
    for text in bad:
        assert not accepts(tok, schema, text), text


@pytest.mark.parametrize("schema,word", [
    ({"not": {"type": "string"}}, "not"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf"),
    ({"if": {"type": "string"}, "then": {"minLength": 2}}, "if"),
    ({"type": "integer", "multipleOf": 3}, "multipleOf"),
    ({"type": "object", "properties": {"a": {"type": "object", "patternProperties": {"^x": {}}}}}, "patternProperties"),
    ({"$ref": "http://example.com/s.json"}, "http://example.com"),
    ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "allOf"),
    ({"type": "string", "format": "credit-card"}, "credit-card"),
    ({"type": "object", "minProperties": 2}, "minProperties"),
    ({"const": {"a": 1}}, "const"),
    ({"type": "decimal"}, "decimal"),
])
def test_unenforceable_schemas_are_refused_with_the_reason(tok, schema, word):
    with pytest.raises(UnsupportedSchemaError, match="(?s)" + word.replace("$", r"\$")):
        compile_schema(tok, VOCAB, schema)


def test_refusal_names_where_the_keyword_is():
    with pytest.raises(UnsupportedSchemaError, match="#/properties/tags"):
        check_schema({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}})


def test_pydantic_models_and_json_text_become_schemas():
    from pydantic import BaseModel

    class Item(BaseModel):
        name: str
        qty: int = 1

    class Order(BaseModel):
        items: list[Item]
        note: str | None = None

    schema, model = schema_from(Order)
    assert model is Order and "$defs" in schema
    check_schema(schema)
    assert schema_from('{"type": "integer"}') == ({"type": "integer"}, None)
    with pytest.raises(UnsupportedSchemaError, match="not valid JSON"):
        schema_from("{nope")


def test_token_bytes_match_the_tokenizer(tok):
    encoded, stops = _token_bytes(tok, VOCAB)
    assert len(encoded) == VOCAB and stops == sorted(tok.eos_token_ids)
    for i in range(tok.vocab_size):
        if i in tok.special_ids:
            assert encoded[i] == b""
        else:
            assert encoded[i] == tok.decode([i]).encode("utf-8") or "\ufffd" in tok.decode([i]), i
    assert all(b == b"" for b in encoded[tok.vocab_size:])


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                     "zip": {"type": ["integer", "null"]}},
                    "required": ["city"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "address"],
}


@pytest.mark.parametrize("seed", range(12))
def test_decoding_under_the_mask_always_validates(tok, seed):
    """Random logits stand in for a model: whatever it prefers, the masked output validates."""
    eos = sorted(tok.eos_token_ids)
    proc = JSONSchemaProcessor(compile_schema(tok, VOCAB, SCHEMA), VOCAB)
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(400):
        logits = torch.randn(VOCAB, generator=gen) * 3
        masked = proc(out, logits)
        token = int(torch.multinomial(torch.softmax(masked, -1), 1, generator=gen))
        out.append(token)
        if token in eos:
            break
    assert out[-1] in eos, "did not finish"
    value = validate_output(tok.decode(out[:-1]), SCHEMA)
    assert isinstance(value["age"], int)


def test_response_format(tok):
    assert processor_for_response_format(tok, VOCAB, None) is None
    assert processor_for_response_format(tok, VOCAB, {"type": "text"}) is None
    any_json = processor_for_response_format(tok, VOCAB, {"type": "json_object"})
    assert any_json.matcher.accept_string('{"x": [1, 2]}')
    p = processor_for_response_format(tok, VOCAB, {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}})
    assert not p.matcher.accept_string('{"y"')
    with pytest.raises(UnsupportedSchemaError, match="grammar"):
        processor_for_response_format(tok, VOCAB, {"type": "grammar"})


def test_validate_output_explains_truncation():
    from llmkit.constrain import ConstraintViolationError

    with pytest.raises(ConstraintViolationError, match="max_tokens"):
        validate_output('{"a": ', {"type": "object"})


# ------------------------------------------------------------------------------ malformed schemas


@pytest.mark.parametrize("schema,where", [
    ({"allOf": 5}, "#/allOf"),
    ({"anyOf": 5}, "#/anyOf"),
    ({"properties": [1]}, "#/properties"),
    ({"format": ["x"]}, "#/format"),
    ({"type": "object", "properties": {"a": {"enum": 3}}}, "#/properties/a/enum"),
    ({"required": "a"}, "#/required"),
    ({"type": "string", "maxLength": -1}, "#/maxLength"),
    ({"$defs": 5}, "#/$defs"),
    ({"$ref": 5}, "#/$ref"),
    ({"type": "decimal"}, "#/type"),
    (5, "#"),
])
def test_schemas_of_the_wrong_shape_are_refused_with_where(tok, schema, where):
    with pytest.raises(UnsupportedSchemaError, match=re.escape(f"not a valid JSON schema: at {where}, ")):
        compile_schema(tok, VOCAB, schema)


def nested(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_a_schema_nested_a_thousand_levels_is_refused_cleanly(tok):
    with pytest.raises(UnsupportedSchemaError, match="max_depth"):
        compile_schema(tok, VOCAB, nested(1000))
    with pytest.raises(UnsupportedSchemaError, match="nested too deeply|max_depth"):
        json_schema_processor(tok, VOCAB, '{"items": ' * 100_000 + "{}" + "}" * 100_000)
    loop: dict = {"type": "object"}
    loop["properties"] = {"self": loop}  # a dict that holds itself: no JSON at all
    with pytest.raises(UnsupportedSchemaError, match="max_depth"):
        check_schema(loop)
    assert accepts(tok, nested(20), '{"a": ' * 20 + "1" + "}" * 20)


def test_tool_parameters_of_the_wrong_shape_get_a_400_that_names_the_function():
    from llmkit.server import schemas, tools
    from llmkit.server.errors import APIError

    def plan(parameters, choice="required"):
        tool = {"type": "function", "function": {"name": "find", "parameters": parameters}}
        return tools.plan_for(schemas.ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], "tools": [tool], "tool_choice": choice}))

    for parameters in ({"allOf": 5}, {"anyOf": 5}, {"properties": [1]}, {"format": ["x"]}, {"$defs": 5},
                       nested(1000)):
        with pytest.raises(APIError) as caught:
            plan(parameters)
        assert caught.value.status == 400 and caught.value.code == "unsupported_schema"
        assert "parameters of find" in str(caught.value)
        assert plan(parameters, choice="auto").choice == "auto"  # not enforced: not compiled, not refused


# ------------------------------------------------------------------------------ bounded work


def test_pattern_size_writes_repetitions_out():
    from llmkit.constrain import _pattern_size

    assert _pattern_size("^a{3}$") == 5  # ^ aaa $
    assert _pattern_size("(ab){2,4}") == 8
    assert _pattern_size("(a{10}){10}") == 100
    assert _pattern_size("x{2,}") == 2
    assert _pattern_size("a*b+c?") == 3
    assert _pattern_size(r"[a{]{5}\{9}") == 5 + 3  # a brace inside a class or escaped counts nothing
    assert _pattern_size("a{99999999999999999999}") >= 10**9  # too many digits to read: huge


LIMITED = [
    ({"type": "string", "pattern": "^a{20000}$"}, "max_pattern_size"),
    ({"type": "string", "pattern": "^(a{100}){100}$"}, "max_pattern_size"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "^[a-z]{1000}$"} for i in range(5)}},
     "max_pattern_size"),
    ({"type": "string", "maxLength": 10**6}, "max_length"),
    ({"type": "string", "minLength": 10**6}, "max_length"),
    ({"type": "array", "minItems": 10**6}, "max_items"),
    ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(501)}}, "max_properties"),
    ({"anyOf": [{"enum": list(range(600))}, {"enum": list(range(600))}]}, "max_enum_values"),
    ({"type": "string", "description": "x" * 70_000}, "max_bytes"),
    (nested(40), "max_depth"),  # two JSON levels per schema level
]


@pytest.mark.parametrize("schema,limit", LIMITED, ids=[limit for _, limit in LIMITED])
def test_costly_schemas_are_refused_naming_the_limit_before_any_build(tok, schema, limit):
    with pytest.raises(UnsupportedSchemaError, match=f"SchemaLimits.{limit}"):
        check_schema(schema)  # the check alone refuses it: no grammar is built
    with pytest.raises(UnsupportedSchemaError, match=f"SchemaLimits.{limit}"):
        compile_schema(tok, VOCAB, schema)


def test_schemas_within_the_limits_compile(tok):
    fine = {"type": "object", "properties": {
        "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{1,6}$"},
        "name": {"type": "string", "maxLength": 100_000},
        "rows": {"type": "array", "items": {"type": "integer"}, "maxItems": 10_000},
        "kind": {"enum": [f"k{i}" for i in range(200)]},
    }, "required": ["date", "code"]}
    assert accepts(tok, fine, '{"date": "2024-01-31", "code": "ABC123"}')
    assert not accepts(tok, fine, '{"date": "2024-1-31", "code": "ABC123"}')


def test_a_slow_build_is_refused_at_its_budget_and_blocks_no_other_schema(tok):
    """A build past its time budget is refused while it runs on in its own thread; meanwhile other
    schemas compile; once it ends, its grammar is in the cache."""
    from llmkit.constrain import SchemaLimits, _compiler_for, _schema_text

    comp = _compiler_for(tok, VOCAB)
    compile_schema(tok, VOCAB, {"type": "boolean"})  # the compiler exists: what follows is building only
    slow = {"type": "string", "pattern": "^b{4000}$"}  # seconds of building, unlike any other schema here
    key = _schema_text(slow, "#", SchemaLimits())
    tight = SchemaLimits(max_pattern_size=10**6, build_seconds=0.05)
    with pytest.raises(UnsupportedSchemaError, match=r"longer than 0.05 s \(the limit SchemaLimits.build_seconds\)"):
        compile_schema(tok, VOCAB, slow, limits=tight)
    assert comp.building(key)  # refused, yet still building
    fast = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    assert accepts(tok, fast, '{"ok": true}')
    assert comp.building(key), "the fast schema waited for the slow one"
    with pytest.raises(UnsupportedSchemaError, match="build_seconds"):  # asking again joins the same build
        compile_schema(tok, VOCAB, slow, limits=tight)
    deadline = time.monotonic() + 600
    while comp.building(key) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert compile_schema(tok, VOCAB, slow, limits=tight) is comp.cached(key)  # built, kept, served at once


def test_grammar_caches_are_bounded_least_recently_used_first(tok):
    from llmkit.constrain import CACHE_BYTES, _build_grammar, _Compiler, _compiler_for

    assert _compiler_for(tok, VOCAB).compiler.cache_limit_bytes == CACHE_BYTES  # xgrammar's own cache too
    limit = 30_000
    comp = _Compiler(tok, VOCAB, cache_bytes=limit)
    schemas = [{"type": "object", "properties": {f"k{i}": {"type": "string", "pattern": f"^[a-z]{{{i + 1}}}x$"}},
                "required": [f"k{i}"]} for i in range(12)]

    def get(i):
        return comp.get(f"s{i}", lambda: _build_grammar(comp.compiler, schemas[i], None), 600)

    kept = get(0)
    total = kept.memory_size_bytes
    for i in range(1, 12):
        total += get(i).memory_size_bytes
        assert get(0) is kept  # used again each time: the least recently used goes first, never it
        assert comp._cached_bytes <= limit
    assert total > 2 * limit
    assert comp.cached("s1") is None and comp.cached("s11") is not None
    assert comp.compiler.get_cache_size_bytes() < 1.5 * limit  # xgrammar may go slightly over its bound


# ------------------------------------------------------------------------------ numbers


LEGS = {"type": "object", "properties": {"name": {"type": "string"}, "legs": {"type": "integer"}},
        "required": ["name", "legs"]}
D16, D17 = "1234567890123456", "12345678901234567"


@pytest.mark.parametrize("schema,template", [
    (LEGS, '{"name": "x", "legs": %s}'),
    ({"type": "integer"}, "%s"),
    ({"type": "integer"}, "-%s"),
    ({"type": "integer", "minimum": 0}, "%s"),
    ({"type": "integer", "maximum": 5}, "-%s"),
    ({"type": "number"}, "%s"),
    ({"type": "number"}, "0.%s"),
    ({"type": "number", "exclusiveMinimum": 0}, "%s"),
    ({"type": ["integer", "null"]}, "%s"),
    ({}, "[%s]"),  # a value of any type
    ({"type": "object", "additionalProperties": True}, '{"n": %s}'),
    (None, '{"n": %s}'),  # response_format json_object
])
def test_numbers_left_open_get_at_most_16_digits(tok, schema, template):
    assert accepts(tok, schema, template % D16)
    assert not accepts(tok, schema, template % D17)


def test_number_exponents_get_at_most_3_digits_and_bounds_in_the_schema_are_kept(tok):
    assert accepts(tok, {"type": "number"}, "1.5e308") and not accepts(tok, {"type": "number"}, "1.5e3080")
    wide = {"type": "integer", "minimum": 0, "maximum": 10**17}
    assert accepts(tok, wide, str(10**17)) and not accepts(tok, wide, str(10**17 + 1))


def test_the_mask_refuses_a_17th_digit(tok):
    compiled = compile_schema(tok, VOCAB, LEGS)
    proc = JSONSchemaProcessor(compiled, VOCAB)
    ids = tok.encode('{"name": "x", "legs": ' + D16)
    assert tok.decode(ids) == '{"name": "x", "legs": ' + D16
    masked = proc(ids, torch.zeros(VOCAB))
    allowed = [tok.decode([i]) for i in range(VOCAB) if masked[i] > float("-inf")]
    assert "}" in allowed and "," not in allowed
    assert not [text for text in allowed if text[:1].isdigit()]
    proc = JSONSchemaProcessor(compiled, VOCAB)
    masked = proc(ids[:-1], torch.zeros(VOCAB))  # one digit fewer: digits are still allowed
    assert any(tok.decode([i])[:1].isdigit() for i in range(VOCAB) if masked[i] > float("-inf"))


@pytest.mark.slow
def test_the_default_model_ends_its_json_before_max_tokens(smollm2):
    """Without bounds, SmolLM2 answers this prompt, greedily, with "legs": 1000000... until max_tokens."""
    from llmkit.constrain import json_schema_processor

    tokenizer = smollm2.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write a poem about the sea."}],
                                           add_generation_prompt=True)
    proc = json_schema_processor(tokenizer, smollm2.config.vocab_size, LEGS)
    out = smollm2.generate_ids(tokenizer.encode(prompt), max_tokens=48, temperature=0, logits_processors=[proc])
    assert out[-1] in tokenizer.eos_token_ids and len(out) < 48, tokenizer.decode(out)
    value = validate_output(tokenizer.decode(out[:-1]), LEGS)
    assert isinstance(value["legs"], int)
