"""An order's Idempotency-Key record no longer stores an HTTP answer: replays render the order.

A replay of an order (placed, or resolved by an operator) has always answered from the order as
it stands, never from the stored bytes, so storing those bytes was work on every keyed order for
nothing but a flag. What is still stored is the status alone, on an operator's resolve, to mark
its record finished; so a status may now stand without a body. Credits and debits still store
their answer, status and body together.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from wallet.migrations.script import run

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE idempotency_keys
    DROP CONSTRAINT idempotency_keys_check,
    ADD CONSTRAINT idempotency_keys_body_has_status
        CHECK (response_body IS NULL OR response_status IS NOT NULL)
"""

# A resolve's record without a body cannot be kept by the older schema: dropped, a retry of that
# resolve is answered 409 ORDER_ALREADY_FINAL with the order instead of a replay.
DOWNGRADE = r"""
DELETE FROM idempotency_keys WHERE response_status IS NOT NULL AND response_body IS NULL;

ALTER TABLE idempotency_keys
    DROP CONSTRAINT idempotency_keys_body_has_status,
    ADD CONSTRAINT idempotency_keys_check CHECK ((response_status IS NULL) = (response_body IS NULL))
"""


def upgrade() -> None:
    run(UPGRADE)


def downgrade() -> None:
    run(DOWNGRADE)
