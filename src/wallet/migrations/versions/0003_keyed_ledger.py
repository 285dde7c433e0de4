"""A keyed ledger chain: each entry names the key of its HMAC-SHA256 (SPEC §6).

Entries written before this revision keep their unkeyed sha256 hashes and verify as they are
(`key_id` NULL); the first keyed entry of a wallet chains from its last unkeyed hash, so from
then on the key protects that history too. `ledger_keying.legacy_until_id` records the last
entry that may be unkeyed: verify refuses an unkeyed entry written after the upgrade, so no one
can append unkeyed entries to a chain without the key; and the database refuses to write one
(the CHECK is NOT VALID: it holds for new rows, the old ones need no scan). A process still
running the previous code fails its movements from here on instead of writing entries verify
would reject: replace every process when upgrading to this revision.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from wallet.migrations.script import run

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE ledger_entries ADD COLUMN key_id text CHECK (key_id ~ '^[A-Za-z0-9_.-]{1,32}$');

CREATE TABLE ledger_keying (
    one              boolean PRIMARY KEY DEFAULT true CHECK (one),
    legacy_until_id  bigint NOT NULL CHECK (legacy_until_id >= 0),
    keyed_at         timestamptz NOT NULL DEFAULT now()
);

INSERT INTO ledger_keying (legacy_until_id) SELECT coalesce(max(id), 0) FROM ledger_entries;

DO $$
BEGIN
    EXECUTE format(
        'ALTER TABLE ledger_entries ADD CONSTRAINT ledger_keyed_since_0003'
        ' CHECK (key_id IS NOT NULL OR id <= %s) NOT VALID',
        (SELECT legacy_until_id FROM ledger_keying));
END
$$
"""

DOWNGRADE = r"""
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_keyed_since_0003;

DROP TABLE ledger_keying;

ALTER TABLE ledger_entries DROP COLUMN key_id
"""


def upgrade() -> None:
    run(UPGRADE)


def downgrade() -> None:
    run(DOWNGRADE)
