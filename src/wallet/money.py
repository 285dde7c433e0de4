"""Amounts: exact decimals in, integer cents inside, exact decimals out.

Request bodies are parsed with `parse_json`, which turns every JSON number with a fraction or
exponent into a `Decimal`, so `0.1` is never a binary float on the way in.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

from wallet.errors import BadRequest

MAX_CENTS = 999_999_999_999_999  # 9,999,999,999,999.99
MAX_AMOUNT = Decimal(MAX_CENTS) / 100


def _no_constants(name: str) -> Any:
    raise BadRequest(f"{name} is not a valid JSON number", code="INVALID_JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise BadRequest(f"duplicate key {key!r} in JSON body", code="INVALID_JSON")
        obj[key] = value
    return obj


def parse_json(raw: bytes) -> Any:
    """Strict JSON: exact decimals, no NaN/Infinity, no duplicate keys."""
    try:
        text = raw.decode("utf-8")
        return json.loads(
            text,
            parse_float=Decimal,
            parse_constant=_no_constants,
            object_pairs_hook=_unique_keys,
        )
    except BadRequest:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest("request body is not valid JSON", code="INVALID_JSON") from exc


def to_cents(value: object) -> int:
    """A JSON number > 0 with at most 2 decimals and at most MAX_AMOUNT, as integer cents."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ValueError("amount must be a JSON number")
    try:
        amount = Decimal(value)
        if not amount.is_finite():
            raise ValueError("amount must be a finite number")
        if amount <= 0:
            raise ValueError("amount must be greater than 0")
        if amount > MAX_AMOUNT:
            raise ValueError(f"amount must be at most {MAX_AMOUNT}")
        cents = amount * 100
        if cents != cents.to_integral_value():
            raise ValueError("amount must have at most 2 decimal places")
    except InvalidOperation as exc:
        raise ValueError("amount is not a valid number") from exc
    return int(cents)


def from_cents(cents: int) -> int | float:
    """Cents as a JSON number: whole amounts as integers (`250`), others exactly (`1000.5`).
    Every value up to MAX_CENTS has at most 15 significant digits, so the nearest double prints
    back as the same decimal, never as 1000.4999..."""
    whole, fraction = divmod(cents, 100)
    return whole if fraction == 0 else cents / 100


Amount = Annotated[
    int,
    BeforeValidator(to_cents),
    WithJsonSchema(
        {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": float(MAX_AMOUNT),
            "multipleOf": 0.01,
            "description": "Amount in currency units, at most 2 decimal places.",
            "examples": [1000.5],
        }
    ),
]
