"""Orders whose provider outcome is unknown: a stored due time for the resolver, a review flag,
an operator's resolution; and idempotency scopes that no client id can collide with.

The PENDING lease becomes `next_attempt_at`: while a request is fulfilling an order it is that
request's deadline, afterwards the resolver's next try. `sent_by` is when the last call this
service may have made for the order can have reached the provider at the latest: a status lookup
that finds nothing proves the order was never received only after it. Either way an order whose time has come
belongs to whichever process claims it first (FOR UPDATE SKIP LOCKED).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from wallet.migrations.script import run

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE orders RENAME COLUMN lease_until TO next_attempt_at;

ALTER INDEX orders_pending_lease RENAME TO orders_pending_due;

ALTER TABLE orders
    ADD COLUMN resolver_attempts integer NOT NULL DEFAULT 0 CHECK (resolver_attempts >= 0),
    ADD COLUMN sent_by           timestamptz,
    ADD COLUMN last_error        text,
    ADD COLUMN needs_review      boolean NOT NULL DEFAULT false,
    ADD COLUMN flagged_at        timestamptz,
    ADD COLUMN resolved_by       text,
    ADD COLUMN resolved_at       timestamptz,
    ADD COLUMN resolution_note   text,
    ADD CONSTRAINT orders_review_only_pending CHECK (NOT needs_review OR status = 'PENDING'),
    ADD CONSTRAINT orders_flag_has_time CHECK (NOT needs_review OR flagged_at IS NOT NULL),
    ADD CONSTRAINT orders_resolution_whole CHECK (
        (resolved_by IS NULL) = (resolved_at IS NULL) AND (resolved_at IS NULL OR status <> 'PENDING'));

ALTER TABLE orders DROP CONSTRAINT orders_failure_check;

ALTER TABLE orders ADD CONSTRAINT orders_failure_check
    CHECK (failure IN ('PROVIDER_ERROR', 'UNREACHABLE', 'RESOLVED_FAILED'));

CREATE INDEX orders_pending_client ON orders (client_id) INCLUDE (amount) WHERE status = 'PENDING';

CREATE INDEX orders_review_queue ON orders (id) WHERE needs_review;

CREATE INDEX orders_status_page ON orders (status, id);

UPDATE idempotency_keys SET caller = CASE WHEN order_id IS NULL THEN 'admin' ELSE 'client:' || caller END;

ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_scope
    CHECK (caller ~ '^(admin|client:[A-Za-z0-9_.:-]{1,64})$')
"""

DOWNGRADE = r"""
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_scope;

UPDATE idempotency_keys SET caller = substr(caller, 8) WHERE caller LIKE 'client:%';

DROP INDEX orders_status_page;

DROP INDEX orders_review_queue;

DROP INDEX orders_pending_client;

ALTER TABLE orders DROP CONSTRAINT orders_failure_check;

UPDATE orders SET failure = 'PROVIDER_ERROR' WHERE failure = 'RESOLVED_FAILED';

ALTER TABLE orders ADD CONSTRAINT orders_failure_check CHECK (failure IN ('PROVIDER_ERROR', 'UNREACHABLE'));

ALTER TABLE orders
    DROP CONSTRAINT orders_resolution_whole,
    DROP CONSTRAINT orders_flag_has_time,
    DROP CONSTRAINT orders_review_only_pending,
    DROP COLUMN resolution_note,
    DROP COLUMN resolved_at,
    DROP COLUMN resolved_by,
    DROP COLUMN flagged_at,
    DROP COLUMN needs_review,
    DROP COLUMN last_error,
    DROP COLUMN sent_by,
    DROP COLUMN resolver_attempts;

ALTER INDEX orders_pending_due RENAME TO orders_pending_lease;

ALTER TABLE orders RENAME COLUMN next_attempt_at TO lease_until
"""


def upgrade() -> None:
    run(UPGRADE)


def downgrade() -> None:
    run(DOWNGRADE)
