"""JSON Schema checking for the `json_schema` grader, and JSON extraction from answers.

`validate(instance, schema)` returns a list of error strings (empty = valid). It uses
the `jsonschema` package when it is installed; otherwise `mini_validate`, a small
validator of `type`, `properties`, `required`, `enum`, `items` and
`additionalProperties` (false or a schema), which is enough for the built-in suites.

`extract_json(text)` finds the answer's JSON: a ```json fenced block, else the whole
text, else the first balanced {...} object in it.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any

logger = logging.getLogger(__name__)

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)


def _type_ok(value: Any, t: str) -> bool:
    if t == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    py = _TYPES.get(t)
    return py is not None and isinstance(value, py) and not (py is not bool and isinstance(value, bool))


def mini_validate(value: Any, schema: dict, path: str = "$") -> list[str]:
    """Errors of `value` against the supported subset of JSON Schema."""
    errors: list[str] = []
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        if not any(_type_ok(value, x) for x in types):
            return [f"{path}: expected {'/'.join(types)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not one of {schema['enum']!r}")
    if isinstance(value, dict):
        errors += _object_errors(value, schema, path)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            errors += mini_validate(v, schema["items"], f"{path}[{i}]")
    return errors


def _object_errors(value: dict, schema: dict, path: str) -> list[str]:
    props = schema.get("properties", {})
    errors = [f"{path}: missing required key {k!r}" for k in schema.get("required", []) if k not in value]
    extra = schema.get("additionalProperties", True)
    for k, v in value.items():
        if k in props:
            errors += mini_validate(v, props[k], f"{path}.{k}")
        elif extra is False:
            errors.append(f"{path}: unexpected key {k!r}")
        elif isinstance(extra, dict):
            errors += mini_validate(v, extra, f"{path}.{k}")
    return errors


def schema_problem(schema: Any) -> str | None:
    """Why `schema` cannot be used (None when it can); checked when a dataset is parsed."""
    if not isinstance(schema, dict):
        return "not an object"
    try:
        import jsonschema
    except ImportError:
        return None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as err:
        return err.message
    return None


def validate(value: Any, schema: dict) -> list[str]:
    try:
        import jsonschema
    except ImportError:
        return mini_validate(value, schema)
    try:
        validator = jsonschema.validators.validator_for(schema)(schema)
        return [f"$.{'.'.join(map(str, e.absolute_path))}: {e.message}".replace("$.:", "$:")
                for e in validator.iter_errors(value)]
    except Exception as err:  # noqa: BLE001 - a broken schema grades wrong, never crashes a run
        return [f"invalid schema: {err}"]


def _first_object(text: str) -> str | None:
    """The first balanced {...} in text (braces inside strings respected)."""
    start = text.find("{")
    while start >= 0:
        depth, in_str, esc = 0, False, False
        for i in range(start, len(text)):
            ch = text[i]
            if in_str:
                esc, in_str = (False, in_str) if esc else (ch == "\\", ch != '"')
                continue
            if ch == '"':
                in_str = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i + 1]
        start = text.find("{", start + 1)
    return None


def extract_json(text: str) -> tuple[Any, str | None]:
    """(parsed value, None) or (None, why not)."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    obj = _first_object(text)
    if obj is not None:
        candidates.append(obj)
    for c in candidates:
        try:
            return json.loads(c.strip()), None
        except (json.JSONDecodeError, ValueError):
            continue
    return None, "no parseable JSON in the answer"
