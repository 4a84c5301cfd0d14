"""Information extraction: the model card's JSON templates and JSON Schemas, one as the other.

GLM-OCR was trained to extract fields with the prompt `请按下列JSON格式输出图中信息:` followed by
an example-style template: a JSON object whose leaves are empty strings, e.g.
`{"name": "", "date": "", "items": [{"price": ""}]}`. Users give either such a template or a JSON
Schema. The model always sees a template (the user's own text when they gave one, so the prompt
and hence unconstrained output are unchanged); decoding is constrained by a schema (the user's
own, or one made from the template: strings, nested objects, arrays of objects, every key
required, in template order, no other keys).

Telling them apart: a dict is a JSON Schema when it has "$schema", a "type" naming JSON Schema
types, or a schema combinator ("$ref", "anyOf", "oneOf", "allOf") of the right shape; or, without
"type", when every key is a JSON Schema keyword and those that say what a value is ("enum",
"const", "properties", "items", "not", ...) have the shape JSON Schema gives them (`{"enum": ["a",
"b"]}`, `{"const": 1}`). Anything else is a template (so a template may have a field called "type"
as long as its value is not a type name such as "string", or "items" holding a list of objects).
"""
from __future__ import annotations

import json
from typing import Any

EXTRACTION_PREFIX = "请按下列JSON格式输出图中信息:"
_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_MAX_DEPTH = 32


def _subschema(value: Any) -> bool:
    return isinstance(value, (dict, bool))


def _subschemas(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(map(_subschema, value))


def _subschema_map(value: Any) -> bool:
    return isinstance(value, dict) and all(map(_subschema, value.values()))


# Keywords that say what a value is, with the shape each takes in a JSON Schema.
_ASSERTIONS = {
    "enum": lambda v: isinstance(v, list) and bool(v), "const": lambda v: True,
    "properties": _subschema_map, "patternProperties": _subschema_map, "additionalProperties": _subschema,
    "items": _subschema, "prefixItems": _subschemas, "contains": _subschema, "not": _subschema,
}
# Keywords that may sit beside them (annotations, definitions, bounds, conditions).
_OTHER_KEYWORDS = {
    "title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly", "$id", "$anchor",
    "$comment", "$defs", "definitions", "required", "dependentRequired", "dependentSchemas", "pattern",
    "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength",
    "maxLength", "minItems", "maxItems", "uniqueItems", "minContains", "maxContains", "minProperties",
    "maxProperties", "propertyNames", "unevaluatedProperties", "unevaluatedItems", "if", "then", "else",
    "x-guidance",
}


def is_json_schema(value: Any) -> bool:
    """Whether a parsed JSON value is a JSON Schema rather than a model-card template."""
    if not isinstance(value, dict):
        return False
    kind = value.get("type")
    if isinstance(kind, str) and kind in _JSON_TYPES:
        return True
    if isinstance(kind, list) and kind and all(isinstance(k, str) and k in _JSON_TYPES for k in kind):
        return True
    if "$schema" in value or isinstance(value.get("$ref"), str):
        return True
    if any(isinstance(value.get(k), list) and value[k] and all(isinstance(s, dict) for s in value[k])
           for k in ("anyOf", "oneOf", "allOf")):
        return True
    assertions = [k for k in value if k in _ASSERTIONS]
    return (bool(assertions) and all(k in _ASSERTIONS or k in _OTHER_KEYWORDS for k in value)
            and all(_ASSERTIONS[k](value[k]) for k in assertions))


def template_to_schema(template: Any, _depth: int = 0) -> dict:
    """A model-card template -> the JSON Schema its answers follow: objects with every key required
    in template order and no others, arrays of the first element's shape, strings for "" (and for
    any other string), numbers, booleans and null for those leaves."""
    if _depth > _MAX_DEPTH:
        raise ValueError(f"the template nests deeper than {_MAX_DEPTH} levels")
    if isinstance(template, dict):
        return {
            "type": "object",
            "properties": {key: template_to_schema(value, _depth + 1) for key, value in template.items()},
            "required": list(template),
            "additionalProperties": False,
        }
    if isinstance(template, list):
        return {"type": "array", "items": template_to_schema(template[0] if template else "", _depth + 1)}
    if isinstance(template, bool):
        return {"type": "boolean"}
    if isinstance(template, int):
        return {"type": "integer"}
    if isinstance(template, float):
        return {"type": "number"}
    if template is None:
        return {"type": "null"}
    return {"type": "string"}


def schema_to_template(schema: dict, _root: dict | None = None, _depth: int = 0) -> Any:
    """A JSON Schema -> the model-card template for the prompt: objects keep their properties in
    order, arrays hold one element, every other leaf is ""."""
    root = schema if _root is None else _root
    if _depth > _MAX_DEPTH or not isinstance(schema, dict):
        return ""
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
        return schema_to_template(target, root, _depth + 1)
    for combinator in ("anyOf", "oneOf", "allOf"):
        options = [s for s in schema.get(combinator) or [] if isinstance(s, dict) and s.get("type") != "null"]
        if options:
            return schema_to_template(options[0], root, _depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    properties = schema.get("properties")
    if kind == "object" or isinstance(properties, dict):
        return {key: schema_to_template(value, root, _depth + 1) for key, value in (properties or {}).items()}
    if kind == "array":
        items = schema.get("items")
        return [schema_to_template(items, root, _depth + 1)] if isinstance(items, dict) else []
    return ""


def parse_schema_or_template(value: str | dict | list, what: str = "schema") -> Any:
    """JSON text or an already parsed value -> the parsed value; ValueError naming `what`."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} is not valid JSON: {exc}") from None
    if isinstance(value, (dict, list)):
        return value
    raise TypeError(f"{what} must be a JSON Schema or a JSON template (a dict or JSON text), got {type(value).__name__}")


def as_json_schema(value: str | dict | list, what: str = "schema") -> dict:
    """A JSON Schema or a model-card template (parsed or as JSON text) -> a JSON Schema."""
    parsed = parse_schema_or_template(value, what)
    return parsed if is_json_schema(parsed) else template_to_schema(parsed)


def extraction_prompt(value: str | dict | list, what: str = "schema") -> str:
    """The model card's extraction prompt for a template or a schema: the template as the user
    wrote it (JSON text verbatim; a dict indented by 4, non-ASCII kept), or the template a schema
    describes."""
    parsed = parse_schema_or_template(value, what)
    if is_json_schema(parsed):
        body = json.dumps(schema_to_template(parsed), ensure_ascii=False, indent=4)
    else:
        body = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=4)
    return f"{EXTRACTION_PREFIX}\n{body}"
