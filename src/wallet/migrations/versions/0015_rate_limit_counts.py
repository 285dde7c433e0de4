"""Rate-limit counts in PostgreSQL, for several processes with no Redis (ratelimit.PostgresCounts).

Without REDIS_URL each worker counted alone, so WORKERS=N let a client make N times RATE_LIMIT;
SPEC §1 keeps what must be shared in PostgreSQL or Redis. One row per (window length, fixed
window, key), added to by one statement per batch of requests; the API's limit and the console's
login limit share the table (their keys differ, and so may their windows). UNLOGGED: counts are
worth no WAL, no replica and no crash recovery (a crash empties the table, which forgets at most
two windows of counts).

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

from wallet.migrations.script import run

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE UNLOGGED TABLE rate_limit_counts (
    window_ms    integer NOT NULL CHECK (window_ms > 0),
    window_index bigint  NOT NULL,
    ip           text    NOT NULL,
    hits         integer NOT NULL CHECK (hits >= 0),
    PRIMARY KEY (window_ms, window_index, ip)
)
"""

DOWNGRADE = "DROP TABLE rate_limit_counts"


def upgrade() -> None:
    run(UPGRADE)


def downgrade() -> None:
    run(DOWNGRADE)
