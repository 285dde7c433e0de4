"""Idempotency records get a distribution column Citus accepts (docs/scaling.md).

0006 gave `idempotency_keys` a client_id GENERATED from the caller, NULL for the admin. Citus
refuses both as a distribution column: "Distribution column must not use GENERATED ALWAYS AS
(...) STORED" (its own regression test, pg12.out), and a NULL distribution value cannot be
inserted. So the column becomes `tenant`, a plain NOT NULL column the service writes
(idempotency.py): the client's id for a client's record, so it lives with the client's wallet
and orders; `admin:<key>` for an admin record, so that the admin's scope stays (admin, key)
across every client (SPEC §5) and each admin record lives on one shard of its own. A CHECK ties
it to the caller and the key, so it can never disagree with them. The primary key becomes
(tenant, caller, key): unique exactly when (caller, key) is, since tenant follows from them.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from wallet.migrations.script import run

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TENANT_OF = "CASE WHEN caller LIKE 'client:%' THEN substr(caller, 8) ELSE caller || ':' || key END"

UPGRADE = rf"""
ALTER TABLE idempotency_keys
    DROP CONSTRAINT idempotency_keys_order_fkey,
    DROP CONSTRAINT idempotency_keys_order_key,
    DROP CONSTRAINT idempotency_keys_order_has_client,
    ALTER COLUMN client_id DROP EXPRESSION;

ALTER TABLE idempotency_keys RENAME COLUMN client_id TO tenant;

UPDATE idempotency_keys SET tenant = {TENANT_OF} WHERE tenant IS NULL;

ALTER TABLE idempotency_keys
    ALTER COLUMN tenant SET NOT NULL,
    ADD CONSTRAINT idempotency_keys_tenant CHECK (tenant = ({TENANT_OF})),
    DROP CONSTRAINT idempotency_keys_pkey,
    ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (tenant, caller, key),
    ADD CONSTRAINT idempotency_keys_order_has_client CHECK (order_id IS NULL OR caller LIKE 'client:%'),
    ADD CONSTRAINT idempotency_keys_order_key UNIQUE (tenant, order_id),
    ADD CONSTRAINT idempotency_keys_order_fkey
        FOREIGN KEY (tenant, order_id) REFERENCES orders (client_id, order_id)
"""

DOWNGRADE = r"""
ALTER TABLE idempotency_keys
    DROP CONSTRAINT idempotency_keys_order_fkey,
    DROP CONSTRAINT idempotency_keys_order_key,
    DROP CONSTRAINT idempotency_keys_order_has_client,
    DROP CONSTRAINT idempotency_keys_pkey,
    DROP CONSTRAINT idempotency_keys_tenant,
    ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (caller, key),
    DROP COLUMN tenant;

ALTER TABLE idempotency_keys
    ADD COLUMN client_id text GENERATED ALWAYS AS (
        CASE WHEN caller LIKE 'client:%' THEN substr(caller, 8) END) STORED,
    ADD CONSTRAINT idempotency_keys_order_has_client CHECK (order_id IS NULL OR client_id IS NOT NULL),
    ADD CONSTRAINT idempotency_keys_order_key UNIQUE (client_id, order_id),
    ADD CONSTRAINT idempotency_keys_order_fkey
        FOREIGN KEY (client_id, order_id) REFERENCES orders (client_id, order_id)
"""


def upgrade() -> None:
    run(UPGRADE)


def downgrade() -> None:
    run(DOWNGRADE)
