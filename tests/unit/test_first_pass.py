"""The ingest path's first-pass decoder accepts nothing its pydantic model refuses, and reads
every field as the model does; what it cannot derive faithfully, it refuses to derive."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from notifier.api.first_pass import first_pass
from notifier.schemas import AlertmanagerWebhook, EventIn

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
WELL_FORMED = sorted(FIXTURES.glob("alertmanager-*.json"))
DECODE = first_pass(AlertmanagerWebhook)


def _firing() -> str:
    return (FIXTURES / "alertmanager-firing.json").read_text()


def _with(**fields: Any) -> bytes:
    body = json.loads(_firing())
    body.update(fields)
    return json.dumps(body).encode()


def _alert_with(**fields: Any) -> bytes:
    body = json.loads(_firing())
    body["alerts"][0].update(fields)
    return json.dumps(body).encode()


def _replace(old: str, new: str) -> bytes:
    text = _firing()
    assert old in text
    return text.replace(old, new, 1).encode()


# Bodies at the edges of what either side accepts: malformed JSON, the forms pydantic's lax
# rules accept, duplicate keys, escapes, missing, null and extra fields, bounds.
EDGES: dict[str, bytes] = {
    "empty": b"",
    "whitespace around": b" \n" + _firing().encode() + b"\n ",
    "trailing data": _firing().encode() + b"x",
    "truncated": _firing().encode()[:-5],
    "byte order mark": b"\xef\xbb\xbf" + _firing().encode(),
    "invalid utf-8": _replace('"receiver":"', '"receiver":"\xff').replace(b"\xc3\xbf", b"\xff"),
    "lone surrogate escape": _replace('"receiver":"', '"receiver":"\\ud800'),
    "surrogate pair escape": _replace('"receiver":"', '"receiver":"\\ud83d\\ude00'),
    "raw control character": _replace('"receiver":"', '"receiver":"\x01'),
    "escaped NUL": _replace('"receiver":"', '"receiver":"\\u0000'),
    "escaped key": _replace('"receiver"', '"rec\\u0065iver"'),
    "duplicate key, last valid": _replace('"status":"firing"', '"status":"bogus","status":"firing"'),
    "duplicate key, last invalid": _replace('"status":"firing"', '"status":"firing","status":"bogus"'),
    "duplicate label": _replace('"labels":{', '"labels":{"alertname":"first", '),
    "a JSON array": b"[1, 2]",
    "null": b"null",
    "version as a number": _with(version=4),
    "truncatedAlerts as a float": _with(truncatedAlerts=2.0),
    "truncatedAlerts as a string": _with(truncatedAlerts="2"),
    "truncatedAlerts in exponent form": _replace('"truncatedAlerts":0', '"truncatedAlerts":1e1'),
    "truncatedAlerts as a bool": _with(truncatedAlerts=True),
    "truncatedAlerts negative": _with(truncatedAlerts=-1),
    "truncatedAlerts huge": _replace('"truncatedAlerts":0', '"truncatedAlerts":' + "9" * 30),
    "unknown status": _with(status="pending"),
    "status in other case": _with(status="Firing"),
    "no groupKey": json.dumps({k: v for k, v in json.loads(_firing()).items() if k != "groupKey"}).encode(),
    "null defaulted field": _with(externalURL=None),
    "null labels": _alert_with(labels=None),
    "label value a number": _alert_with(labels={"alertname": 1}),
    "no alerts": _with(alerts=[]),
    "too many alerts": _with(alerts=[json.loads(_firing())["alerts"][0]] * 5001),
    "alerts not a list": _with(alerts={"status":"firing"}),
    "extra fields, nested": _with(extra={"deep": [1, {"x": None}]}),
    "extra alert field": _alert_with(silenced=True),
    "deeply nested extra field": _replace('{"receiver"', '{"x":' + "[" * 5000 + "]" * 5000 + ',"receiver"'),
    # What msgspec lets through when it skips a field pydantic checks (found in review):
    "extra field, invalid utf-8": b'{"x":"\xff",' + _firing().encode()[1:],
    "extra field, 4301-digit integer": b'{"x":1' + b"0" * 4300 + b"," + _firing().encode()[1:],
    "extra field, 300 deep": b'{"x":' + b"[" * 300 + b"]" * 300 + b"," + _firing().encode()[1:],
    "extra alert field, 250 deep": _replace('"status":"firing","labels"',
                                            '"status":"firing","x":' + "[" * 250 + "]" * 250 + ',"labels"'),
    "truncatedAlerts past 64 bits": _replace('"truncatedAlerts":0', '"truncatedAlerts":18446744073709551616'),
}


def _declared(value: Any) -> Any:
    """A model's declared fields (not its extras), as plain data."""
    if isinstance(value, BaseModel):
        return {name: _declared(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, list):
        return [_declared(item) for item in value]
    return value


@pytest.mark.parametrize("body", [path.read_bytes() for path in WELL_FORMED],
                         ids=[path.name for path in WELL_FORMED])
def test_a_well_formed_webhook_is_decoded_by_the_first_pass_as_the_model_reads_it(body: bytes) -> None:
    assert msgspec.to_builtins(DECODE(body)) == _declared(AlertmanagerWebhook.model_validate_json(body))


@pytest.mark.parametrize("body", list(EDGES.values()), ids=list(EDGES))
def test_the_first_pass_accepts_only_what_the_model_accepts_and_reads_it_alike(body: bytes) -> None:
    try:
        decoded = DECODE(body)
    except (ValueError, RecursionError):
        return  # refused: the model decides, as the API does
    try:
        model = AlertmanagerWebhook.model_validate_json(body)
    except ValidationError as exc:
        pytest.fail(f"the first pass accepted a body the model refuses: {exc}")
    assert msgspec.to_builtins(decoded) == _declared(model)


def test_lax_forms_and_undeclared_fields_are_left_to_the_model() -> None:
    # The reason the model must still run after a refusal: these are valid webhooks to it.
    for name in ("truncatedAlerts as a float", "truncatedAlerts as a string",
                 "duplicate key, last valid", "extra fields, nested", "extra alert field"):
        with pytest.raises(ValueError):
            DECODE(EDGES[name])
        AlertmanagerWebhook.model_validate_json(EDGES[name])


class _Pattern(BaseModel):
    name: str = Field(pattern=r"^[a-z]+$")


class _Validated(BaseModel):
    name: str

    @field_validator("name")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


class _Aliased(BaseModel):
    name: str = Field(alias="Name")


class _Optional(BaseModel):
    name: str | None = None


class _Float(BaseModel):
    ratio: float


class _Stripping(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True)
    name: str


class _Nested(BaseModel):
    items: list[_Pattern]


class _Fine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["a", "b"]
    tags: dict[str, str] = Field(default_factory=dict, max_length=2)
    count: int = Field(default=0, ge=0)


@pytest.mark.parametrize(("model", "named"), [
    (_Pattern, "_Pattern.name"), (_Validated, "validator"), (_Aliased, "_Aliased.name"),
    (_Optional, "_Optional.name"), (_Float, "_Float.ratio"), (_Stripping, "str_strip_whitespace"),
    (_Nested, "_Pattern.name"), (EventIn, "EventIn.kind"),
])
def test_what_cannot_be_derived_faithfully_is_refused_at_once(model: type[BaseModel], named: str) -> None:
    with pytest.raises(TypeError, match=named):
        first_pass(model)


def test_a_derived_decoder_keeps_the_models_constraints_and_forbidden_extras() -> None:
    decode = first_pass(_Fine)
    assert msgspec.to_builtins(decode(b'{"kind": "a"}')) == {"kind": "a", "tags": {}, "count": 0}
    for refused in (b'{"kind": "c"}', b'{"kind": "a", "count": -1}', b'{"kind": "a", "other": 1}',
                    b'{"kind": "a", "tags": {"x": "1", "y": "2", "z": "3"}}'):
        with pytest.raises(ValueError):
            decode(refused)
        with pytest.raises(ValidationError):
            _Fine.model_validate_json(refused)
