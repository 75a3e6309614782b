"""JSON-schema constrained decoding: the mask enforces what it claims, refuses what it cannot,
and decoding under it always yields a document that parses and validates."""

from __future__ import annotations

import json

import pytest
import torch

from llmkit.constrain import (
    JSONSchemaProcessor, UnsupportedSchemaError, _token_bytes, check_schema, compile_schema,
    processor_for_response_format, schema_from, validate_output,
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
