"""Information extraction: the model card's templates and JSON Schemas, one as the other, and
LLM.ocr(schema=...) constrained to them with the model card's prompt."""
import json

import jsonschema
import pytest

import glmrt
from glmrt.extraction import (
    EXTRACTION_PREFIX,
    as_json_schema,
    extraction_prompt,
    is_json_schema,
    schema_to_template,
    template_to_schema,
)
from glmrt.prompts import task_prompt
from glmrt_testing.helpers import make_image

ID_CARD = {  # the model card's example, abridged
    "id_number": "", "last_name": "", "first_name": "",
    "address": {"street": "", "city": "", "zip_code": ""},
    "items": [{"name": "", "price": ""}],
}


def test_template_to_schema_requires_every_key_in_template_order():
    schema = template_to_schema(ID_CARD)
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert list(schema["properties"]) == schema["required"] == list(ID_CARD)
    assert schema["properties"]["id_number"] == {"type": "string"}
    address = schema["properties"]["address"]
    assert address["required"] == ["street", "city", "zip_code"] and address["additionalProperties"] is False
    items = schema["properties"]["items"]
    assert items["type"] == "array" and items["items"]["required"] == ["name", "price"]
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate({**ID_CARD, "items": []}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in ID_CARD.items() if k != "first_name"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**ID_CARD, "extra": ""}, schema)


def test_template_leaves_and_lists():
    schema = template_to_schema({"姓名": "", "n": 0, "x": 1.5, "ok": False, "none": None, "tags": [""], "empty": []})
    props = schema["properties"]
    assert list(props) == ["姓名", "n", "x", "ok", "none", "tags", "empty"]
    assert [props[k]["type"] for k in ("姓名", "n", "x", "ok", "none")] == ["string", "integer", "number", "boolean", "null"]
    assert props["tags"] == {"type": "array", "items": {"type": "string"}} == props["empty"]


@pytest.mark.parametrize("value,expected", [
    ({"type": "object", "properties": {}}, True),
    ({"type": ["string", "null"]}, True),
    ({"$schema": "https://json-schema.org/draft/2020-12/schema"}, True),
    ({"$ref": "#/$defs/a", "$defs": {"a": {}}}, True),
    ({"anyOf": [{"type": "string"}, {"type": "null"}]}, True),
    ({"type": "", "name": ""}, False),  # a template with a field called "type"
    ({"type": "invoice"}, False),  # ... or an example value that is no JSON type
    ({"name": "", "properties": ""}, False),
    # no "type": a schema when every key is a schema keyword, each with its JSON Schema shape
    ({"enum": ["yes", "no"]}, True),
    ({"const": "fixed", "description": "always"}, True),
    ({"properties": {"a": {"type": "string"}}, "required": ["a"]}, True),
    ({"items": {"type": "integer"}, "maxItems": 3}, True),
    ({"not": {"type": "null"}}, True),
    ({"items": [{"price": ""}]}, False),  # a template's field "items": a list of objects
    ({"enum": ["a"], "name": ""}, False),  # "name" is no keyword
    ({"title": "", "description": ""}, False),  # annotations say nothing of a value
    ({"properties": {"a": ""}}, False),
    (ID_CARD, False),
    ([{"a": ""}], False),
])
def test_schema_or_template(value, expected):
    assert is_json_schema(value) is expected
    assert (as_json_schema(value) == value) is expected


def test_schema_to_template():
    schema = {
        "type": "object",
        "$defs": {"line": {"type": "object", "properties": {"qty": {"type": "integer"}, "sku": {"type": "string"}}}},
        "properties": {
            "name": {"type": "string"}, "total": {"type": "number"},
            "note": {"anyOf": [{"type": "null"}, {"type": "string"}]},
            "lines": {"type": "array", "items": {"$ref": "#/$defs/line"}},
            "tags": {"type": "array", "items": {"type": "string"}},
            "meta": {"type": ["object", "null"], "properties": {"by": {"type": "string"}}},
        },
    }
    assert schema_to_template(schema) == {"name": "", "total": "", "note": "", "lines": [{"qty": "", "sku": ""}],
                                          "tags": [""], "meta": {"by": ""}}
    assert schema_to_template(template_to_schema(ID_CARD)) == ID_CARD


def test_prompt_is_the_model_cards():
    text = '{\n    "id_number": "",\n    "姓名": ""\n}'
    assert EXTRACTION_PREFIX == "请按下列JSON格式输出图中信息:"
    assert extraction_prompt(text) == "请按下列JSON格式输出图中信息:\n" + text  # the user's text, verbatim
    assert extraction_prompt({"姓名": "", "a": [{"b": ""}]}) == (
        EXTRACTION_PREFIX + '\n{\n    "姓名": "",\n    "a": [\n        {\n            "b": ""\n        }\n    ]\n}')
    schema = template_to_schema({"姓名": "", "a": [{"b": ""}]})
    assert extraction_prompt(schema) == extraction_prompt({"姓名": "", "a": [{"b": ""}]})
    assert task_prompt("text", text) == extraction_prompt(text)


def test_errors_name_the_schema():
    with pytest.raises(ValueError, match="schema is not valid JSON"):
        as_json_schema("{name: ''}")
    with pytest.raises(TypeError, match="schema must be a JSON Schema or a JSON template"):
        as_json_schema(3)
    deep: dict = {}
    node = deep
    for _ in range(40):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ValueError, match="nests deeper than"):
        as_json_schema(deep)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return glmrt.LLM(str(tiny_checkpoint), device="cpu", dtype="float32", backend="torch")


def test_ocr_with_a_json_schema_returns_valid_json(llm):
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "lines"], "properties": {
        "name": {"type": "string", "maxLength": 8},
        "lines": {"type": "array", "maxItems": 2, "items": {"type": "object", "additionalProperties": False,
                                                            "required": ["qty"],
                                                            "properties": {"qty": {"type": "integer", "minimum": 0,
                                                                                   "maximum": 9}}}}}}
    for seed in range(3):
        text = llm.ocr(make_image(56, 84, seed), schema=json.dumps(schema),
                       sampling_params=glmrt.SamplingParams(max_tokens=300))
        jsonschema.validate(json.loads(text), schema)


TEMPLATE_TEXT = '{\n    "编号": "",\n    "items": [{"price": ""}]\n}'


@pytest.mark.parametrize("template", [TEMPLATE_TEXT, json.loads(TEMPLATE_TEXT)], ids=["text", "dict"])
def test_ocr_with_a_template_sends_the_model_cards_prompt_and_constrains_to_its_schema(llm, monkeypatch, template):
    """Template strings are unbounded, so random weights need not close them within max_tokens:
    every output token must be one the template's schema allows, and a finished output validates."""
    sent, got = [], []
    generate = llm.generate

    def spy(request, params):
        sent.append((request, params))
        got.extend(generate(request, params))
        return got

    monkeypatch.setattr(llm, "generate", spy)
    try:
        text = llm.ocr(make_image(56, 56, 0), schema=template, sampling_params=glmrt.SamplingParams(max_tokens=40))
    except glmrt.IncompleteOutputError as exc:  # cut at max_tokens: the text as far as it got
        text = exc.output.text
    [(request, params)], [out] = sent, got
    expected = template if isinstance(template, str) else json.dumps(template, indent=4, ensure_ascii=False)
    assert request.prompt == "请按下列JSON格式输出图中信息:\n" + expected
    assert params.json_schema == template_to_schema(json.loads(TEMPLATE_TEXT)) and params.max_tokens == 40
    assert text == out.text and text.startswith("{") and out.finish_reason in ("stop", "length")
    matcher = llm.engine.structured.matcher(params)
    assert all(matcher.consume_token(t) for t in out.token_ids), text  # a prefix of the schema's language
    if out.finish_reason == "stop":
        jsonschema.validate(json.loads(text), params.json_schema)


def test_ocr_raises_when_the_json_is_incomplete(llm):
    """JSON cut at max_tokens is not JSON: ocr(schema=...) raises, with the output; text cut there
    is returned as far as it got."""
    with pytest.raises(glmrt.IncompleteOutputError, match=r"incomplete JSON \(finish_reason 'length' after 3 "
                                                          r"tokens\); raise max_tokens") as raised:
        llm.ocr(make_image(56, 56, 0), schema=TEMPLATE_TEXT, sampling_params=glmrt.SamplingParams(max_tokens=3))
    out = raised.value.output
    assert out.finish_reason == "length" and len(out.token_ids) == 3 and out.text.startswith("{")
    text = llm.ocr(make_image(56, 56, 0), sampling_params=glmrt.SamplingParams(max_tokens=3))
    assert isinstance(text, str) and text


def test_ocr_refuses_a_second_constraint(llm):
    constraints = ({"regex": "a+"}, {"choice": ["a", "b"]}, {"json_object": True}, {"json_schema": {"type": "object"}})
    for constraint in constraints:
        with pytest.raises(ValueError, match="sampling_params already carries a constraint"):
            llm.ocr(make_image(56, 56, 0), schema=TEMPLATE_TEXT, sampling_params=glmrt.SamplingParams(**constraint))
