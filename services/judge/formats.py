"""Format compliance: a structured answer must be JSON following the request's schema.

The validator covers the JSON-schema keywords structured-output servers enforce (type,
properties, required, additionalProperties, items, enum, const, length and range bounds,
anyOf/oneOf/allOf); other keywords are not checked.  No jsonschema package ships here.
"""

from __future__ import annotations

import json
from typing import Any

from stratamesh.events import Query

__all__ = ["check_format", "violations"]

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _is(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(name, (object,)))


def violations(value: Any, schema: Any, path: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (empty: it conforms)."""
    if not isinstance(schema, dict):
        return []
    out: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_is(value, k) for k in kinds):
            return [f"{path}: expected {'/'.join(kinds)}"]
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        out.append(f"{path}: must be {schema['const']!r}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out += [f"{path}.{k}: missing" for k in schema.get("required", []) if k not in value]
        for key, item in value.items():
            if key in props:
                out += violations(item, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                out.append(f"{path}.{key}: not allowed")
    if isinstance(value, list):
        for i, item in enumerate(value):
            out += violations(item, schema.get("items"), f"{path}[{i}]")
        if len(value) < schema.get("minItems", 0):
            out.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            out.append(f"{path}: more than {schema['maxItems']} items")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            out.append(f"{path}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            out.append(f"{path}: longer than {schema['maxLength']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{path}: below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{path}: above {schema['maximum']}")
    for key in ("allOf",):
        for sub in schema.get(key, []):
            out += violations(value, sub, path)
    for key in ("anyOf", "oneOf"):
        subs = schema.get(key)
        if subs and all(violations(value, sub, path) for sub in subs):
            out.append(f"{path}: matches none of {key}")
    return out


def check_format(query: Query, answer: str, structured: str | None) -> tuple[bool, list[str]]:
    """(ok, problems) — ok when no JSON was asked for, or the JSON follows the schema."""
    if not query.response_format:
        return True, []
    try:
        schema = json.loads(query.response_format)
    except json.JSONDecodeError:
        return True, []  # infer ignored a response_format that is not JSON: nothing to hold to
    if not isinstance(schema, dict):
        return True, []
    text = structured if structured is not None else answer
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return False, [f"the answer is not JSON ({exc.msg})"]
    problems = violations(value, schema)
    return not problems, problems
