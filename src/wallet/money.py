"""Amounts: exact decimals in, integer cents inside, exact decimals out.

Request bodies are parsed with `parse_json`, which keeps every JSON number as the exact value
of its literal (an `int`, or a `Decimal` built from the text, which never rounds), after
refusing literals too long or with an exponent too large to be a plausible amount. `to_cents`
then works on the literal's digits and exponent with integer arithmetic: no Decimal context
(28 digits, bounded exponents) ever rounds, overflows or underflows an amount.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

from wallet.errors import BadRequest

MAX_CENTS = 999_999_999_999_999  # 9,999,999,999,999.99
MAX_AMOUNT = Decimal(MAX_CENTS) / 100
# Any valid amount can be written in far fewer characters and with a far smaller exponent; a
# literal past these bounds is refused before it is evaluated (`1e999999999` would otherwise
# cost a Decimal overflow, and a 5,000-digit integer a quadratic conversion).
MAX_NUMBER_CHARS = 64
MAX_EXPONENT = 64
_EXPONENT = re.compile(r"[eE]([-+]?[0-9]+)$")
# A UTF-16 surrogate code point: JSON decodes a valid escaped pair into one character, so any
# left in a string came from a lone `\ud800`-style escape and cannot be encoded as UTF-8 (the
# database, the logs and our own JSON encoder would all fail on it).
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constants(name: str) -> Any:
    raise BadRequest(f"{name} is not a valid JSON number", code="INVALID_JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise BadRequest(f"duplicate key {key!r} in JSON body", code="INVALID_JSON")
        obj[key] = value
    return obj


def _number(literal: str) -> int | Decimal:
    """A JSON number literal (already checked against the JSON grammar) as its exact value."""
    if len(literal) > MAX_NUMBER_CHARS:
        raise BadRequest(
            f"a JSON number in the body has more than {MAX_NUMBER_CHARS} characters", code="INVALID_NUMBER"
        )
    exponent = _EXPONENT.search(literal)
    if exponent is not None and abs(int(exponent.group(1))) > MAX_EXPONENT:
        raise BadRequest(
            f"a JSON number in the body has an exponent beyond ±{MAX_EXPONENT}", code="INVALID_NUMBER"
        )
    if exponent is None and "." not in literal:
        return int(literal)
    return Decimal(literal)


def _check_strings(value: Any) -> None:
    """Every string and key must be encodable as UTF-8 (see `_SURROGATE`)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise BadRequest(
                    "request body has a string with a lone UTF-16 surrogate escape (\\ud800-\\udfff)",
                    code="INVALID_JSON",
                )
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_json(raw: bytes) -> Any:
    """Strict JSON: exact numbers within bounds, no NaN/Infinity, no duplicate keys, valid
    Unicode. Anything else is a 400, never an exception that escapes as a 500."""
    try:
        text = raw.decode("utf-8")
        parsed = json.loads(
            text,
            parse_int=_number,
            parse_float=_number,
            parse_constant=_no_constants,
            object_pairs_hook=_unique_keys,
        )
    except BadRequest:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest("request body is not valid JSON", code="INVALID_JSON") from exc
    _check_strings(parsed)
    return parsed


def to_cents(value: object) -> int:
    """A JSON number > 0 with at most 2 decimals and at most MAX_AMOUNT, as integer cents.

    Exact for any int or Decimal: the digits and exponent are read as they are, and the only
    arithmetic is on integers of at most 15 digits (`1.00000000000000000000000000001` is refused
    for its decimals, not rounded to 1 by a 28-digit context)."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ValueError("amount must be a JSON number")
    sign, digits, exponent = Decimal(value).as_tuple()  # exact: construction never rounds
    if not isinstance(exponent, int):
        raise ValueError("amount must be a finite number")
    significant = "".join(map(str, digits)).rstrip("0")
    exponent += len(digits) - len(significant)  # 1.500 is 15e-1
    if sign or not significant:
        raise ValueError("amount must be greater than 0")
    if len(significant) + exponent > 13:  # the value is at least 10^13
        raise ValueError(f"amount must be at most {MAX_AMOUNT}")
    if exponent < -2:
        raise ValueError("amount must have at most 2 decimal places")
    cents: int = int(significant) * 10 ** (exponent + 2)  # exponent + 2 >= 0 here
    if cents > MAX_CENTS:  # below 10^13 but above the cap (none exist with 2 decimals today)
        raise ValueError(f"amount must be at most {MAX_AMOUNT}")
    return cents


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
