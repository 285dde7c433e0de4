"""Every change to api_keys is announced: each server process caches the keys it verified
(keycache.py) and drops them when told, so a key revoked or deleted by any path (the admin API,
the console, an operator's SQL) stops working everywhere within a second.

A statement-level trigger NOTIFYs `wallet_api_keys` from the changing transaction itself, so the
announcement is delivered exactly when the change commits, and never for a change rolled back.
The payload is empty: a process clears its whole cache, which a revocation (a rare, human act)
makes cheap, and nothing about any key leaves the table. INSERT is not announced: only valid keys
are cached, so a new key needs no invalidation. A statement-level trigger fires even when no
row changed (revoking an unknown key): one needless cache clear, nothing more. Were a hot path to
UPDATE api_keys some day (a last-used time, say), it would clear every cache on every request:
narrow this trigger first.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from wallet.migrations.script import run

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE FUNCTION api_keys_announce_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('wallet_api_keys', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_announce_change AFTER UPDATE OR DELETE OR TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION api_keys_announce_change();
"""

DOWNGRADE = r"""
DROP TRIGGER api_keys_announce_change ON api_keys;

DROP FUNCTION api_keys_announce_change();
"""


def upgrade() -> None:
    run(UPGRADE)


def downgrade() -> None:
    run(DOWNGRADE)
