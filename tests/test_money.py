"""Amounts in and out exactly: no binary floating point between the JSON text and the cents."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wallet.errors import BadRequest
from wallet.money import MAX_CENTS, from_cents, parse_json, to_cents


@given(st.integers(min_value=1, max_value=MAX_CENTS))
def test_any_amount_round_trips_through_json_exactly(cents: int) -> None:
    text = str(Decimal(cents) / 100)  # what a client writes, e.g. "1000.50"
    parsed = parse_json(f'{{"amount": {text}}}'.encode())["amount"]
    assert to_cents(parsed) == cents
    printed = orjson.dumps(from_cents(cents)).decode()  # what we answer
    assert Decimal(printed) == Decimal(cents) / 100


@pytest.mark.parametrize(
    ("text", "cents"),
    [
        ("0.01", 1),
        ("1000.5", 100050),
        ("1000.50", 100050),
        ("1e2", 10000),
        ("250", 25000),
        ("9999999999999.99", MAX_CENTS),
        ("0.1", 10),
        ("1.10", 110),
    ],
)
def test_valid_amounts(text: str, cents: int) -> None:
    assert to_cents(parse_json(text.encode())) == cents


@pytest.mark.parametrize(
    "value",
    [
        0,
        -1,
        Decimal("0.001"),
        Decimal("1.005"),
        Decimal("1e20"),
        Decimal("10000000000000"),
        "10",
        None,
        True,
        False,
        1.5,
        [1],
        {"a": 1},
        Decimal("NaN"),
    ],
)
def test_invalid_amounts(value: object) -> None:
    with pytest.raises(ValueError, match="amount"):
        to_cents(value)


def test_printing_is_exact() -> None:
    assert orjson.dumps([from_cents(30), from_cents(100050), from_cents(1), from_cents(MAX_CENTS)]) == (
        b"[0.3,1000.5,0.01,9999999999999.99]"
    )
    assert from_cents(25000) == 250
    assert isinstance(from_cents(25000), int)


@pytest.mark.parametrize(
    "raw", [b'{"a": NaN}', b'{"a": Infinity}', b'{"a": 1, "a": 2}', b"{", b"\xff", b"[" * 50_000]
)
def test_strict_json(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_json(raw)
