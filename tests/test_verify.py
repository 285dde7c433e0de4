"""Tamper evidence (SPEC §6): whoever edits the ledger behind the trigger's back is named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.builders import Api, Provider, start_service
from wallet.database import plain_url


async def make_ledger(api: Api, provider: Provider) -> None:
    await api.credit("A", 100, description="opening")
    await api.order("A", 10)
    await api.debit("A", 5, description="fee")
    await api.credit("B", 50)
    await api.order("B", 20)


async def tamper(database_url: str, *statements: str) -> None:
    """Edit as an attacker would: with the append-only trigger disabled, then restored."""
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        async with conn.transaction():
            await conn.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_no_update_delete")
            for statement in statements:
                await conn.execute(statement)
            await conn.execute("ALTER TABLE ledger_entries ENABLE TRIGGER ledger_no_update_delete")
    finally:
        await conn.close()


def run_verify(database_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wallet.cli", "verify"],
        env={**os.environ, "DATABASE_URL": database_url},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_clean_ledger_verifies(database_url: str, provider: Provider, tmp_path: Path) -> None:
    async with start_service(database_url, provider.url) as api:
        await make_ledger(api, provider)
        verdict = (await api.http.get("/admin/ledger/verify", headers=api.admin_headers)).json()
        assert verdict["data"] == {"ok": True, "wallets": 2, "entries": 5, "faults": []}
    result = run_verify(database_url, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "wallet verify: OK: 2 wallets, 5 entries"


TAMPERING = {
    "edited description": (
        ["UPDATE ledger_entries SET description = 'nothing to see' WHERE client_id = 'A' AND entry_no = 1"],
        ("A", 1, "hash mismatch"),
    ),
    "edited amount (kept consistent with its balances)": (
        [
            "UPDATE ledger_entries SET amount = 100, balance_after = 8900"
            " WHERE client_id = 'A' AND entry_no = 3"
        ],
        ("A", 3, "hash mismatch"),
    ),
    "deleted entry": (
        ["DELETE FROM ledger_entries WHERE client_id = 'A' AND entry_no = 2"],
        ("A", 3, "entries were removed"),
    ),
    "reordered entries": (
        [
            "UPDATE ledger_entries SET entry_no = entry_no + 1000"
            " WHERE client_id = 'A' AND entry_no IN (2, 3)",
            "UPDATE ledger_entries SET entry_no = CASE entry_no WHEN 1002 THEN 3 ELSE 2 END"
            " WHERE client_id = 'A' AND entry_no > 1000",
        ],
        ("A", 2, "balance before"),
    ),
    "balances rewritten along the chain": (
        [
            "UPDATE ledger_entries SET balance_before = balance_before + 100,"
            " balance_after = balance_after + 100 WHERE client_id = 'B' AND entry_no = 2"
        ],
        ("B", 2, "balance before"),
    ),
}


@pytest.mark.parametrize(("statements", "expected"), TAMPERING.values(), ids=TAMPERING.keys())
async def test_tampering_is_named(
    database_url: str,
    provider: Provider,
    tmp_path: Path,
    statements: list[str],
    expected: tuple[str, int, str],
) -> None:
    client_id, entry_no, reason = expected
    async with start_service(database_url, provider.url) as api:
        await make_ledger(api, provider)
        await tamper(database_url, *statements)
        verdict = (await api.http.get("/admin/ledger/verify", headers=api.admin_headers)).json()["data"]
    assert verdict["ok"] is False
    assert len(verdict["faults"]) == 1
    fault = verdict["faults"][0]
    assert (fault["clientId"], fault["entryNo"]) == (client_id, entry_no)
    assert reason in fault["reason"]
    result = run_verify(database_url, tmp_path)
    assert result.returncode == 1
    assert "FAILED" in result.stdout
    assert f"{client_id} entry {entry_no} " in result.stdout


async def test_wallet_balance_edit_is_named(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await make_ledger(api, provider)
        conn = await asyncpg.connect(plain_url(database_url))
        try:
            await conn.execute("UPDATE wallets SET balance = balance + 100000 WHERE client_id = 'B'")
        finally:
            await conn.close()
        faults = (await api.http.get("/admin/ledger/verify", headers=api.admin_headers)).json()["data"][
            "faults"
        ]
    assert len(faults) == 1
    assert faults[0]["clientId"] == "B"
    assert "ledger adds up to 3000" in faults[0]["reason"]


async def test_disabled_trigger_is_reported(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await make_ledger(api, provider)
        conn = await asyncpg.connect(plain_url(database_url))
        try:
            await conn.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_no_update_delete")
        finally:
            await conn.close()
        faults = (await api.http.get("/admin/ledger/verify", headers=api.admin_headers)).json()["data"][
            "faults"
        ]
    assert [f["reason"] for f in faults] == [
        "append-only trigger ledger_no_update_delete is missing or disabled"
    ]
