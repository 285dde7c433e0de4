"""Amounts in and out exactly: no binary floating point, and no rounding of any kind, between the
JSON text and the cents."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from decimal import Decimal
from fractions import Fraction

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.builders import ADMIN_KEY, Provider, spell_amount, start_service
from wallet.errors import BadRequest
from wallet.money import MAX_CENTS, MAX_EXPONENT, MAX_NUMBER_CHARS, from_cents, parse_json, to_cents


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
        ("1e1", 1000),
        ("10.00", 1000),
        ("1.0E1", 1000),
        ("100e-1", 1000),
        ("0.001e3", 100),
        ("100e-2", 100),
        ("1e-2", 1),
        ("1E+2", 10000),
        ("10.000", 1000),  # two decimals after exact evaluation: 10
        ("12.340000000000000000000000000000000", 1234),  # 35 significant digits, all exact
        ("1234567890123.450000000000000000000000", 123456789012345),
        ("0.00000000000000000000000000000000001e35", 100),
        ("99999999999999900000000000000000000e-22", MAX_CENTS),
    ],
)
def test_valid_amounts(text: str, cents: int) -> None:
    assert to_cents(parse_json(text.encode())) == cents


@pytest.mark.parametrize(
    "text",
    [
        "1.005",
        "0.001",
        "1e-3",
        # 31 significant digits: a 28-digit Decimal context rounds this to 1.00 (100 cents).
        "1.000000000000000000000000000001",
        "1.00000000000000000000000000000000000000000000000000000000000001",
        "9999999999999.999999999999999999999",  # rounds to the cap + 0.01 in 28 digits
        "10000000000000",
        "1e13",
        "1E+20",
        "0.0000000000000000000000000000001",  # positive, but 0 cents once rounded
        "0",
        "-0",
        "-0.0",
        "0e5",
        "-5",
        "-0.01",
    ],
)
def test_invalid_amounts_are_refused_never_rounded(text: str) -> None:
    with pytest.raises(ValueError, match="amount"):
        to_cents(parse_json(text.encode()))


@pytest.mark.parametrize(
    "value",
    [
        0,
        -1,
        Decimal("0.001"),
        Decimal("1.005"),
        Decimal("1e20"),
        Decimal("1e999999999"),
        Decimal("1e-999999999"),
        Decimal("10000000000000"),
        10**4000,
        "10",
        None,
        True,
        False,
        1.5,
        [1],
        {"a": 1},
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
    ],
)
def test_invalid_amounts(value: object) -> None:
    with pytest.raises(ValueError, match="amount"):
        to_cents(value)


@pytest.mark.parametrize(
    "number",
    [
        "1e999999999",
        "1e-999999999",
        "1E+100000000000000000000",
        "-1e65",
        "1e-65",
        "1" * (MAX_NUMBER_CHARS + 1),
        "9" * 5000,
        "0." + "0" * MAX_NUMBER_CHARS + "1",
    ],
)
@pytest.mark.parametrize(
    "template",
    ['{{"amount": {}}}', '{{"description": {}}}', '{{"unknown": [1, {{"x": {}}}]}}', "[{}]", "{}"],
)
def test_implausible_numbers_are_refused_before_evaluation_anywhere(template: str, number: str) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_json(template.format(number).encode())
    assert refused.value.status == 400
    assert refused.value.error_code == "INVALID_NUMBER"


def test_number_bounds_are_inclusive() -> None:
    longest = "1." + "0" * (MAX_NUMBER_CHARS - 2)
    assert to_cents(parse_json(longest.encode())) == 100
    # At the exponent bound the parser still evaluates; the amount rules refuse the value.
    with pytest.raises(ValueError, match="decimal places"):
        to_cents(parse_json(f"1e-{MAX_EXPONENT}".encode()))
    with pytest.raises(ValueError, match="at most"):
        to_cents(parse_json(f"1e+{MAX_EXPONENT}".encode()))


@pytest.mark.parametrize(
    "raw",
    [
        rb'{"name": "\ud800"}',
        rb'{"name": "a\udfffb"}',
        rb'{"description": "\ude00\ud83d"}',  # a pair in the wrong order is two lone halves
        rb'{"\ud800": 1}',
        rb'{"x": [["\udbff"]]}',
        rb'"\ud800"',
    ],
)
def test_lone_surrogates_are_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_json(raw)
    assert refused.value.error_code == "INVALID_JSON"


def test_escaped_surrogate_pairs_are_characters() -> None:
    assert parse_json(rb'{"name": "\ud83d\ude00"}') == {"name": "\N{GRINNING FACE}"}


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


# --- Against the real service: any literal is stored exactly, or refused with 400. ---

_EXPONENT = re.compile(r"[eE]([-+]?[0-9]+)$")


SPELLED = st.builds(
    spell_amount,
    st.integers(min_value=1, max_value=MAX_CENTS),
    st.integers(min_value=0, max_value=40),
    st.integers(min_value=-40, max_value=20),
)
RAW_LITERALS = st.builds(
    lambda sign, whole, fraction, exponent: sign + whole + fraction + exponent,
    st.sampled_from(["", "-"]),
    st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,40}", fullmatch=True)),
    st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,40}", fullmatch=True)),
    st.one_of(
        st.just(""),
        st.builds(
            lambda e, s, n: f"{e}{s}{n}",
            st.sampled_from("eE"),
            st.sampled_from(["", "+", "-"]),
            st.one_of(st.integers(0, 80), st.integers(0, 10**20)),
        ),
    ),
)


def expected_cents(literal: str) -> int | None:
    """The cents `literal` is worth if it is a valid amount (evaluated exactly), else None."""
    exponent = _EXPONENT.search(literal)
    if len(literal) > MAX_NUMBER_CHARS or (exponent and abs(int(exponent.group(1))) > MAX_EXPONENT):
        return None
    value = Fraction(literal) * 100
    if value.denominator != 1 or not 0 < value <= MAX_CENTS:
        return None
    return int(value)


async def test_any_literal_is_stored_exactly_or_refused(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        base = str(api.http.base_url)
        admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}

        def run() -> None:
            with httpx.Client(base_url=base, timeout=30) as http:

                @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
                @given(literal=st.one_of(SPELLED, RAW_LITERALS))
                def credit_exactly_or_refuse(literal: str) -> None:
                    client = f"p{uuid.uuid4().hex[:12]}"
                    body = f'{{"client_id": "{client}", "amount": {literal}}}'.encode()
                    response = http.post("/admin/wallet/credit", content=body, headers=admin)
                    balance = http.get("/wallet/balance", headers={"client-id": client})
                    cents = expected_cents(literal)
                    if cents is None:
                        assert response.status_code == 400, (literal, response.text)
                        assert response.json()["success"] is False
                        assert balance.status_code == 404  # nothing was created
                        return
                    assert response.status_code == 200, (literal, response.text)
                    exact = json.loads(balance.text, parse_float=Decimal)["data"]["balance"]
                    assert exact * 100 == cents, literal
                    ledger = http.get(f"/admin/clients/{client}/ledger", headers=admin)
                    entries = json.loads(ledger.text, parse_float=Decimal)["data"]
                    assert [e["amount"] * 100 for e in entries] == [cents]

                credit_exactly_or_refuse()

        await asyncio.to_thread(run)
