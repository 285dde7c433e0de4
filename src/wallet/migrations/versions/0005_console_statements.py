"""Statements by time, operator console sessions, and a record of ledger checks (issue #14).

- `ledger_client_time`: a statement or a balance at a past moment is a range scan of one
  wallet's entries by time. Ledger times never go back within a wallet (ledger.py, checked by
  verify), so (client_id, created_at, entry_no) order is entry order.
- `console_sessions`: server-side sessions of the operator console, so that logout and expiry
  hold across every worker and host; only the SHA-256 of the cookie's secret is stored.
- `ledger_checks`: the outcome of every ledger verification run from the console, so the
  overview can say when the ledger was last checked and what was found.

Depends only on the tables of 0001-0003.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from wallet.migrations.script import run

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE INDEX ledger_client_time ON ledger_entries (client_id, created_at, entry_no);


CREATE TABLE console_sessions (
    id_hash     bytea PRIMARY KEY CHECK (length(id_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);

CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);

CREATE TABLE ledger_checks (
    id          bigserial PRIMARY KEY,
    checked_at  timestamptz NOT NULL DEFAULT now(),
    ok          boolean NOT NULL,
    wallets     bigint NOT NULL,
    entries     bigint NOT NULL,
    faults      jsonb NOT NULL,
    checked_by  text NOT NULL
);
"""

DOWNGRADE = r"""
DROP TABLE ledger_checks;

DROP TABLE console_sessions;

DROP INDEX ledger_client_time;
"""


def upgrade() -> None:
    run(UPGRADE)


def downgrade() -> None:
    run(DOWNGRADE)
