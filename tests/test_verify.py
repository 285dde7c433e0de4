"""Tamper evidence (SPEC §6): whoever edits the ledger behind the trigger's back is named, the
trigger's protection is tested by what it does, and a digest stored elsewhere pins history."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from tests.builders import LEDGER_KEY, Api, Provider, chain_hashes, start_service
from wallet import chain
from wallet.database import migrate_url, plain_url


async def make_ledger(api: Api, provider: Provider) -> None:
    """A: credit, completed order, debit. B: credit, completed order, failed (refunded) order."""
    await api.credit("A", 100, description="opening")
    assert (await api.order("A", 10)).status_code == 201
    await api.debit("A", 5, description="fee")
    await api.credit("B", 50)
    assert (await api.order("B", 20)).status_code == 201
    provider.set(error_status=400)
    assert (await api.order("B", 7)).status_code == 502
    provider.set()


async def tamper(database_url: str, *statements: str) -> None:
    """Edit as a superuser would: as a replica session, which fires no trigger (foreign keys
    included), then back to normal."""
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            for statement in statements:
                await conn.execute(statement)
    finally:
        await conn.close()


def run_verify(
    database_url: str, cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    keys = env if env is not None else {"LEDGER_KEY": LEDGER_KEY}
    return subprocess.run(
        [sys.executable, "-m", "wallet.cli", "verify", *args],
        env={**os.environ, "DATABASE_URL": database_url, **keys},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def http_verdict(api: Api) -> dict[str, Any]:
    response = await api.http.get("/admin/ledger/verify", headers=api.admin_headers)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def test_clean_ledger_verifies(database_url: str, provider: Provider, tmp_path: Path) -> None:
    async with start_service(database_url, provider.url) as api:
        await make_ledger(api, provider)
        assert await http_verdict(api) == {"ok": True, "wallets": 2, "entries": 7, "faults": []}
    result = run_verify(database_url, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "wallet verify: OK: 2 wallets, 7 entries"


# Each case tampers in exactly one way; (client, entry or None, words of the reason).
TAMPERING: dict[str, tuple[list[str], tuple[str, int | None, str]]] = {
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
    "type that does not fit the amounts": (
        [
            "ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_check",
            "UPDATE ledger_entries SET type = 'CREDIT' WHERE client_id = 'A' AND entry_no = 3",
        ],
        ("A", 3, "CREDIT of 500 cannot take 9000 to 8500"),
    ),
    "time moved back": (
        [
            "UPDATE ledger_entries SET created_at = created_at - interval '1 day'"
            " WHERE client_id = 'A' AND entry_no = 2"
        ],
        ("A", 2, "before the previous entry's"),
    ),
    "wallet balance edited": (
        ["UPDATE wallets SET balance = balance + 100000 WHERE client_id = 'B'"],
        ("B", None, "balance is 103000, the ledger adds up to 3000"),
    ),
    "wallet head moved": (
        ["UPDATE wallets SET head_hash = decode(repeat('11', 32), 'hex') WHERE client_id = 'A'"],
        ("A", None, "the wallet's entry count or head hash differs from its ledger"),
    ),
    "a wallet without its entries": (
        ["DELETE FROM ledger_entries WHERE client_id = 'B'"],
        ("B", None, "balance is 3000, the ledger adds up to 0"),
    ),
    "entries without their wallet": (
        ["DELETE FROM wallets WHERE client_id = 'A'"],
        ("A", None, "3 ledger entries without a wallet"),
    ),
    "order without its deduction": (
        [
            "INSERT INTO orders (order_id, client_id, amount, status, next_attempt_at)"
            " VALUES ('ORD-0000000000001-deadbeef', 'A', 100, 'PENDING', now() + interval '1 day')"
        ],
        ("A", None, "is PENDING with 0 ORDER_DEDUCTION and 0 ORDER_REFUND entries; it needs 1 and 0"),
    ),
    "completed order turned FAILED without a refund": (
        [
            "UPDATE orders SET status = 'FAILED', failure = 'PROVIDER_ERROR', fulfillment_id = NULL"
            " WHERE client_id = 'A'"
        ],
        ("A", None, "is FAILED with 1 ORDER_DEDUCTION and 0 ORDER_REFUND entries; it needs 1 and 1"),
    ),
    "refunded order turned COMPLETED": (
        [
            "UPDATE orders SET status = 'COMPLETED', failure = NULL, fulfillment_id = '999'"
            " WHERE status = 'FAILED'"
        ],
        ("B", None, "is COMPLETED with 1 ORDER_DEDUCTION and 1 ORDER_REFUND entries; it needs 1 and 0"),
    ),
    "refunded order turned PENDING": (
        [
            "UPDATE orders SET status = 'PENDING', failure = NULL, next_attempt_at = now() + interval '1 day'"
            " WHERE status = 'FAILED'"
        ],
        ("B", None, "is PENDING with 1 ORDER_DEDUCTION and 1 ORDER_REFUND entries; it needs 1 and 0"),
    ),
    "order amount changed": (
        ["UPDATE orders SET amount = amount + 1 WHERE client_id = 'A'"],
        ("A", None, "ledger entries of another client or amount"),
    ),
    "order removed": (
        ["DELETE FROM orders WHERE client_id = 'A'"],
        ("A", 2, "ORDER_DEDUCTION names order ORD-"),
    ),
}


@pytest.mark.parametrize(("statements", "expected"), TAMPERING.values(), ids=TAMPERING.keys())
async def test_tampering_is_named(
    database_url: str,
    provider: Provider,
    tmp_path: Path,
    statements: list[str],
    expected: tuple[str, int | None, str],
) -> None:
    client_id, entry_no, reason = expected
    async with start_service(database_url, provider.url) as api:
        await make_ledger(api, provider)
        await tamper(database_url, *statements)
        verdict = await http_verdict(api)
    assert verdict["ok"] is False
    faults = verdict["faults"]
    assert {f["clientId"] for f in faults} == {client_id}, faults  # no other wallet is blamed
    assert any(f["entryNo"] == entry_no and reason in f["reason"] for f in faults), faults
    result = run_verify(database_url, tmp_path)
    assert result.returncode == 1
    assert "FAILED" in result.stdout
    where = f"{client_id} entry {entry_no} " if entry_no is not None else f"{client_id}: "
    assert any(line.strip().startswith(where) and reason in line for line in result.stdout.splitlines())


def _database_name(url: str) -> str:
    name = make_url(url).database
    assert name is not None
    return name


# Each weakening of the append-only protection, and words the verdict must contain.
WEAKENINGS: dict[str, tuple[list[str], list[str]]] = {
    "trigger disabled": (
        ["ALTER TABLE ledger_entries DISABLE TRIGGER ledger_no_update_delete"],
        ["ledger_no_update_delete is disabled", "let this session UPDATE", "let this session DELETE"],
    ),
    "trigger fires on replicas only": (
        ["ALTER TABLE ledger_entries ENABLE REPLICA TRIGGER ledger_no_update_delete"],
        ["ledger_no_update_delete is enabled for replica sessions only", "let this session UPDATE"],
    ),
    "truncate trigger fires on replicas only": (
        ["ALTER TABLE ledger_entries ENABLE REPLICA TRIGGER ledger_no_truncate"],
        ["ledger_no_truncate is enabled for replica sessions only"],
    ),
    "function lets changes through": (
        [
            "CREATE OR REPLACE FUNCTION ledger_is_append_only() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN IF TG_OP = 'TRUNCATE' THEN RETURN NULL; END IF; RETURN OLD; END $$"
        ],
        [
            "ledger_no_update_delete: the body of ledger_is_append_only was changed",
            "ledger_no_truncate: the body of ledger_is_append_only was changed",
            "let this session UPDATE",
            "let this session DELETE",
        ],
    ),
    "trigger runs another function": (
        [
            "CREATE FUNCTION ledger_let_through() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RETURN OLD; END $$",
            "DROP TRIGGER ledger_no_update_delete ON ledger_entries",
            "CREATE TRIGGER ledger_no_update_delete BEFORE UPDATE OR DELETE ON ledger_entries"
            " FOR EACH ROW EXECUTE FUNCTION ledger_let_through()",
        ],
        [
            "ledger_no_update_delete runs another function than ledger_is_append_only",
            "let this session UPDATE",
        ],
    ),
    "same name, DELETE missing": (
        [
            "DROP TRIGGER ledger_no_update_delete ON ledger_entries",
            "CREATE TRIGGER ledger_no_update_delete BEFORE UPDATE ON ledger_entries"
            " FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only()",
        ],
        ["ledger_no_update_delete no longer fires before every event", "let this session DELETE"],
    ),
    "same name, statement level": (
        [
            "DROP TRIGGER ledger_no_update_delete ON ledger_entries",
            "CREATE TRIGGER ledger_no_update_delete BEFORE UPDATE OR DELETE ON ledger_entries"
            " FOR EACH STATEMENT WHEN (false) EXECUTE FUNCTION ledger_is_append_only()",
        ],
        ["ledger_no_update_delete no longer fires before every event", "let this session UPDATE"],
    ),
    "truncate trigger dropped": (
        ["DROP TRIGGER ledger_no_truncate ON ledger_entries"],
        ["append-only trigger ledger_no_truncate is missing"],
    ),
    "every session a replica": (
        ['ALTER DATABASE "{database}" SET session_replication_role = replica'],
        ["session_replication_role=replica is the default for every role in {database}"],
    ),
}


@pytest.mark.parametrize(("statements", "expected"), WEAKENINGS.values(), ids=WEAKENINGS.keys())
async def test_weakened_protection_is_a_database_fault(
    database_url: str,
    provider: Provider,
    tmp_path: Path,
    statements: list[str],
    expected: list[str],
) -> None:
    database = _database_name(database_url)
    async with start_service(database_url, provider.url) as api:
        await make_ledger(api, provider)
        conn = await asyncpg.connect(plain_url(database_url))
        try:
            for statement in statements:
                await conn.execute(statement.format(database=database))
        finally:
            await conn.close()
        verdict = await http_verdict(api)
    reasons = [f["reason"] for f in verdict["faults"]]
    assert verdict["ok"] is False
    assert all(f["clientId"] is None for f in verdict["faults"]), verdict  # the ledger itself is intact
    for words in expected:
        assert any(words.format(database=database) in reason for reason in reasons), reasons
    result = run_verify(database_url, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected[0].format(database=database) in result.stdout
    assert await _entry_count(database_url) == 7  # verify's probes were rolled back


async def _entry_count(database_url: str) -> int:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM ledger_entries")
        return count
    finally:
        await conn.close()


async def _append_forgery(database_url: str, *, key_id: str | None, secret: bytes | None) -> None:
    """What someone with the database but not LEDGER_KEY can do: append a credit to A that
    recomputes the chain by the rules they can read (here), and move the wallet's head along."""
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        head = await conn.fetchrow(
            "SELECT balance, entry_count, head_hash, updated_at FROM wallets WHERE client_id = 'A'"
        )
        entry_no, amount = head["entry_count"] + 1, 1_000_000
        created_at = head["updated_at"] + timedelta(seconds=1)
        forged = {
            "client_id": "A",
            "entry_no": entry_no,
            "type": "CREDIT",
            "amount": amount,
            "balance_before": head["balance"],
            "balance_after": head["balance"] + amount,
            "reference_id": None,
            "description": "forged",
            "created_at": created_at,
        }
        [digest] = chain_hashes([forged], previous=bytes(head["head_hash"]), secret=secret)
        async with conn.transaction():
            if key_id is None:  # the database refuses unkeyed entries since 0003: off with that
                await conn.execute("ALTER TABLE ledger_entries DROP CONSTRAINT ledger_keyed_since_0003")
            await conn.execute(
                """INSERT INTO ledger_entries (client_id, entry_no, type, amount, balance_before,
                       balance_after, description, created_at, hash, key_id)
                   VALUES ('A', $1, 'CREDIT', $2, $3, $4, 'forged', $5, $6, $7)""",
                entry_no,
                amount,
                head["balance"],
                head["balance"] + amount,
                created_at,
                digest,
                key_id,
            )
            await conn.execute(
                """UPDATE wallets SET balance = balance + $1, entry_count = $2, head_hash = $3,
                       updated_at = $4 WHERE client_id = 'A'""",
                amount,
                entry_no,
                digest,
                created_at,
            )
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("key_id", "secret", "reason"),
    [
        (None, None, "unkeyed hash on an entry written since the ledger was keyed"),
        ("k1", b"a guess at the key", "hash mismatch"),
        ("k9", b"a key of its own", "signed with key id k9"),
    ],
    ids=["unkeyed", "guessed key", "invented key id"],
)
async def test_an_appended_forgery_needs_the_key(
    database_url: str, provider: Provider, key_id: str | None, secret: bytes | None, reason: str
) -> None:
    async with start_service(database_url, provider.url) as api:
        await make_ledger(api, provider)
        await _append_forgery(database_url, key_id=key_id, secret=secret)
        faults = (await http_verdict(api))["faults"]
    assert [(f["clientId"], f["entryNo"]) for f in faults] == [("A", 4)]
    assert reason in faults[0]["reason"]


async def test_the_key_verifies_and_a_wrong_key_does_not(
    database_url: str, provider: Provider, tmp_path: Path
) -> None:
    async with start_service(database_url, provider.url) as api:
        await make_ledger(api, provider)
    rotated = {"LEDGER_KEY": "the-next-key-0123456789abcdef0123", "LEDGER_KEY_ID": "k2"}
    old = {"LEDGER_OLD_KEYS": f"k1:{LEDGER_KEY}"}
    result = run_verify(database_url, tmp_path, env={**rotated, **old})
    assert result.returncode == 0, result.stdout  # rotated: k1 entries verify with the old key
    forgotten = run_verify(database_url, tmp_path, env=rotated)
    assert forgotten.returncode == 1
    assert "signed with key id k1, which is neither LEDGER_KEY_ID nor in LEDGER_OLD_KEYS" in forgotten.stdout


async def test_new_key_id_continues_the_chain(database_url: str, provider: Provider) -> None:
    """Rotation: entries under k2 chain from entries under k1; verify needs both keys."""
    async with start_service(database_url, provider.url) as api:
        await make_ledger(api, provider)
    next_key = "the-next-key-0123456789abcdef0123"
    async with start_service(
        database_url,
        provider.url,
        ledger_key=next_key,
        ledger_key_id="k2",
        ledger_old_keys=f"k1:{LEDGER_KEY}",
    ) as api:
        await api.credit("A", 1)
        assert (await api.order("B", 1)).status_code == 201
        assert await http_verdict(api) == {"ok": True, "wallets": 2, "entries": 9, "faults": []}
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        ids = await conn.fetch("SELECT key_id FROM ledger_entries WHERE client_id = 'A' ORDER BY entry_no")
    finally:
        await conn.close()
    assert [r["key_id"] for r in ids] == ["k1", "k1", "k1", "k2"]


async def test_digest_catches_a_removed_tail_the_chain_cannot(
    database_url: str, provider: Provider, tmp_path: Path
) -> None:
    """Someone with the database removes A's last entry and rolls its head back, and removes B
    altogether: what is left is whole (no key needed for that), so only a digest kept elsewhere
    can tell."""
    async with start_service(database_url, provider.url) as api:
        await make_ledger(api, provider)
        response = await api.http.get("/admin/ledger/digest", headers=api.admin_headers)
        assert response.status_code == 200, response.text
        digest = response.json()["data"]
        await api.credit("A", 1)  # the chain goes on after the digest
    assert digest["version"] == 1
    assert digest["keyId"] == "k1"
    assert (digest["walletCount"], digest["entryCount"]) == (2, 7)
    assert [(w["clientId"], w["entryCount"]) for w in digest["wallets"]] == [("A", 3), ("B", 4)]
    assert all(len(bytes.fromhex(w["headHash"])) == 32 for w in digest["wallets"])
    datetime.fromisoformat(digest["takenAt"])
    digest_file = tmp_path / "digest.json"
    digest_file.write_text(json.dumps(digest))

    assert run_verify(database_url, tmp_path, "--digest", str(digest_file)).returncode == 0

    await tamper(
        database_url,
        "DELETE FROM ledger_entries WHERE client_id = 'A' AND entry_no >= 3",
        """UPDATE wallets SET balance = 9000, entry_count = 2,
               head_hash = (SELECT hash FROM ledger_entries WHERE client_id = 'A' AND entry_no = 2)
           WHERE client_id = 'A'""",
        "DELETE FROM orders WHERE client_id = 'B'",
        "DELETE FROM ledger_entries WHERE client_id = 'B'",
        "DELETE FROM wallets WHERE client_id = 'B'",
    )
    plain = run_verify(database_url, tmp_path)
    assert plain.returncode == 0, plain.stdout  # what a keyed chain alone cannot see
    result = run_verify(database_url, tmp_path, "--digest", str(digest_file))
    assert result.returncode == 1
    assert "A: the digest saw 3 entries, 2 are left: entries were removed" in result.stdout
    assert "B: the wallet in the digest is gone" in result.stdout

    altered = dict(digest, wallets=[w for w in digest["wallets"] if w["clientId"] != "A"])
    digest_file.write_text(json.dumps(altered))
    result = run_verify(database_url, tmp_path, "--digest", str(digest_file))
    assert result.returncode == 1
    assert "the digest file was altered" in result.stdout


async def test_digest_catches_a_replaced_history(
    database_url: str, provider: Provider, tmp_path: Path
) -> None:
    """B's history rewritten from the start with a new, valid-looking chain (as someone with the
    key, or before the ledger was keyed, could): the head at the digest's entry differs."""
    async with start_service(database_url, provider.url) as api:
        await make_ledger(api, provider)
        digest = (await api.http.get("/admin/ledger/digest", headers=api.admin_headers)).json()["data"]
    (tmp_path / "digest.json").write_text(json.dumps(digest))
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        rows = await conn.fetch("SELECT * FROM ledger_entries WHERE client_id = 'B' ORDER BY entry_no")
    finally:
        await conn.close()
    hashes = chain_hashes(
        {**row, "description": "rewritten"} if row["entry_no"] == 1 else row for row in rows
    )
    await tamper(
        database_url,
        "UPDATE ledger_entries SET description = 'rewritten' WHERE client_id = 'B' AND entry_no = 1",
        *[
            f"UPDATE ledger_entries SET hash = '\\x{h.hex()}' WHERE id = {row['id']}"  # noqa: S608
            for row, h in zip(rows, hashes, strict=True)
        ],
        f"UPDATE wallets SET head_hash = '\\x{hashes[-1].hex()}' WHERE client_id = 'B'",  # noqa: S608
    )
    assert run_verify(database_url, tmp_path).returncode == 0  # consistent, and made with the key
    result = run_verify(database_url, tmp_path, "--digest", str(tmp_path / "digest.json"))
    assert result.returncode == 1
    assert "B entry 4 (ledger id" in result.stdout
    assert "hash differs from the digest" in result.stdout


async def test_verify_reads_one_snapshot_while_money_moves(database_url: str, provider: Provider) -> None:
    """20 verifies during a burst of concurrent orders and credits: each sees one moment."""
    clients = [f"C{i}" for i in range(4)]
    async with start_service(database_url, provider.url) as api:
        for client_id in clients:
            await api.credit(client_id, 1_000_000)
        stop = asyncio.Event()
        moved = 0

        async def burst(client_id: str) -> None:
            nonlocal moved
            while not stop.is_set():
                assert (await api.order(client_id, 1)).status_code == 201
                assert (await api.credit(client_id, 1)).status_code == 200
                moved += 2

        movers = [asyncio.create_task(burst(c)) for c in clients for _ in range(3)]
        try:
            verdicts = []
            for _ in range(20):
                verdicts.append(await http_verdict(api))
        finally:
            stop.set()
            await asyncio.gather(*movers)
        assert moved > 0
        assert [v["faults"] for v in verdicts] == [[]] * 20
        assert len({v["entries"] for v in verdicts}) > 1  # the money really moved in between


async def test_times_never_go_back(database_url: str, provider: Provider) -> None:
    """A credit takes the client row, then the wallet row. Held up at the first while a debit
    (which needs only the wallet) goes through, it used to be stamped with its transaction's
    start: before the debit that precedes it in the ledger."""
    async with start_service(database_url, provider.url) as api:
        await api.credit("T", 100)
        blocker = await asyncpg.connect(plain_url(database_url))
        try:
            hold = blocker.transaction()
            await hold.start()
            await blocker.execute("SELECT 1 FROM clients WHERE client_id = 'T' FOR UPDATE")
            credit = asyncio.create_task(api.credit("T", 1))
            waiting = 0
            while waiting == 0:
                waiting = await blocker.fetchval(
                    """SELECT count(*) FROM pg_stat_activity
                       WHERE datname = current_database() AND application_name = 'wallet'
                         AND wait_event_type = 'Lock'"""
                )
            assert (await api.debit("T", 1)).status_code == 200  # entry 2, while the credit waits
            await hold.commit()
            assert (await credit).status_code == 200  # entry 3
            rows = await blocker.fetch(
                "SELECT entry_no, type, created_at FROM ledger_entries"
                " WHERE client_id = 'T' ORDER BY entry_no"
            )
            updated_at = await blocker.fetchval("SELECT updated_at FROM wallets WHERE client_id = 'T'")
        finally:
            await blocker.close()
        assert [r["type"] for r in rows] == ["CREDIT", "DEBIT", "CREDIT"]
        times = [r["created_at"] for r in rows]
        assert times == sorted(times), times
        assert updated_at == times[-1]
        balance = await api.http.get("/wallet/balance", headers={"client-id": "T"})
        shown = datetime.fromisoformat(balance.json()["data"]["lastUpdated"])  # milliseconds
        assert shown == times[-1].replace(microsecond=times[-1].microsecond // 1000 * 1000)
        assert (await http_verdict(api))["ok"] is True


async def test_legacy_ledger_keeps_verifying_after_the_upgrade(
    postgres_url: str, provider: Provider, tmp_path: Path
) -> None:
    """A database written before migration 0003 (unkeyed sha256 chain) is upgraded: its entries
    still verify, new ones are keyed and chain from them, and the key then protects the old ones."""
    name = f"wallet_legacy_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(plain_url(postgres_url))
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(plain_url(postgres_url)).set(database=name).render_as_string(hide_password=False)
    try:
        await migrate_url(url, "0002")
        await _write_legacy_ledger(url)
        await migrate_url(url)
        async with start_service(url, provider.url) as api:
            await api.credit("L", 5)
            assert (await api.order("L", 2)).status_code == 201
            assert await http_verdict(api) == {"ok": True, "wallets": 1, "entries": 4, "faults": []}
        result = run_verify(url, tmp_path)
        assert result.returncode == 0, result.stdout
        conn = await asyncpg.connect(url)
        try:
            keys = await conn.fetch("SELECT key_id FROM ledger_entries ORDER BY entry_no")
            assert [r["key_id"] for r in keys] == [None, None, "k1", "k1"]
        finally:
            await conn.close()
        # The unkeyed part recomputed by someone without the key: the first keyed entry objects.
        legacy = await asyncpg.connect(url)
        try:
            await legacy.execute("SET session_replication_role = replica")
            await _write_legacy_ledger(url, conn=legacy, description="rewritten", replace=True)
        finally:
            await legacy.close()
        result = run_verify(url, tmp_path)
        assert result.returncode == 1
        assert "L entry 3 " in result.stdout
        assert "hash mismatch" in result.stdout
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_an_unkeyed_wallet_forged_under_ids_no_legacy_entry_had_is_named(
    database_url: str, provider: Provider, tmp_path: Path
) -> None:
    """Ids are the forger's to choose (OVERRIDING SYSTEM VALUE): a wallet of unkeyed entries with
    ids at or below 0 passes the keying CHECK of a database that never had legacy entries, and
    its plain SHA-256 chain needs no key. Only ids a real legacy entry could have are legacy."""
    async with start_service(database_url, provider.url) as api:
        await make_ledger(api, provider)
        await _write_legacy_ledger(database_url, first_id=-1)
        faults = (await http_verdict(api))["faults"]
    assert [(f["clientId"], f["entryNo"]) for f in faults] == [("L", 1)]
    assert "unkeyed hash on an entry written since the ledger was keyed" in faults[0]["reason"]
    result = run_verify(database_url, tmp_path)
    assert result.returncode == 1
    assert "L entry 1 " in result.stdout


async def _write_legacy_ledger(
    url: str,
    *,
    conn: asyncpg.Connection | None = None,
    description: str = "opening",
    replace: bool = False,
    first_id: int | None = None,
) -> None:
    """Client L with a credit of 10.00 and a debit of 3.00, hashed as before 0003:
    sha256(previous hash || content), written by direct inserts as the old statements did. The old
    hash is spelled out here, not taken from `chain_hashes`: what verify accepts as legacy is
    checked against the old rule itself."""
    own = conn is None
    db = conn if conn is not None else await asyncpg.connect(url)
    try:
        start = datetime(2026, 1, 1, tzinfo=UTC)
        moves = [("CREDIT", 1000, 0, 1000, description), ("DEBIT", 300, 1000, 700, None)]
        previous = chain.GENESIS_HASH
        rows = []
        for n, (type_, amount, before, after, desc) in enumerate(moves, start=1):
            at = start + timedelta(minutes=n)
            content = chain.canonical_content(
                client_id="L",
                entry_no=n,
                type=type_,
                amount=amount,
                balance_before=before,
                balance_after=after,
                reference_id=None,
                description=desc,
                created_at=at,
            )
            previous = hashlib.sha256(previous + content).digest()
            rows.append((n, type_, amount, before, after, desc, at, previous))
        async with db.transaction():
            if replace:
                for n, *_rest, digest in rows:
                    await db.execute(
                        "UPDATE ledger_entries SET description = $1, hash = $2"
                        " WHERE client_id = 'L' AND entry_no = $3",
                        rows[n - 1][5],
                        digest,
                        n,
                    )
                return
            await db.execute("INSERT INTO clients (client_id) VALUES ('L')")
            await db.execute(
                "INSERT INTO wallets (client_id, balance, entry_count, head_hash, updated_at)"
                " VALUES ('L', 700, 2, $1, $2)",
                previous,
                rows[-1][6],
            )
            if first_id is not None:  # ids of the writer's choosing
                await db.executemany(
                    """INSERT INTO ledger_entries (id, client_id, entry_no, type, amount, balance_before,
                           balance_after, description, created_at, hash) OVERRIDING SYSTEM VALUE
                       VALUES ($9::bigint + $1::int - 1, 'L', $1, $2, $3, $4, $5, $6, $7, $8)""",
                    [(*row, first_id) for row in rows],
                )
                return
            await db.executemany(
                """INSERT INTO ledger_entries (client_id, entry_no, type, amount, balance_before,
                       balance_after, description, created_at, hash)
                   VALUES ('L', $1, $2, $3, $4, $5, $6, $7, $8)""",
                rows,
            )
    finally:
        if own:
            await db.close()


def test_a_digest_that_is_not_one_stops_verify(tmp_path: Path) -> None:
    """Before any database work: a wrong file is the operator's mistake (exit 2), not a fault."""
    (tmp_path / "digest.json").write_text(json.dumps({"wallets": "none"}))
    result = run_verify(
        "postgresql://nobody@127.0.0.1:1/none", tmp_path, "--digest", str(tmp_path / "digest.json")
    )
    assert result.returncode == 2
    assert "cannot read the digest" in result.stderr
