"""A msgspec decoder derived from a pydantic model: the ingest path's first pass over a body.

pydantic stays the contract. Its model is the schema the API documents, the one whose errors
name the field in a 422, whose lax rules accept a "3" or a 3.0 for an int, and the one every
reader validates a stored body with. But validating an Alertmanager webhook with it was the
largest single cost of a webhook in the API (bench/RESULTS.md); msgspec decodes the same body
in a third of the time. So the decoder goes first, and pydantic decides whatever it refuses:
it accepts the body after all (a lax form) or answers the error.

That is only sound if the decoder accepts nothing the model refuses, and reads every field as
the model does. Hence it is derived from the model field by field, from a vocabulary where
msgspec is as strict or stricter: str, int, bool, a Literal of strings, dict[str, str], a list
of such a model, with length and bound constraints. Anything else raises at import (a pattern:
Python's `$` also matches before a final newline, pydantic's does not; a validator; an alias;
a config that transforms values), so a schema change cannot make the two disagree quietly.
And it refuses any field the model does not declare, even where the model allows extras:
msgspec skips such a field with fewer checks than pydantic makes (invalid UTF-8, an integer of
thousands of digits, nesting past pydantic's depth limit all pass), so a body pydantic refuses
would be stored, and then break every reader of its transaction. Alertmanager sends no field
beyond the model's, so its webhooks still take the fast path.
tests/unit/test_first_pass.py walks a table of bodies through both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
import msgspec
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

# Raises ValueError for a body it does not accept, RecursionError for one nested too deep.
Decode = Callable[[bytes], Any]

_BOUNDS: dict[type, str] = {annotated_types.MinLen: "min_length", annotated_types.MaxLen: "max_length",
                            annotated_types.Ge: "ge", annotated_types.Gt: "gt",
                            annotated_types.Le: "le", annotated_types.Lt: "lt"}
# Model config that does not change what validates or the values read (`extra` does not matter:
# the decoder refuses every undeclared field).
_HARMLESS_CONFIG = {"extra", "title", "json_schema_extra"}


def first_pass(model: type[BaseModel]) -> Decode:
    """A decoder accepting a subset of what `model.model_validate_json` accepts, each field read
    as the model reads it; TypeError if the model uses something it cannot derive faithfully."""
    return msgspec.json.Decoder(_struct(model)).decode


def _struct(model: type[BaseModel]) -> type[msgspec.Struct]:
    decorators = model.__pydantic_decorators__
    if (decorators.validators or decorators.field_validators or decorators.root_validators
            or decorators.model_validators):
        raise TypeError(f"{model.__name__}: a validator cannot be derived")
    config = set(model.model_config) - _HARMLESS_CONFIG
    if config:
        raise TypeError(f"{model.__name__}: model config {sorted(config)} cannot be derived")
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for name, info in model.model_fields.items():
        where = f"{model.__name__}.{name}"
        if info.alias not in (None, name) or info.validation_alias is not None:
            raise TypeError(f"{where}: an alias cannot be derived")
        kind = _constrained(where, _plain(where, info.annotation), info.metadata)
        if info.default_factory is not None:
            fields.append((name, kind, msgspec.field(default_factory=info.default_factory)))  # type: ignore[arg-type]
        elif info.default is PydanticUndefined:
            fields.append((name, kind))
        else:
            fields.append((name, kind, info.default))
    return msgspec.defstruct(model.__name__, fields, kw_only=True, forbid_unknown_fields=True)


def _plain(where: str, annotation: Any) -> Any:
    if annotation in (str, int, bool):
        return annotation
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal and all(isinstance(arg, str) for arg in args):
        return annotation
    if origin is dict and args == (str, str):
        return annotation
    if origin is list and len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return list[_struct(args[0])]  # type: ignore[misc]
    raise TypeError(f"{where}: type {annotation!r} cannot be derived")


def _constrained(where: str, kind: Any, metadata: list[Any]) -> Any:
    bounds: dict[str, Any] = {}
    for constraint in metadata:
        name = _BOUNDS.get(type(constraint))
        if name is None:
            raise TypeError(f"{where}: constraint {constraint!r} cannot be derived")
        bounds[name] = getattr(constraint, name)
    return Annotated[kind, msgspec.Meta(**bounds)] if bounds else kind
