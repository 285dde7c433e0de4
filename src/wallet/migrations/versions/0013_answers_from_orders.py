"""Idempotency-Key records keep the domain value a request came to, not its HTTP answer.

- Orders: a replay has always answered from the order as it stands, never from the stored bytes,
  so storing them was work on every keyed order for nothing; settling an order no longer writes
  its key.
- Credits and debits keep the movement (`result`: client, balance before and after, amount,
  time), and an operator's resolve the order's id; replays render those exactly as the first
  answer was rendered. Records written before this revision keep their answer's bytes and replay
  them as they are until they expire.

`idempotency_claim` clears `result` too when it takes over an expired record.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from wallet.migrations.script import run

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_CLAIM = r"""
CREATE OR REPLACE FUNCTION idempotency_claim(
    p_tenant text, p_caller text, p_key text, p_fingerprint bytea, p_ttl_hours double precision)
RETURNS boolean LANGUAGE sql VOLATILE
BEGIN ATOMIC
    INSERT INTO idempotency_keys (tenant, caller, key, fingerprint, expires_at)
    VALUES (p_tenant, p_caller, p_key, p_fingerprint, now() + make_interval(secs => p_ttl_hours * 3600))
    ON CONFLICT (tenant, caller, key) DO UPDATE
        SET fingerprint = EXCLUDED.fingerprint, order_id = NULL, response_status = NULL,
            response_body = NULL, {result}created_at = now(), expires_at = EXCLUDED.expires_at
        WHERE idempotency_keys.expires_at < now()
    RETURNING true;
END"""

UPGRADE = rf"""
ALTER TABLE idempotency_keys ADD COLUMN result jsonb CHECK (jsonb_typeof(result) = 'object');

{_CLAIM.format(result="result = NULL, ")}
"""

# The older schema cannot hold a result, so those records are dropped: a retry of that resolve is
# then answered 409 ORDER_ALREADY_FINAL with the order, but a retry of that credit or debit would
# move the money again. Downgrade only once no such record is younger than a client would retry.
DOWNGRADE = rf"""
DELETE FROM idempotency_keys WHERE result IS NOT NULL;

{_CLAIM.format(result="")};

ALTER TABLE idempotency_keys DROP COLUMN result
"""


def upgrade() -> None:
    run(UPGRADE)


def downgrade() -> None:
    run(DOWNGRADE)
