"""A pydantic field's type, constraints and default written for people: `int, > 0`, `one of: cosine, linear`,
`list of strings, or null`."""

from __future__ import annotations

import json
import types
import typing

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tunesmith.paths import Expect

NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
PLURALS = {"path": "paths", "string": "strings", "integer": "integers", "number": "numbers", "boolean": "booleans"}
BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", "≥"), (annotated_types.Lt, "lt", "<"),
          (annotated_types.Le, "le", "≤"))


def type_text(annotation, expect: Expect | None = None) -> str:
    """`str | list[str] | None` -> 'string or list of strings, or null'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0], expect) + _bounds(args[1:])
    if origin is typing.Literal:
        return "one of: " + ", ".join(f"`{_value(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        text = " or ".join(type_text(a, expect) for a in present)
        return text + (", or null" if len(present) < len(args) else "")
    if origin is list:
        inner = type_text(args[0], expect)
        return f"list of {PLURALS.get(inner, inner)}"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    if expect is not None and annotation is str:
        return "path"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds(metadata) -> str:
    """', > 0, < 1' from pydantic's constraints (Gt, Ge, ..., MinLen)."""
    parts = []
    for item in metadata:
        for kind, attribute, sign in BOUNDS:
            if isinstance(item, kind):
                parts.append(f"{sign} {getattr(item, attribute):g}")
        if isinstance(item, annotated_types.MinLen) and item.min_length:
            parts.append(f"at least {item.min_length} character{'s' * (item.min_length > 1)}")
        if hasattr(item, "metadata"):  # pydantic's FieldInfo-shaped constraint groups
            parts.append(_bounds(item.metadata).removeprefix(", "))
    return "".join(f", {p}" for p in parts if p)


def field_type(field: FieldInfo) -> str:
    expect = next((m for m in field.metadata if isinstance(m, Expect)), None)
    text, bounds = type_text(field.annotation, expect), _bounds(field.metadata)
    if text.endswith(", or null"):
        return text.removesuffix(", or null") + bounds + ", or null"
    return text + bounds


def _value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, BaseModel):
        return "its defaults"
    return json.dumps(value, ensure_ascii=False)


def default_text(field: FieldInfo) -> str:
    """The field's default as YAML would read it; 'required' where it has none."""
    if field.default_factory is not None:
        value = field.default_factory()
        return "the section's defaults" if isinstance(value, BaseModel) else f"`{_value(value)}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{_value(field.default)}`"
